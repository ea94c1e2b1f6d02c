"""Euler (Karras et al. 2022, Algorithm 2 without churn), equal to diffusers' `EulerDiscreteScheduler.from_config`.

Euler-type schedulers live in "sigma space": their sample is x = x0 + sigma * eps, which is the
variance-preserving latent z (x0 * alpha_t + eps * sigma_t) times sqrt(1 + sigma^2). That is why the
model's input is scaled by 1 / sqrt(1 + sigma^2) (`scale_model_input`) and why prior noise injection
uses `vp_scale` (see runtime/pipeline.py). Their timesteps can be fractional (float32): with linspace
spacing or Karras sigmas they fall between training timesteps, and go to the UNet as they are.
"""

import numpy as np

from fd.runtime.schedulers import common

NAME = "euler"

# diffusers' EulerDiscreteScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


class SigmaSpaceScheduler(common.StepIndex):
    """What Euler and Euler-ancestral share: the sigma schedule, input scaling and the step counter."""

    name = NAME
    order = 1  # model evaluations per step
    stochastic = False
    prediction_types = common.PREDICTION_TYPES

    def _setup(self, cfg: dict) -> None:
        common.check_choice(cfg, "prediction_type", self.prediction_types, self.name)
        common.check_choice(cfg, "timestep_spacing", common.TIMESTEP_SPACINGS, self.name)
        self.config = cfg
        ac = common.alphas_cumprod(cfg, self.name)
        if cfg["rescale_betas_zero_snr"]:
            ac[-1] = 2.0**-24  # zero SNR would make sigma infinite; diffusers nudges it the same way
        self.alphas_cumprod = ac
        self._train_sigmas = common.train_sigmas(ac)
        self.num_inference_steps = None
        self.timesteps = np.arange(cfg["num_train_timesteps"], dtype=np.float32)[::-1].copy()
        self.sigmas = np.append(self._train_sigmas[::-1], np.float32(0.0)).astype(np.float32)
        self.step_index = None

    @property
    def init_noise_sigma(self) -> np.float32:
        """The initial noise's scale: sigma_max, or sqrt(sigma_max^2 + 1) with leading spacing (diffusers' rule)."""
        top = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return top
        return np.sqrt(top * top + np.float32(1.0))

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        ts = common.spaced_timesteps(self.config["timestep_spacing"], n, T, self.config["steps_offset"], np.float32)
        common.checked_timesteps(ts, T, self.config["timestep_spacing"])  # refuses; keeps the fractions
        return ts

    def _interpolated_sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """The training sigmas linearly interpolated at (fractional) timesteps, in float64 as numpy does."""
        return np.interp(timesteps, np.arange(len(self._train_sigmas)), self._train_sigmas)

    def _finish(self, timesteps: np.ndarray, sigmas: np.ndarray, last: float) -> None:
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = np.append(sigmas, last).astype(np.float32)
        self.num_inference_steps = len(self.timesteps)
        self.step_index = None

    def _sigma(self, timestep) -> np.float32:
        return self.sigmas[self._current_index(timestep)]

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """x / sqrt(sigma^2 + 1): the variance-preserving latent z that the UNet was trained on."""
        sigma = self._sigma(timestep)
        x = common.as_f32(sample, "sample")
        return (x / np.sqrt(sigma * sigma + np.float32(1.0))).astype(np.float32, copy=False)

    def vp_scale(self, timestep) -> np.float32:
        """sqrt(1 + sigma_t^2): this scheduler's sample is the variance-preserving latent times this."""
        sigma = self._sigma(timestep)
        return np.sqrt(np.float32(1.0) + sigma * sigma)

    def _x0(self, out: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
        pred = self.config["prediction_type"]
        if pred == "epsilon":
            return x - sigma * out
        if pred == "v_prediction":
            return out * (-sigma / np.sqrt(sigma * sigma + np.float32(1.0))) + (x / (sigma * sigma + np.float32(1.0)))
        return out

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x0 + sigma_t * noise at scheduled timesteps, per batch element."""
        self._require_timesteps()
        x0 = common.as_f32(original, "original")
        noise = common.as_f32(noise, "noise")
        idx = [self.index_for_timestep(t) for t in np.atleast_1d(timesteps).reshape(-1)]
        sigma = common.per_sample(self.sigmas[idx], x0.ndim)
        return (x0 + noise * sigma).astype(np.float32, copy=False)


class EulerDiscreteScheduler(SigmaSpaceScheduler):
    """The deterministic Euler sampler on the model's sigmas (or Karras sigmas)."""

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            if cfg[key]:
                raise common.unsupported(f"{key}=True", NAME, "remove it (fd's euler takes the model's own "
                                         "sigmas or use_karras_sigmas)")
        common.check_choice(cfg, "interpolation_type", ("linear",), NAME)
        common.check_choice(cfg, "timestep_type", ("discrete",), NAME)
        common.check_choice(cfg, "final_sigmas_type", ("zero", "sigma_min"), NAME)
        self._setup(cfg)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (descending, float32) and their sigmas plus a final sigma; resets the step counter."""
        timesteps = self._spaced_timesteps(num_inference_steps)
        sigmas = self._interpolated_sigmas(timesteps)
        cfg = self.config
        if cfg["use_karras_sigmas"]:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = common.karras_sigmas(sigma_max, sigma_min, len(timesteps))
            with np.errstate(divide="ignore"):
                timesteps = common.sigma_to_t(sigmas, np.log(self._train_sigmas))
        ac0 = self.alphas_cumprod[0]
        last = np.sqrt((np.float32(1.0) - ac0) / ac0) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self._finish(timesteps, sigmas, last)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """One Euler step from sigmas[i] to sigmas[i + 1].

        Legend: x = sample at sigma = sigmas[i]; x0 = predicted clean sample; d = dx/dsigma.

            (1) x0 = x - sigma * eps                                          [epsilon]
                x0 = -sigma / sqrt(sigma^2 + 1) * v + x / (sigma^2 + 1)      [v_prediction]
                x0 = model output                                            [sample]
            (2) d = (x - x0) / sigma
            (3) x_next = x + d * (sigmas[i + 1] - sigma)
        """
        i = self._current_index(timestep)
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        sigma = self.sigmas[i]
        x0 = self._x0(out, x, sigma)  # (1)
        derivative = (x - x0) / sigma  # (2)
        prev = x + derivative * (self.sigmas[i + 1] - sigma)  # (3)
        self.step_index = i + 1
        return prev.astype(np.float32, copy=False)
