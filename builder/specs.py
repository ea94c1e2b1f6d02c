"""One spec per component: tensor names, dtypes, shapes and batch ranges.

Export, checks, engine builds and the runtime all read these (the runtime through the manifest), so a
name or an axis is defined once. Shapes use the string "batch" for the dynamic batch axis.

Batch ranges, with B = max batch size (images) and N = max window (steps per decoder call):
  text_encoder, unet_encoder: 1 … 2B (classifier-free guidance doubles the batch)
  unet_decoder: 2 … 2·B·N (one row per guidance half, image and step of the window)
  vae_decoder: 1 … B
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER_TYPICAL_WINDOW = 5  # median window of the paper's key steps for DDIM-50 (1,1,1,2,5,5,10,10,15)
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_window: int


def batch_ranges(limits: Limits) -> dict[str, dict[str, int]]:
    """min/opt/max batch per component; `opt` is what TensorRT tunes kernels for."""
    b, n = limits.max_batch_size, limits.max_window
    return {
        "text_encoder": {"min": 1, "opt": 2, "max": 2 * b},
        "unet_encoder": {"min": 1, "opt": 2, "max": 2 * b},
        "unet_decoder": {"min": 2, "opt": 2 * min(PAPER_TYPICAL_WINDOW, n), "max": 2 * b * n},
        "vae_decoder": {"min": 1, "opt": 1, "max": b},
    }


def _tensor(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": ["batch", *shape]}


def component_specs(*, text_len: int, text_dim: int, latent_channels: int, latent_hw: tuple[int, int],
                    image_hw: tuple[int, int], cache_shapes: list[tuple[int, ...]], unet_dtype: str,
                    text_dtype: str, limits: Limits) -> dict[str, dict]:
    """Specs of the four graphs. cache_shapes: per-sample shapes of mid then every skip, in order."""
    lh, lw = latent_hw
    cache = [_tensor(name, unet_dtype, list(shape)) for name, shape in zip(cache_names(len(cache_shapes)), cache_shapes)]
    text = _tensor("encoder_hidden_states", unet_dtype, [text_len, text_dim])
    timestep = _tensor("timestep", "float32", [])  # fp32 even in fp16 engines: the sinusoid needs it
    specs = {
        "text_encoder": {
            "inputs": [_tensor("input_ids", "int64", [text_len])],
            "outputs": [_tensor("text_embeddings", text_dtype, [text_len, text_dim])],
        },
        "unet_encoder": {
            "inputs": [_tensor("sample", unet_dtype, [latent_channels, lh, lw]), timestep, text],
            "outputs": cache,
        },
        "unet_decoder": {
            "inputs": [timestep, text, *cache],
            "outputs": [_tensor("noise_pred", unet_dtype, [latent_channels, lh, lw])],
        },
        "vae_decoder": {
            "inputs": [_tensor("latent", unet_dtype, [latent_channels, lh, lw])],
            "outputs": [_tensor("image", unet_dtype, [3, *image_hw])],
        },
    }
    for name, batch in batch_ranges(limits).items():
        specs[name]["batch"] = batch
    return specs


def cache_names(count: int) -> list[str]:
    """mid, then skip_00 … in the order the down blocks produce them (the decoder pops from the end)."""
    return ["mid", *(f"skip_{i:02d}" for i in range(count - 1))]


def names(tensors: list[dict]) -> list[str]:
    return [t["name"] for t in tensors]
