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


def assert_one_decoder_call_equals_k_calls(runner, cache, timesteps, conds) -> list:
    """The parallel window: one decoder call over k timesteps equals k calls of one, row by row, and each row
    really used its own timestep. Returns the batched call's k predictions."""
    from fd.runtime import stages
    together = stages.decode_denoiser(runner, cache, timesteps, conds)
    for t, batched in zip(timesteps, together):
        (alone,) = stages.decode_denoiser(runner, cache, np.float32([t]), conds)
        np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    assert np.abs(together[0] - together[-1]).max() > 1e-3
    return together
