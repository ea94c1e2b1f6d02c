"""Image to image, as diffusers' StableDiffusionImg2ImgPipeline (and the SDXL one) does it.

- The schedule is truncated: of N steps, the last int(N · strength) run (at least one must).
- The init image (prepared in [-1, 1]) goes through the VAE encoder graph, which gives its latent
  distribution's mean and std; the latent is mean + std · e with fd's own seeded noise e, times the VAE
  scaling factor, repeated for every prompt (diffusers encodes one image and repeats it too).
- That latent is noised to the first step that runs with the scheduler's add_noise and the unit noise
  (the same noise text-to-image starts from, and the one prior noise injection adds).
FasterDiffusion's key steps index the steps that run: step 0 is the first of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fd.runtime import stages
from fd.runtime.errors import FdError
from fd.runtime.images import load_image, prepare_image

DEFAULT_STRENGTH = 0.8  # StableDiffusionImg2ImgPipeline's default
SAMPLE_STREAM = 1  # the latent sample's noise comes from its own stream of the seed, independent of the noise


def steps_run(steps: int, strength: float) -> int:
    """How many of `steps` run at this strength (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


def check_strength(strength, steps: int) -> int:
    """The number of steps that run, or one FdError line for a strength out of (0, 1] or one that runs none."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            math.isfinite(strength) and 0 < strength <= 1):
        raise FdError(f"--strength {strength} is out of range: give a number above 0 and at most 1 "
                      f"(the share of the schedule that runs; default {DEFAULT_STRENGTH})")
    run = steps_run(steps, strength)
    if run < 1:
        raise FdError(f"--strength {strength} with --steps {steps} runs no step (int({steps} x {strength}) = 0): "
                      "raise --strength or --steps")
    return run


def sample_noise(seed, shape) -> np.ndarray:
    """The unit noise of the latent sample (mean + std · e); seed None draws fresh noise."""
    stream = None if seed is None else [int(seed), SAMPLE_STREAM]
    return np.random.default_rng(stream).standard_normal(shape, dtype=np.float32)


@dataclass
class InitImage:
    image: np.ndarray  # (1, 3, H, W) float32 in [-1, 1]
    strength: float
    steps_run: int

    def latents(self, runner, manifest: dict, sampler, timesteps, noise: np.ndarray, seed) -> np.ndarray:
        """The starting latents: the encoded image sampled, scaled, repeated per prompt and noised to timesteps[0]."""
        mean, std = stages.encode_vae(runner, self.image)
        latent = (mean + std * sample_noise(seed, mean.shape)) * np.float32(manifest["vae_scaling_factor"])
        latent = np.repeat(latent, len(noise), axis=0)
        return sampler.add_noise(latent, noise, np.full(len(noise), timesteps[0]))

    def check_policy(self, policy) -> None:
        """Key steps index the steps that run: refuse one beyond them, naming the strength."""
        bad = [k for k in policy.key_steps if k >= self.steps_run]
        if bad:
            raise FdError(f"key step {bad[0]} is out of range: --strength {self.strength:g} runs {self.steps_run} "
                          f"steps, indexed 0 to {self.steps_run - 1}")


def prepare_init(manifest: dict, init_image, strength, steps: int, height: int, width: int, engine_dir) -> InitImage | None:
    """Check and prepare --init-image / --strength (None: text to image)."""
    if init_image is None:
        if strength is not None:
            raise FdError("--strength is for image to image: give --init-image PATH too, or drop --strength")
        return None
    if "vae_encoder" not in manifest["components"]:
        raise FdError(f"engine folder {engine_dir} has no VAE encoder for --init-image: rebuild it with "
                      "fd-build --img2img")
    strength = DEFAULT_STRENGTH if strength is None else strength
    run = check_strength(strength, steps)
    image = prepare_image(load_image(init_image, "--init-image"), height, width, normalize=True)
    return InitImage(image, float(strength), run)
