"""Euler ancestral, equal to diffusers' `EulerAncestralDiscreteScheduler.from_config` given the same noise.

Each step goes down to sigma_down with an Euler step and adds fresh noise of size sigma_up, with
sigma_down^2 + sigma_up^2 = sigmas[i + 1]^2 (Karras et al. 2022; k-diffusion's sample_euler_ancestral).
The noise comes from the numpy generator passed to `step`, so a seed gives the same image every time.
"""

import numpy as np

from fd.runtime.schedulers import common
from fd.runtime.schedulers.euler import SigmaSpaceScheduler

NAME = "euler-a"

# diffusers' EulerAncestralDiscreteScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


class EulerAncestralDiscreteScheduler(SigmaSpaceScheduler):
    name = NAME
    stochastic = True
    prediction_types = ("epsilon", "v_prediction")  # diffusers has no "sample" for this one

    def __init__(self, config: dict):
        self._setup(common.resolve_config(config, DEFAULTS))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (descending, float32) and their interpolated sigmas plus a final 0; resets the counter."""
        timesteps = self._spaced_timesteps(num_inference_steps)
        self._finish(timesteps, self._interpolated_sigmas(timesteps), 0.0)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """One ancestral step from sigma = sigmas[i] to sigma_to = sigmas[i + 1].

            (1) x0 as in Euler (epsilon or v_prediction)
            (2) sigma_up = sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2),
                sigma_down = sqrt(sigma_to^2 - sigma_up^2)
            (3) x_next = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up * noise

        Noise is drawn at every step, the last (sigma_up = 0) included, as diffusers draws it.
        """
        i = self._current_index(timestep)
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        noise = common.per_step_noise(generator, out.shape, NAME)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._x0(out, x, sigma)  # (1)
        sigma_up = np.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)  # (2)
        sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
        prev = x + (x - x0) / sigma * (sigma_down - sigma)  # (3)
        prev = prev + noise * sigma_up
        self.step_index = i + 1
        return prev.astype(np.float32, copy=False)
