"""UniPC (Zhao et al. 2023), bh2 of order 2, equal to diffusers' `UniPCMultistepScheduler.from_config(config)`.

A predictor (UniP) and a corrector (UniC) on the data prediction x0, in half log-SNR lambda. The
corrector of step i refines the sample x_i that step i - 1 predicted, using the model output at x_i;
it replaces the given sample by that refinement, so the history (last sample, past x0 predictions)
lives in the scheduler and runs exactly as in normal sampling whatever calls the UNet.
"""

import numpy as np

from fd.runtime.schedulers import common

NAME = "unipc"

# diffusers' UniPCMultistepScheduler.__init__ defaults, key for key.
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
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
}

_OWN_SIGMAS = "remove it, fd's unipc steps on the model's own discrete sigmas"


def _validate(cfg: dict) -> None:
    if cfg["solver_type"] in ("midpoint", "heun", "logrho"):  # other solvers' names; diffusers maps them so
        cfg["solver_type"] = "bh2"
    common.check_choice(cfg, "solver_type", ("bh2",), NAME)  # bh1's last step into sigma 0 is NaN in diffusers
    if cfg["solver_order"] != 2:
        raise common.unsupported(f"solver_order={cfg['solver_order']!r}", NAME, "use 2 (UniPC's default)")
    if not cfg["predict_x0"]:
        raise common.unsupported("predict_x0=False", NAME, "use the data-prediction form (predict_x0 true)")
    if cfg["thresholding"]:
        raise common.unsupported("thresholding=True", NAME, "set thresholding to false")
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                "use_dynamic_shifting"):
        if cfg[key]:
            raise common.unsupported(f"{key}=True", NAME, _OWN_SIGMAS)
    for key in ("solver_p", "shift_terminal"):
        if cfg[key] is not None:
            raise common.unsupported(f"{key}={cfg[key]!r}", NAME, "remove it")
    common.check_choice(cfg, "prediction_type", common.PREDICTION_TYPES, NAME)
    common.check_choice(cfg, "timestep_spacing", common.TIMESTEP_SPACINGS, NAME)
    common.check_choice(cfg, "final_sigmas_type", ("zero", "sigma_min"), NAME)
    if not cfg["lower_order_final"] and cfg["final_sigmas_type"] == "zero":
        raise common.unsupported("lower_order_final=False", NAME, "its last second-order step into sigma 0 is NaN "
                                 "(in diffusers too): keep lower_order_final true, or set final_sigmas_type sigma_min")


class UniPCMultistepScheduler(common.StepIndex):
    name = NAME
    order = 1
    stochastic = False
    init_noise_sigma = 1.0
    prediction_types = common.PREDICTION_TYPES

    def __init__(self, config: dict):
        cfg = common.resolve_config(config, DEFAULTS)
        _validate(cfg)
        self.config = cfg
        ac = common.alphas_cumprod(cfg, NAME)
        if cfg["rescale_betas_zero_snr"]:
            ac[-1] = 2.0**-24  # as diffusers: zero SNR would make sigma infinite
        self.alphas_cumprod = ac
        self._train_sigmas = common.train_sigmas(ac)
        self.num_inference_steps = None
        self.timesteps = np.arange(cfg["num_train_timesteps"], dtype=np.int64)[::-1].copy()
        self.sigmas = None
        self._reset()

    def _reset(self) -> None:
        self.model_outputs = [None, None]  # x0 predictions of the previous and current step
        self.lower_order_nums = 0
        self.last_sample = None  # the sample the last predictor started from (for the corrector)
        self.this_order = None
        self.step_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (descending) and their sigmas plus a final sigma; resets the history."""
        T = int(self.config["num_train_timesteps"])
        n = common.check_num_steps(num_inference_steps, T)
        spacing = self.config["timestep_spacing"]
        # linspace and leading lay out n + 1 points and drop the one at t = 0.
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + int(self.config["steps_offset"])
        else:
            ts = np.arange(T, 0, -T / n).round() - 1
        self.timesteps = common.checked_timesteps(ts, T, spacing)
        sigmas = np.interp(self.timesteps, np.arange(T), self._train_sigmas)
        ac0 = self.alphas_cumprod[0]
        last = np.sqrt((np.float32(1.0) - ac0) / ac0) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, last).astype(np.float32)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """UniPC feeds the sample to the model unscaled."""
        return sample

    def vp_scale(self, timestep=None) -> float:
        """The sample is the variance-preserving latent itself."""
        return 1.0

    def _alpha_sigma_lambda(self, i: int):
        alpha, sigma = common.alpha_sigma(self.sigmas[i])
        return alpha, sigma, common.half_log_snr(alpha, sigma)

    def _x0(self, out: np.ndarray, x: np.ndarray, i: int) -> np.ndarray:
        alpha, sigma = common.alpha_sigma(self.sigmas[i])
        pred = self.config["prediction_type"]
        if pred == "epsilon":
            return (x - sigma * out) / alpha
        if pred == "v_prediction":
            return alpha * x - sigma * out
        return out

    def _phis(self, h):
        """hh = -h (data prediction), h_phi_1 = e^hh - 1, B(h) = e^hh - 1 (bh2), and the b vector's first two terms."""
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - np.float32(1.0)
        b1 = h_phi_k * np.float32(1.0) / b_h
        h_phi_k = h_phi_k / hh - np.float32(0.5)
        b2 = h_phi_k * np.float32(2.0) / b_h
        return h_phi_1, b_h, b1, b2

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        """Correct the sample with this step's model output (UniC), then predict the next one (UniP).

        Legend: m_k = x0 prediction k steps ago (m_0 this step's); lambda = log(alpha_t / sigma_t);
        h = lambda_target - lambda_start; r = (lambda_previous - lambda_start) / h;
        D1 = (m_1 - m_0) / r; hh = -h, phi = e^hh - 1, B = phi (bh2).

            UniC (step i > 0, from x_{i-1} at s0 = i - 1 to t = i, order p of the last predictor):
                x_i = (sigma_t / sigma_s0) x_{i-1} - alpha_t phi m_{s0}
                      - alpha_t B (rho_0 D1 [p = 2] + rho_c (m_i - m_{s0}))
                with rho = 1/2 for p = 1, else R rho = b for R = [[1, 1], [r, 1]], b_k = k! phi_k(hh) / B
            UniP (from x_i at s0 = i to t = i + 1, order min(2, steps so far, steps left)):
                x_{i+1} = (sigma_t / sigma_s0) x_i - alpha_t phi m_0 - alpha_t B (D1 / 2  [order 2])
        """
        i = self._current_index(timestep)
        out = common.as_f32(model_output, "model_output")
        x = common.as_f32(sample, "sample")
        m_now = self._x0(out, x, i)
        if i > 0 and (i - 1) not in self.config["disable_corrector"] and self.last_sample is not None:
            x = self._correct(m_now, i)
        self.model_outputs = [self.model_outputs[1], m_now]
        order = min(2, len(self.timesteps) - i) if self.config["lower_order_final"] else 2
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = x
        prev = self._predict(x, i)
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.step_index = i + 1
        return prev.astype(np.float32, copy=False)

    def _predict(self, x: np.ndarray, i: int) -> np.ndarray:
        alpha_s0, sigma_s0, lam_s0 = self._alpha_sigma_lambda(i)
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(i + 1)
        h = lam_t - lam_s0
        m0 = self.model_outputs[1]
        h_phi_1, b_h, _, _ = self._phis(h)
        prev = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
        if self.this_order == 2:
            _, _, lam_s1 = self._alpha_sigma_lambda(i - 1)
            rk = (lam_s1 - lam_s0) / h
            d1 = (self.model_outputs[0] - m0) / rk
            prev = prev - (alpha_t * b_h) * (np.float32(0.5) * d1)
        return prev

    def _correct(self, m_now: np.ndarray, i: int) -> np.ndarray:
        """UniC: x_i again from x_{i-1}, now knowing the model output at x_i."""
        alpha_s0, sigma_s0, lam_s0 = self._alpha_sigma_lambda(i - 1)
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(i)
        h = lam_t - lam_s0
        m0 = self.model_outputs[1]
        h_phi_1, b_h, b1, b2 = self._phis(h)
        x = (sigma_t / sigma_s0) * self.last_sample - (alpha_t * h_phi_1) * m0
        d1_t = m_now - m0
        if self.this_order == 1:
            corr = np.float32(0.5) * d1_t
        else:
            _, _, lam_s1 = self._alpha_sigma_lambda(i - 2)
            rk = (lam_s1 - lam_s0) / h
            d1 = (self.model_outputs[0] - m0) / rk
            # R rho = b with R = [[1, 1], [rk, 1]]: a 2x2 solve, in float64 then rounded like diffusers' float32.
            rho0 = (np.float64(b1) - np.float64(b2)) / (1.0 - np.float64(rk))
            rho1 = np.float64(b1) - rho0
            corr = np.float32(rho0) * d1 + np.float32(rho1) * d1_t
        return x - (alpha_t * b_h) * corr

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward process at scheduled timesteps: alpha_t * x0 + sigma_t * noise, per batch element."""
        self._require_timesteps()
        x0 = common.as_f32(original, "original")
        noise = common.as_f32(noise, "noise")
        idx = [self.index_for_timestep(int(t)) for t in np.atleast_1d(timesteps).reshape(-1)]
        alpha, sigma = common.alpha_sigma(self.sigmas[idx])
        alpha, sigma = common.per_sample(alpha, x0.ndim), common.per_sample(sigma, x0.ndim)
        return (alpha * x0 + sigma * noise).astype(np.float32, copy=False)
