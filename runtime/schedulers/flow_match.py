"""Flow-matching Euler (SD3, SD3.5, FLUX.1), equal to diffusers' `FlowMatchEulerDiscreteScheduler.from_config`.

Flow-matching models (rectified flow, Esser et al. 2024) are trained on x_s = (1 − s)·x0 + s·ε for s in
[0, 1] and predict the velocity v = ε − x0; the timestep they are given is s·1000. Sampling walks s down
a schedule with Euler steps x ← x + (s_next − s)·v. The schedule is shifted towards noise: SD3 by a
static `shift` (3.0), FLUX.1 by `mu`, which its pipeline computes from the image's token count
("dynamic shifting": s' = e^mu / (e^mu + (1/s − 1))); see `set_timesteps`.

In the variance-preserving frame (z = a·x0 + b·ε, a² + b² = 1) the flow sample is x = z / (a + b) with
s = b / (a + b), so 1 / (a + b) = sqrt((1 − s)² + s²): that is `vp_scale`, which prior noise injection
uses (runtime/pipeline.py), and the VP frame's sigma b / a is s / (1 − s) (`model_sigmas`, which the
guidance interval reads).

The arithmetic follows diffusers' own order and dtypes (float64 where it uses numpy's float64 linspace,
float32 where it uses torch float32) so that the sigmas agree bit for bit.
"""

import math

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common

NAME = "flow-euler"

# diffusers' FlowMatchEulerDiscreteScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"


def is_flow_config(config: dict) -> bool:
    """Whether a scheduler_config.json is a flow-matching one (SD3, FLUX.1), whose models no VP sampler can run."""
    return isinstance(config, dict) and str(config.get("_class_name", "")).startswith("FlowMatch")


def dynamic_shift_mu(image_seq_len: int, config: dict) -> float:
    """FluxPipeline's `calculate_shift`: mu linear in the image's token count, from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (in Python floats, as the pipeline)."""
    cfg = common.resolve_config(config, DEFAULTS)
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return image_seq_len * slope + (cfg["base_shift"] - slope * cfg["base_image_seq_len"])


class FlowMatchEulerDiscreteScheduler(common.StepIndex):
    """The deterministic flow-matching Euler sampler, static or dynamic shift."""

    name = NAME
    order = 1
    stochastic = False
    prediction_types = ("flow",)  # the model predicts the velocity ε − x0
    init_noise_sigma = np.float32(1.0)  # x at s = 1 is the unit noise itself

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling"):
            if cfg[key]:
                raise common.unsupported(f"{key}=True", NAME, "remove it (fd's flow-euler takes the model's shifted "
                                         "sigmas)")
        if cfg["shift_terminal"]:
            raise common.unsupported(f"shift_terminal={cfg['shift_terminal']!r}", NAME, "remove it")
        common.check_choice(cfg, "time_shift_type", ("exponential", "linear"), NAME)
        self.config = cfg
        T = int(cfg["num_train_timesteps"])
        # the training sigmas, as __init__ builds them in float32 torch (statically shifted unless dynamic)
        sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1].copy() / np.float32(T)
        if not cfg["use_dynamic_shifting"]:
            sigmas = self._static_shift(sigmas)
        self.sigma_max, self.sigma_min = float(sigmas[0]), float(sigmas[-1])
        self.num_inference_steps = None
        self.timesteps = sigmas * np.float32(T)
        self.sigmas = sigmas
        self.step_index = None

    def _static_shift(self, sigmas):
        shift = self.config["shift"]
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def _dynamic_shift(self, mu: float, sigmas):
        if self.config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return mu / (mu + (1 / sigmas - 1) ** 1.0)

    def set_timesteps(self, num_inference_steps: int, sigmas=None, mu: float | None = None) -> None:
        """Timesteps (descending, float32, s·1000) and sigmas plus a final 0; resets the step counter.

        `sigmas`: the unshifted schedule a pipeline passes (FluxPipeline: linspace(1, 1/n, n)); None: n points
        from sigma_max to sigma_min (StableDiffusion3Pipeline). `mu`: the dynamic shift (required when the
        config has use_dynamic_shifting; see dynamic_shift_mu)."""
        cfg = self.config
        T = int(cfg["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        if cfg["use_dynamic_shifting"] and mu is None:
            raise FdError("this flow-matching model shifts its schedule by the image size: pass mu to set_timesteps "
                          "(dynamic_shift_mu of the image's token count)")
        if sigmas is None:
            sigmas = np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T  # float64, as diffusers
        else:
            sigmas = np.asarray(sigmas).astype(np.float32)
            if sigmas.shape != (n,):
                raise FdError(f"{sigmas.size} sigmas were given for {n} steps: give one per step")
        sigmas = self._dynamic_shift(mu, sigmas) if cfg["use_dynamic_shifting"] else self._static_shift(sigmas)
        sigmas = np.asarray(sigmas).astype(np.float32)
        self.timesteps = sigmas * np.float32(T)
        self.sigmas = np.append(sigmas, np.float32(0.0))
        self.num_inference_steps = n
        self.step_index = None

    def _sigma(self, timestep) -> np.float32:
        return self.sigmas[self._current_index(timestep)]

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """The model takes x itself (flow pipelines never scale it)."""
        self._current_index(timestep)
        return common.as_f32(sample, "sample")

    def vp_scale(self, timestep) -> np.float32:
        """sqrt((1 − s)² + s²) = 1 / (a + b): the flow sample is the variance-preserving latent times this."""
        s = self._sigma(timestep)
        return np.sqrt((np.float32(1.0) - s) ** 2 + s * s)

    def model_sigmas(self, timesteps) -> np.ndarray:
        """The VP frame's sigma b / a = s / (1 − s) of each scheduled timestep (float64; inf at s = 1)."""
        s = np.asarray(timesteps, np.float64) / self.config["num_train_timesteps"]
        with np.errstate(divide="ignore"):
            return s / (1.0 - s)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """One Euler step of the probability-flow ODE from sigmas[i] to sigmas[i + 1].

        Legend: x = sample at s = sigmas[i]; v = model output, the velocity dx/ds = ε − x0.

            (1) dt = s_next − s
            (2) x_next = x + dt · v
        """
        i = self._current_index(timestep)
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        dt = self.sigmas[i + 1] - self.sigmas[i]  # (1)
        prev = x + dt * out  # (2)
        self.step_index = i + 1
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """diffusers' scale_noise: s·noise + (1 − s)·x0 at scheduled timesteps, per batch element."""
        self._require_timesteps()
        x0 = common.as_f32(original, "original")
        noise = common.as_f32(noise, "noise")
        idx = [self.index_for_timestep(t) for t in np.atleast_1d(timesteps).reshape(-1)]
        s = common.per_sample(self.sigmas[idx], x0.ndim)
        return (s * noise + (np.float32(1.0) - s) * x0).astype(np.float32, copy=False)
