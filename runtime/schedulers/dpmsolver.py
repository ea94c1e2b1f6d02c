"""DPM-Solver++ 2M, numerically equal to diffusers' `DPMSolverMultistepScheduler.from_config(config)`.

Only the deterministic data-prediction solver of order 2 is implemented (algorithm_type "dpmsolver++",
solver_order 2, midpoint or heun), on the model's own discrete sigmas or on Karras sigmas
(use_karras_sigmas; fd's `dpmpp-2m-karras` sets it, `dpmpp-2m` clears it).
"""

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common
from fd.runtime.schedulers.thresholding import dynamic_threshold

NAME = "dpmpp-2m"

# diffusers' DPMSolverMultistepScheduler.__init__ defaults, key for key.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

_NOT_SIGMAS = "remove it, fd steps on the model's own discrete sigmas or Karras sigmas (dpmpp-2m-karras)"


def _validate(cfg: dict) -> None:
    name = f"{NAME}-karras" if cfg["use_karras_sigmas"] else NAME
    # Names other diffusers solvers use for their own variants; diffusers maps them to ours.
    if cfg["algorithm_type"] == "deis":
        cfg["algorithm_type"] = "dpmsolver++"
    if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
        cfg["solver_type"] = "midpoint"
    if cfg["algorithm_type"] != "dpmsolver++":
        raise common.unsupported(f"algorithm_type={cfg['algorithm_type']!r}", name, "use 'dpmsolver++'")
    if cfg["solver_order"] != 2:
        raise common.unsupported(
            f"solver_order={cfg['solver_order']!r}", name, "use 2 (or the ddim scheduler)"
        )
    common.check_choice(cfg, "solver_type", ("midpoint", "heun"), name)
    common.check_choice(cfg, "prediction_type", common.PREDICTION_TYPES, name)
    common.check_choice(cfg, "timestep_spacing", common.TIMESTEP_SPACINGS, name)
    common.check_choice(cfg, "final_sigmas_type", ("zero", "sigma_min"), name)
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "use_flow_sigmas", "use_dynamic_shifting"):
        if cfg[key]:
            raise common.unsupported(f"{key}=True", name, _NOT_SIGMAS)
    # A learned-variance model (DiT) predicts noise and a variance; DPM-Solver uses the noise alone, and fd's
    # denoiser graphs already return only that (the variance channels are dropped inside the decoder), so
    # "learned"/"learned_range" need nothing here. diffusers instead slices the first 3 channels (DeepFloyd IF's).
    if cfg["variance_type"] not in (None, "learned", "learned_range"):
        raise common.unsupported(f"variance_type={cfg['variance_type']!r}", name,
                                 "use none, learned or learned_range (fd steps on the predicted noise)")


_alpha_sigma, _lam = common.alpha_sigma, common.half_log_snr


class DPMSolverMultistepScheduler:
    """Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Algorithm 2) of order 2."""

    name = NAME
    order = 1  # model evaluations per step
    stochastic = False
    init_noise_sigma = 1.0
    prediction_types = common.PREDICTION_TYPES

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        _validate(cfg)
        self.name = f"{NAME}-karras" if cfg["use_karras_sigmas"] else NAME
        self.config = cfg
        ac = common.alphas_cumprod(cfg, NAME)
        if cfg["rescale_betas_zero_snr"]:
            ac[-1] = 2.0**-24  # zero SNR would make sigma infinite; diffusers nudges it the same way
        self.alphas_cumprod = ac
        self._train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
        with np.errstate(divide="ignore"):
            self._lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        self.num_inference_steps = None
        self.timesteps = np.arange(cfg["num_train_timesteps"], dtype=np.int64)[::-1].copy()
        self.sigmas = None
        self._reset()

    def _reset(self) -> None:
        self.model_outputs = [None, None]  # x0 predictions of the previous and current step
        self.lower_order_nums = 0  # how many steps have run, capped at the solver order
        self.step_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (descending) and their sigmas, plus a final sigma; resets the history."""
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        if self.config["use_karras_sigmas"]:
            self.timesteps, sigmas = self._karras_schedule(n)
        else:
            self.timesteps = self._spaced_timesteps(n)
            sigmas = self._train_sigmas[self.timesteps]
        final = self._train_sigmas[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, np.float32(final)).astype(np.float32)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        T = int(self.config["num_train_timesteps"])
        # lambda_min_clipped cuts off the noisiest timesteps, whose log-SNR is below the threshold.
        clipped = int(np.searchsorted(self._lambdas[::-1], np.float32(self.config["lambda_min_clipped"])))
        last = T - clipped
        spacing = self.config["timestep_spacing"]
        # linspace and leading lay out n + 1 points and drop the one at t = 0 (its sigma is ~0).
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1] + int(self.config["steps_offset"])
        else:  # trailing
            ts = np.arange(last, 0, -T / n).round() - 1
        return common.checked_timesteps(ts, T, spacing)

    def _karras_schedule(self, n: int):
        """Karras et al.'s sigmas between the model's smallest and largest sigma, and as each step's timestep
        the training timestep of its sigma (rounded, or for cosine betas truncated, as diffusers does)."""
        sigmas = common.karras_sigmas(float(self._train_sigmas[-1]), float(self._train_sigmas[0]), n)
        ts = common.sigma_to_t(sigmas, np.log(self._train_sigmas))
        if self.config["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
        ts = common.checked_timesteps(ts, int(self.config["num_train_timesteps"]), "karras")
        if n > 1 and ts[0] == ts[1]:
            # diffusers would start on the second copy and run off the end of its sigmas
            raise FdError(f"Karras sigmas for {n} steps start with timestep {ts[0]} twice on this model's "
                          "schedule (diffusers cannot run it either); use the dpmpp-2m scheduler")
        return ts, sigmas

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """DPM-Solver feeds the sample to the model unscaled; kept for a uniform scheduler interface."""
        return sample

    def vp_scale(self, timestep=None) -> float:
        """The sample is the variance-preserving latent itself."""
        return 1.0

    def _index_of(self, timestep: int) -> int:
        hits = np.flatnonzero(self.timesteps == timestep)
        if hits.size == 0:
            raise FdError(
                f"timestep {timestep} is not in this {len(self.timesteps)}-step schedule; use one of .timesteps"
            )
        # diffusers takes the second match of a repeated timestep (img2img may start on the first).
        return int(hits[1] if hits.size > 1 else hits[0])

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, generator=None) -> np.ndarray:
        """One DPM-Solver++(2M) step from sigmas[i] to sigmas[i + 1].

        Legend: sigma = sqrt((1 - a) / a) for alpha_bar a; alpha_t = 1 / sqrt(1 + sigma^2) and
        sigma_t = sigma * alpha_t; lambda = log(alpha_t / sigma_t) (half log-SNR); s0 = this step,
        s1 = the previous step, t = the target; x = sample; m0, m1 = the x0 predictions at s0, s1.

            (1) m0 = (x - sigma_s0 * eps) / alpha_s0        [epsilon]
                m0 = alpha_s0 * x - sigma_s0 * v            [v_prediction]
                m0 = model output                           [sample]
                m0 = dynamic_threshold(m0)                  [thresholding]
            (2) h = lambda_t - lambda_s0,  h0 = lambda_s0 - lambda_s1,  r0 = h0 / h
            (3) first order (DDIM):  x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0
            (4) D0 = m0,  D1 = (m0 - m1) / r0
            (5) midpoint:  x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) (D0 + D1 / 2)
                heun:      x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) D0
                                 + alpha_t ((e^-h - 1) / h + 1) D1

        (3) is used for the first step (no m1 yet) and for the last step when the final sigma is 0,
        when euler_at_final is set, or when lower_order_final is set and there are under 15 steps
        (a second-order step into sigma = 0 is unstable). diffusers' "lower_order_second" rule only
        changes a third-order solver, so it has no effect at order 2.
        """
        if self.sigmas is None:
            raise FdError("run set_timesteps(num_inference_steps) on the dpmpp-2m scheduler before step()")
        t = int(timestep)
        if self.step_index is None:
            self.step_index = self._index_of(t)
        i, n = self.step_index, self.num_inference_steps
        if i >= n:
            raise FdError(f"step called {n + 1} times for a {n}-step schedule; run set_timesteps again")
        if t != self.timesteps[i]:
            raise FdError(
                f"step got timestep {t} but expected {int(self.timesteps[i])}; step in order over timesteps"
            )
        cfg = self.config
        last_first_order = i == n - 1 and (
            cfg["euler_at_final"]
            or (cfg["lower_order_final"] and n < 15)
            or cfg["final_sigmas_type"] == "zero"
        )
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        if cfg["variance_type"] in ("learned", "learned_range") and out.shape[1] == 2 * x.shape[1]:
            out = out[:, :x.shape[1]]  # noise and variance given (as diffusers takes IF's): the noise alone

        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        if cfg["prediction_type"] == "epsilon":  # (1)
            m0 = (x - sigma_s0 * out) / alpha_s0
        elif cfg["prediction_type"] == "v_prediction":
            m0 = alpha_s0 * x - sigma_s0 * out
        else:
            m0 = out
        if cfg["thresholding"]:  # pixel-space models (DeepFloyd IF): diffusers thresholds the data prediction
            m0 = dynamic_threshold(m0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        self.model_outputs = [self.model_outputs[1], m0]

        lam_s0 = _lam(alpha_s0, sigma_s0)
        h = _lam(alpha_t, sigma_t) - lam_s0  # (2)
        decay = np.exp(-h) - np.float32(1.0)  # e^-h - 1
        if self.lower_order_nums < 1 or last_first_order:  # (3)
            prev = (sigma_t / sigma_s0) * x - (alpha_t * decay) * m0
        else:
            m1 = self.model_outputs[0]
            alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
            with np.errstate(divide="ignore"):  # h = 0 when a final sigma_min repeats the last sigma (as diffusers)
                r0 = (lam_s0 - _lam(alpha_s1, sigma_s1)) / h
            d1 = (np.float32(1.0) / r0) * (m0 - m1)  # (4)
            prev = (sigma_t / sigma_s0) * x - (alpha_t * decay) * m0  # (5)
            if cfg["solver_type"] == "midpoint":
                prev = prev - np.float32(0.5) * (alpha_t * decay) * d1
            else:
                prev = prev + (alpha_t * (decay / h + np.float32(1.0))) * d1
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.step_index = i + 1
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward process at scheduled timesteps: alpha_t * x0 + sigma_t * noise, per batch element."""
        if self.sigmas is None:
            raise FdError(
                "run set_timesteps(num_inference_steps) on the dpmpp-2m scheduler before add_noise()"
            )
        x0 = common.as_f32(original, "original")
        noise = common.as_f32(noise, "noise")
        idx = [self._index_of(int(t)) for t in np.atleast_1d(timesteps).reshape(-1)]
        alpha, sigma = _alpha_sigma(self.sigmas[idx])
        alpha, sigma = common.per_sample(alpha, x0.ndim), common.per_sample(sigma, x0.ndim)
        return (alpha * x0 + sigma * noise).astype(np.float32, copy=False)
