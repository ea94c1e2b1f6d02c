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

from dataclasses import dataclass

import numpy as np

from fd.runtime import stages
from fd.runtime.errors import FdError
from fd.runtime.images import load_image, prepare_image
from fd.runtime.request import DEFAULT_STRENGTH

SAMPLE_STREAM = 1  # the latent sample's noise comes from its own stream of the seed, independent of the noise


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


def prepare_init(manifest: dict, request, height: int, width: int, engine_dir) -> InitImage | None:
    """Check and prepare a request's --init-image (its strength was checked when the request was made; None: text
    to image)."""
    if request.init_image is None:
        return None
    if "vae_encoder" not in manifest["components"]:
        raise FdError(f"engine folder {engine_dir} has no VAE encoder for --init-image: rebuild it with "
                      "fd-build --img2img")
    image = prepare_image(load_image(request.init_image, "--init-image"), height, width, normalize=True)
    return InitImage(image, DEFAULT_STRENGTH if request.strength is None else float(request.strength),
                     request.steps_run)
