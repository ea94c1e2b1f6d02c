"""PLMS (PNDM with skip_prk_steps), equal to diffusers' `PNDMScheduler.from_config(config, skip_prk_steps=True)`.

Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models": a linear multistep method (Adams-
Bashforth up to 4th order) on the noise predictions, with the DDIM-like transfer step of eq. 11.
Stable Diffusion 1.x ships this as its default scheduler.

PLMS evaluates the model once more than it steps: for N steps its `timesteps` hold N + 1 entries, the
second timestep twice. The second evaluation there re-runs the first step with the averaged noise (a
Heun-like start, since there is no history yet). The pipeline loops over `timesteps`, as diffusers does.
"""

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common

NAME = "pndm"

# diffusers' PNDMScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}


class PNDMScheduler:
    name = NAME
    order = 1
    stochastic = False
    init_noise_sigma = 1.0
    prediction_types = ("epsilon", "v_prediction")

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        if not cfg["skip_prk_steps"]:
            raise common.unsupported("skip_prk_steps=False", NAME, "fd runs PLMS only: set skip_prk_steps to true "
                                     "(Stable Diffusion's own configs do)")
        common.check_choice(cfg, "prediction_type", self.prediction_types, NAME)
        common.check_choice(cfg, "timestep_spacing", common.TIMESTEP_SPACINGS, NAME)
        self.config = cfg
        self.alphas_cumprod = common.alphas_cumprod(cfg, NAME)
        self.final_alpha_cumprod = np.float32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = None
        self._reset()

    def _reset(self) -> None:
        self.ets = []  # the noise predictions of past steps, newest last (at most 4 kept)
        self.counter = 0  # model evaluations so far
        self.cur_sample = None  # the first step's starting sample, reused by its second evaluation

    def set_timesteps(self, num_inference_steps: int) -> None:
        """N steps' timesteps, descending, with the second one repeated (N + 1 evaluations); resets the history."""
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        spacing, offset = self.config["timestep_spacing"], int(self.config["steps_offset"])
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()
        elif spacing == "leading":
            ts = (np.arange(n) * (T // n)).round() + offset
        else:
            ts = np.round(np.arange(T, 0, -T / n))[::-1] - 1
        ts = common.checked_timesteps(ts, T, spacing)  # ascending here
        self.timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        self.num_inference_steps = n
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """PLMS feeds the sample to the model unscaled."""
        return sample

    def vp_scale(self, timestep=None) -> float:
        """The sample is the variance-preserving latent itself."""
        return 1.0

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """One PLMS evaluation (Liu et al. 2022, eq. 12 with the transfer of eq. 11).

        Legend: e_k = the noise prediction k evaluations ago (e_0 = this one); delta = T // N.

            first step, 1st evaluation:  e' = e_0, remember x                  t -> t - delta
            first step, 2nd evaluation:  e' = (e_0 + e_1) / 2, from the remembered x
            then:   e' = (3 e_0 - e_1) / 2                   (2nd order)
                    e' = (23 e_0 - 16 e_1 + 5 e_2) / 12       (3rd order)
                    e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24   (4th order)
            transfer (eq. 11), a = alpha_bar_t, a' = alpha_bar_{t - delta} (or the final alpha below 0):
                    x' = sqrt(a' / a) x - (a' - a) e' / (a sqrt(1 - a') + sqrt(a (1 - a) a'))
        v_prediction outputs are turned into noise in the transfer: e' <- sqrt(a) e' + sqrt(1 - a) x.
        """
        if self.timesteps is None:
            raise FdError(f"run set_timesteps(num_inference_steps) on the {NAME} scheduler before step()")
        # Like diffusers, PLMS counts evaluations and trusts the timestep it is given: image to image starts
        # part-way down `timesteps`.
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        t = int(timestep)
        delta = int(self.config["num_train_timesteps"]) // self.num_inference_steps
        prev_t = t - delta
        if self.counter != 1:
            self.ets = self.ets[-3:] + [out]
        else:  # the first step again, from where it started
            prev_t, t = t, t + delta
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            e = out
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            e = (out + ets[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev = self._transfer(x, t, prev_t, e)
        self.counter += 1
        return prev.astype(np.float32, copy=False)

    def _transfer(self, x: np.ndarray, t: int, prev_t: int, e: np.ndarray) -> np.ndarray:
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        one = np.float32(1.0)
        if self.config["prediction_type"] == "v_prediction":
            e = np.sqrt(a) * e + np.sqrt(one - a) * x
        sample_coeff = np.sqrt(a_prev / a)
        denom = a * np.sqrt(one - a_prev) + np.sqrt(a * (one - a) * a_prev)
        return sample_coeff * x - (a_prev - a) * e / denom

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward process q(x_t | x0), per batch element (common.vp_add_noise)."""
        return common.vp_add_noise(self.alphas_cumprod, original, noise, timesteps)
