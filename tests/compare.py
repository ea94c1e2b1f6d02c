"""How a generation is compared with its oracle (diffusers' pipeline, or the independent torch reference):
the issues' tolerances, in one place."""
from __future__ import annotations

import numpy as np


def relative_error(got, want) -> float:
    """Largest absolute difference, relative to the largest magnitude of `want`."""
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def pixels(images) -> np.ndarray:
    """PIL images as one int16 (N, H, W, 3) array, so differences do not wrap around."""
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


def assert_equals_diffusers(result, want_latents, want_pixels) -> None:
    """A generation equals diffusers' on the same inputs: final latents within 1e-3 relative, pixels within
    2/255, and diffusers' image a real one (a saturated image any code would match proves nothing)."""
    assert relative_error(result.latents, want_latents) <= 1e-3
    got = pixels(result.images)
    assert got.shape == want_pixels.shape
    assert np.abs(got - want_pixels).max() <= 2
    assert want_pixels.std() > 20
