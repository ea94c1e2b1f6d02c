"""Deterministic DDIM (eta = 0), numerically equal to diffusers' `DDIMScheduler.from_config(config)`."""

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common
from fd.runtime.schedulers.thresholding import threshold_or_clip

NAME = "ddim"

# diffusers' DDIMScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


class DDIMScheduler:
    """DDIM sampler of Song et al. 2021 with eta = 0 (no noise is added between steps)."""

    name = NAME
    order = 1  # model evaluations per step
    stochastic = False
    init_noise_sigma = 1.0
    prediction_types = common.PREDICTION_TYPES

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        common.check_choice(cfg, "prediction_type", common.PREDICTION_TYPES, NAME)
        common.check_choice(cfg, "timestep_spacing", common.TIMESTEP_SPACINGS, NAME)
        self.config = cfg
        self.alphas_cumprod = common.alphas_cumprod(cfg, NAME)
        # alpha_bar "before" t = 0, used by the last step: 1 (a clean image) or alpha_bar_0.
        self.final_alpha_cumprod = np.float32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = np.arange(cfg["num_train_timesteps"], dtype=np.int64)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the `num_inference_steps` training timesteps to visit, in descending order."""
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            # Multiples of T // n from 0, shifted up by steps_offset (SD1.x uses 1).
            ts = (np.arange(n) * (T // n))[::-1] + int(self.config["steps_offset"])
        else:  # trailing: count down from T, so the first step sits on the last training timestep
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        self.timesteps = common.checked_timesteps(ts, T, spacing)
        self.num_inference_steps = n

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """DDIM feeds the sample to the model unscaled; kept for a uniform scheduler interface."""
        return sample

    def vp_scale(self, timestep=None) -> float:
        """The sample is the variance-preserving latent itself."""
        return 1.0

    def _alpha_bar(self, t: int) -> np.float32:
        T = int(self.config["num_train_timesteps"])
        if not 0 <= t < T:
            raise FdError(f"timestep {t} is outside the model's 0..{T - 1}")
        return self.alphas_cumprod[t]

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, generator=None) -> np.ndarray:
        """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12 with sigma_t = 0).

        Legend: x = x_t (sample); a = alpha_bar_t and a' = alpha_bar_prev (cumulative alpha products);
        eps = predicted noise; x0 = predicted clean sample; v = velocity (Salimans & Ho 2022).

            (1) x0  = (x - sqrt(1 - a) * eps) / sqrt(a)                 [epsilon]
                x0  = sqrt(a) * x - sqrt(1 - a) * v,
                eps = sqrt(a) * v + sqrt(1 - a) * x                     [v_prediction]
                eps = (x - sqrt(a) * x0) / sqrt(1 - a)                  [sample]
            (2) x0  = dynamic_threshold(x0)                              [thresholding: pixel models, IF]
                x0  = clip(x0, -r, r)                                   [else clip_sample]
            (3) x_prev = sqrt(a') * x0 + sqrt(1 - a') * eps

        Like diffusers, "prev" is always t - num_train_timesteps // num_inference_steps, whatever the
        timestep spacing, and below 0 it means `final_alpha_cumprod`.
        """
        if self.num_inference_steps is None:
            raise FdError("run set_timesteps(num_inference_steps) on the ddim scheduler before step()")
        t = int(timestep)
        prev_t = t - int(self.config["num_train_timesteps"]) // self.num_inference_steps
        a = self._alpha_bar(t)
        a_prev = self._alpha_bar(prev_t) if prev_t >= 0 else self.final_alpha_cumprod
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        # Scalars stay float32, as in diffusers, so the arithmetic rounds the same way.
        sqrt_a, sqrt_1ma = np.sqrt(a), np.sqrt(np.float32(1.0) - a)
        pred = self.config["prediction_type"]
        if pred == "epsilon":  # (1)
            eps = out
            x0 = (x - sqrt_1ma * eps) / sqrt_a
        elif pred == "v_prediction":
            x0 = sqrt_a * x - sqrt_1ma * out
            eps = sqrt_a * out + sqrt_1ma * x
        else:
            x0 = out
            eps = (x - sqrt_a * x0) / sqrt_1ma
        x0 = threshold_or_clip(x0, self.config)  # (2)
        # (3)
        prev = np.sqrt(a_prev) * x0 + np.sqrt(np.float32(1.0) - a_prev) * eps
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward process q(x_t | x0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, per batch element."""
        x0 = common.as_f32(original, "original")
        noise = common.as_f32(noise, "noise")
        a = np.array([self._alpha_bar(int(t)) for t in np.atleast_1d(timesteps).reshape(-1)], np.float32)
        sqrt_a = common.per_sample(np.sqrt(a), x0.ndim)
        sqrt_1ma = common.per_sample(np.sqrt(np.float32(1.0) - a), x0.ndim)
        return (sqrt_a * x0 + sqrt_1ma * noise).astype(np.float32, copy=False)
