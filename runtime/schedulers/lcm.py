"""LCM (Luo et al. 2023, latent consistency models), equal to diffusers' `LCMScheduler.from_config` given the same noise.

For LCM-distilled models and LCM-LoRA at 2-8 steps. Each step jumps to the consistency function's
estimate of the clean sample and, except at the last step, noises it back to the next timestep with
fresh noise from the numpy generator passed to `step`.
"""

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common

NAME = "lcm"
SIGMA_DATA = 0.5  # the consistency boundary condition's data scale (Song et al. 2023)

# diffusers' LCMScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


class LCMScheduler(common.StepIndex):
    name = NAME
    order = 1
    stochastic = True
    init_noise_sigma = 1.0
    prediction_types = common.PREDICTION_TYPES

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        if cfg["thresholding"]:
            raise common.unsupported("thresholding=True", NAME, "set thresholding to false")
        common.check_choice(cfg, "prediction_type", self.prediction_types, NAME)
        self.config = cfg
        self.alphas_cumprod = common.alphas_cumprod(cfg, NAME)
        self.final_alpha_cumprod = np.float32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = np.arange(cfg["num_train_timesteps"], dtype=np.int64)[::-1].copy()
        self.step_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """N of the distillation schedule's `original_inference_steps` timesteps, evenly picked, descending."""
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        original = int(self.config["original_inference_steps"])
        if not 1 <= original <= T:
            raise FdError(f"original_inference_steps={original} is out of range for the lcm scheduler; use 1..{T}")
        if n > original:
            raise FdError(f"the lcm scheduler runs at most {original} steps (the model's original_inference_steps), "
                          f"got {n}: use fewer steps")
        k = T // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]  # the distillation schedule, descending
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.int64)
        self.num_inference_steps = n
        self.step_index = None

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """LCM feeds the sample to the model unscaled."""
        return sample

    def vp_scale(self, timestep=None) -> float:
        """The sample is the variance-preserving latent itself."""
        return 1.0

    def _boundary_scalings(self, t: int):
        """c_skip, c_out of the consistency boundary condition at timestep t (scaled by timestep_scaling)."""
        scaled = np.float32(t) * np.float32(self.config["timestep_scaling"])
        sd2 = np.float32(SIGMA_DATA**2)
        c_skip = sd2 / (scaled * scaled + sd2)
        c_out = scaled / np.sqrt(scaled * scaled + sd2)
        return c_skip, c_out

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """One LCM step from t = timesteps[i] to t' = timesteps[i + 1].

            (1) x0 from the model output as in DDIM (epsilon, v_prediction or sample), clipped if configured
            (2) denoised = c_out(t) x0 + c_skip(t) x
            (3) x' = sqrt(a_t') denoised + sqrt(1 - a_t') noise      (the last step returns denoised)
        """
        i = self._current_index(timestep)
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        t = int(timestep)
        last = i == self.num_inference_steps - 1
        prev_t = t if last else int(self.timesteps[i + 1])
        one = np.float32(1.0)
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self._boundary_scalings(t)
        pred = self.config["prediction_type"]
        if pred == "epsilon":  # (1)
            x0 = (x - np.sqrt(one - a) * out) / np.sqrt(a)
        elif pred == "v_prediction":
            x0 = np.sqrt(a) * x - np.sqrt(one - a) * out
        else:
            x0 = out
        if self.config["clip_sample"]:
            r = np.float32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        denoised = c_out * x0 + c_skip * x  # (2)
        if last:
            prev = denoised
        else:  # (3)
            noise = common.per_step_noise(generator, out.shape, NAME)
            prev = np.sqrt(a_prev) * denoised + np.sqrt(one - a_prev) * noise
        self.step_index = i + 1
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward process q(x_t | x0), per batch element (common.vp_add_noise)."""
        return common.vp_add_noise(self.alphas_cumprod, original, noise, timesteps)
