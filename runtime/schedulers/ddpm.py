"""DDPM ancestral sampling (Ho et al. 2020), equal to diffusers' `DDPMScheduler.from_config` given the same noise.

The posterior q(x_prev | x_t, x0) at the predicted x0, plus fresh noise of the posterior's variance at
every step with t > 0, drawn from the numpy generator passed to `step`. With variance_type "learned_range"
(DeepFloyd IF) the variance is the model's: its output has twice the sample's channels, noise then the
predicted variance v, and the log variance is interpolated between the fixed small and large ones (Nichol &
Dhariwal 2021, eq. 15).
"""

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common
from fd.runtime.schedulers.thresholding import threshold_or_clip

NAME = "ddpm"

# diffusers' DDPMScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")


class DDPMScheduler:
    name = NAME
    order = 1
    stochastic = True
    init_noise_sigma = 1.0
    prediction_types = common.PREDICTION_TYPES

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        common.check_choice(cfg, "variance_type", VARIANCE_TYPES, NAME)
        common.check_choice(cfg, "prediction_type", self.prediction_types, NAME)
        common.check_choice(cfg, "timestep_spacing", common.TIMESTEP_SPACINGS, NAME)
        self.config = cfg
        # the model output must carry the predicted variance (a family whose decoder drops it refuses this)
        self.needs_predicted_variance = cfg["variance_type"] == "learned_range"
        self.alphas_cumprod = common.alphas_cumprod(cfg, NAME)
        self.num_inference_steps = None
        self.timesteps = np.arange(cfg["num_train_timesteps"], dtype=np.int64)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the `num_inference_steps` training timesteps to visit, in descending order."""
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        spacing = self.config["timestep_spacing"]
        ts = common.spaced_timesteps(spacing, n, T, self.config["steps_offset"], np.float64)
        self.timesteps = common.checked_timesteps(ts, T, spacing)
        self.num_inference_steps = n

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """DDPM feeds the sample to the model unscaled."""
        return sample

    def vp_scale(self, timestep=None) -> float:
        """The sample is the variance-preserving latent itself."""
        return 1.0

    def _previous(self, t: int) -> int:
        """The next timestep of the schedule after t, or -1 after the last (diffusers' previous_timestep)."""
        hits = np.flatnonzero(self.timesteps == t)
        if hits.size == 0:
            raise FdError(f"timestep {t} is not in this {len(self.timesteps)}-step schedule; use one of .timesteps")
        i = int(hits[0])
        return -1 if i == len(self.timesteps) - 1 else int(self.timesteps[i + 1])

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """One ancestral step x_t -> x_prev (Ho et al. 2020, eqs. 6-7 at the predicted x0).

        Legend: a = alpha_bar_t, a' = alpha_bar_prev (1 below t = 0), alpha = a / a', beta = 1 - alpha.

            (1) x0 from the model output as in DDIM, dynamically thresholded or clipped if configured
            (2) mean = sqrt(a') beta / (1 - a') x0 + sqrt(alpha) (1 - a') / (1 - a) x_t      [/ (1 - a) both]
            (3) var = max((1 - a') / (1 - a) beta, 1e-20)  [fixed_small]; beta [fixed_large];
                log var = f log beta + (1 - f) log max(...)  with f = (v + 1) / 2        [learned_range]
            (4) x_prev = mean + sqrt(var) noise   (no noise at t = 0)
        """
        if self.num_inference_steps is None:
            raise FdError(f"run set_timesteps(num_inference_steps) on the {NAME} scheduler before step()")
        t = int(timestep)
        prev_t = self._previous(t)
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        predicted_variance = None
        if self.needs_predicted_variance:
            if out.shape[1] != 2 * x.shape[1]:
                raise FdError(f"the ddpm scheduler with variance_type 'learned_range' needs the model's noise and "
                              f"variance ({2 * x.shape[1]} channels), got {out.shape[1]}: use ddim or dpmpp-2m")
            out, predicted_variance = out[:, :x.shape[1]], out[:, x.shape[1]:]
        one = np.float32(1.0)
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else one
        b, b_prev = one - a, one - a_prev
        alpha = a / a_prev
        beta = one - alpha
        pred = self.config["prediction_type"]
        if pred == "epsilon":  # (1)
            x0 = (x - np.sqrt(b) * out) / np.sqrt(a)
        elif pred == "v_prediction":
            x0 = np.sqrt(a) * x - np.sqrt(b) * out
        else:
            x0 = out
        x0 = threshold_or_clip(x0, self.config)
        prev = (np.sqrt(a_prev) * beta / b) * x0 + (np.sqrt(alpha) * b_prev / b) * x  # (2)
        if t > 0:  # (4)
            noise = common.per_step_noise(generator, out.shape, NAME)
            variance = np.maximum(b_prev / b * beta, np.float32(1e-20))  # (3)
            kind = self.config["variance_type"]
            if kind == "learned_range":
                frac = (predicted_variance + one) / np.float32(2.0)
                log_variance = frac * np.log(beta) + (one - frac) * np.log(variance)
                prev = prev + np.exp(np.float32(0.5) * log_variance) * noise
            elif kind == "fixed_small_log":
                prev = prev + np.exp(np.float32(0.5) * np.log(variance)) * noise
            elif kind == "fixed_large":
                prev = prev + np.sqrt(beta) * noise
            else:
                prev = prev + np.sqrt(variance) * noise
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward process q(x_t | x0), per batch element (common.vp_add_noise)."""
        return common.vp_add_noise(self.alphas_cumprod, original, noise, timesteps)
