"""How many rows each graph runs at once: one rule, which the builder turns into engine profiles and the
runtime checks a folder's limits against.

With B = max batch size (images) and N = max window (steps per decoder call):
  rows (text encoders, UNet encoder): 1 … 2B (classifier-free guidance doubles the batch)
  window (UNet decoder): 2 … 2·B·N (one row per guidance half, image and step of the window)
  images (VAE decoder): 1 … B
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER_TYPICAL_WINDOW = 5  # median window of the paper's key steps for DDIM-50 (1,1,1,2,5,5,10,10,15)
BATCH_ROLE = {"denoiser_decoder": "window", "vae_decoder": "images"}  # every other graph: "rows"


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_window: int


def batch_ranges(limits: Limits) -> dict[str, dict[str, int]]:
    """min/opt/max batch per batch role; `opt` is what TensorRT tunes kernels for."""
    b, n = limits.max_batch_size, limits.max_window
    return {
        "rows": {"min": 1, "opt": 2, "max": 2 * b},
        "window": {"min": 2, "opt": 2 * min(PAPER_TYPICAL_WINDOW, n), "max": 2 * b * n},
        "images": {"min": 1, "opt": 1, "max": b},
    }


def batch_range(graph: str, limits: Limits) -> dict[str, int]:
    return batch_ranges(limits)[BATCH_ROLE.get(graph, "rows")]
