"""Pieces every scheduler needs: config resolution, the float32 noise schedule, sigma schedules.

The numbers must match what diffusers builds with float32 torch on the CPU, bit for bit where that is
cheap, so two torch behaviours are reproduced on purpose (see `_linspace_f32` and `_cumprod_f32`).
"""

import math

import numpy as np

from fd.runtime.errors import FdError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def resolve_config(config: dict, defaults: dict) -> dict:
    """Like diffusers' `from_config`: keep the keys this class knows, default the rest.

    Keys starting with "_" and keys of other scheduler classes are ignored. A config taken from a live
    diffusers scheduler lists in "_use_default_values" the keys that were never really set; diffusers
    drops those so the new class's own defaults win, and so do we.
    """
    if not isinstance(config, dict):
        raise FdError(f"scheduler config must be a dict (scheduler_config.json), got {type(config).__name__}")
    defaulted = set(config.get("_use_default_values") or ())
    resolved = dict(defaults)
    for key, value in config.items():
        if key in defaults and key not in defaulted:
            resolved[key] = value
    return resolved


def unsupported(option: str, scheduler: str, hint: str) -> FdError:
    return FdError(f"{option} is not supported by fd's {scheduler} scheduler; {hint}")


def check_choice(cfg: dict, key: str, allowed: tuple, scheduler: str) -> None:
    if cfg[key] not in allowed:
        raise unsupported(f"{key}={cfg[key]!r}", scheduler, f"use one of {', '.join(allowed)}")


def check_num_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise FdError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise FdError(
            f"num_inference_steps={num_inference_steps} is out of range; use 1..{num_train_timesteps} "
            "(the model's num_train_timesteps)"
        )
    return int(num_inference_steps)


def checked_timesteps(ts: np.ndarray, num_train_timesteps: int, spacing: str) -> np.ndarray:
    """The schedule as int64, refusing one that leaves 0..T-1 (diffusers would index past its table)."""
    ts = ts.astype(np.int64)
    bad = ts[(ts < 0) | (ts >= num_train_timesteps)]
    if bad.size:
        raise FdError(
            f"{spacing!r} timestep spacing for this many steps reaches t={int(bad[0])}, outside the model's "
            f"0..{num_train_timesteps - 1}; use fewer steps or another timestep_spacing"
        )
    return ts


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on the CPU, exactly.

    torch rounds the endpoints and the step to float32, then evaluates each point in double from the
    nearer end; np.linspace(...).astype(float32) is off by one ulp in roughly a third of the entries.
    """
    lo, hi = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([lo], dtype=np.float32)
    step = np.float64((hi - lo) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    from_start = np.float64(lo) + step * i
    from_end = np.float64(hi) - step * (n - 1 - i)
    return np.where(i < n // 2, from_start, from_end).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on a float32 CPU tensor: it accumulates in double and rounds each output."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's squared-cosine alpha-bar, discretised to betas (computed in double)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has zero SNR."""
    sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab * sqrt_ab
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod(cfg: dict, scheduler: str) -> np.ndarray:
    """alpha_bar_t for t = 0..num_train_timesteps-1 (float32), from the config's beta schedule."""
    n = int(cfg["num_train_timesteps"])
    if n < 1:
        raise FdError(f"num_train_timesteps must be at least 1, got {n}")
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64).astype(np.float32)
        if betas.shape != (n,):
            raise FdError(f"trained_betas has {betas.size} values but num_train_timesteps is {n}")
    elif cfg["beta_schedule"] == "linear":
        betas = _linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        betas = _linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise unsupported(
            f"beta_schedule={cfg['beta_schedule']!r}", scheduler,
            f"use one of {', '.join(BETA_SCHEDULES)} or give trained_betas",
        )
    if cfg.get("rescale_betas_zero_snr"):  # PNDM has no such option
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod_f32(np.float32(1.0) - betas)


def as_f32(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise FdError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def per_sample(coef: np.ndarray, ndim: int) -> np.ndarray:
    """Shape per-timestep coefficients (B,) as (B, 1, 1, ...) so they broadcast over a batch."""
    coef = coef.reshape(-1)
    return coef.reshape(coef.shape + (1,) * max(ndim - 1, 0))


class GivenNoise:
    """Per-step noise the caller gives (Request.step_noise; tests feed diffusers' own): the arrays in order, one
    per step that draws noise."""

    def __init__(self, arrays):
        self.arrays, self.used = [np.asarray(a, dtype=np.float32) for a in arrays], 0

    def standard_normal(self, shape, dtype=np.float32) -> np.ndarray:
        if self.used >= len(self.arrays):
            raise FdError(f"step_noise holds {len(self.arrays)} arrays, but the scheduler draws noise more often: "
                          "give one per step that adds noise")
        noise = self.arrays[self.used]
        if noise.shape != tuple(shape):
            raise FdError(f"step_noise[{self.used}] has shape {noise.shape}, the step needs {tuple(shape)}")
        self.used += 1
        return noise.astype(dtype, copy=False)


def per_step_noise(generator, shape: tuple, scheduler: str) -> np.ndarray:
    """Unit Gaussian noise for one stochastic step, drawn from the caller's seeded numpy generator (or given)."""
    if isinstance(generator, GivenNoise):
        return generator.standard_normal(shape, dtype=np.float32)
    if not isinstance(generator, np.random.Generator):
        raise FdError(f"the {scheduler} scheduler adds fresh noise at each step: pass generator="
                      "np.random.default_rng(seed) to step()")
    return generator.standard_normal(shape, dtype=np.float32)


def spaced_timesteps(spacing: str, n: int, T: int, steps_offset: int, dtype=np.int64) -> np.ndarray:
    """The n timesteps (descending) of the plain spacings that DDPM, DDIM-like and Euler-type schedulers share.

    linspace: n points from 0 to T-1; leading: multiples of T // n from 0, plus steps_offset;
    trailing: counting down from T by T / n, minus one. Computed in float64 unless `dtype` is float32,
    where linspace is laid out in float32 as Euler's schedulers do (it gives fractional timesteps).
    """
    if spacing == "linspace":
        if dtype == np.float32:
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1] + int(steps_offset)
    else:
        ts = np.arange(T, 0, -T / n).round() - 1
    return ts.astype(dtype)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep (float32, ascending in t)."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma, as diffusers."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5): n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def alpha_sigma(s):
    """From sigma = sigma_t / alpha_t (with alpha_t^2 + sigma_t^2 = 1) back to (alpha_t, sigma_t)."""
    alpha = np.float32(1.0) / np.sqrt(s * s + np.float32(1.0))
    return alpha, s * alpha


def half_log_snr(alpha, sigma):
    """lambda = log(alpha_t / sigma_t); +inf at sigma = 0 (the very end), where exp(-h) = 0."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


class StepIndex:
    """diffusers' step counter: set on the first scale_model_input/step from the timestep, then +1 per step.

    A repeated timestep resolves to its second occurrence, as diffusers does (img2img may start on the first).
    """

    step_index = None
    name = "?"

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise FdError(f"run set_timesteps(num_inference_steps) on the {self.name} scheduler first")

    def index_for_timestep(self, timestep) -> int:
        hits = np.flatnonzero(self.timesteps == timestep)
        if hits.size == 0:
            raise FdError(f"timestep {timestep} is not in this {len(self.timesteps)}-step schedule; "
                          "use one of .timesteps")
        return int(hits[1] if hits.size > 1 else hits[0])

    def _current_index(self, timestep) -> int:
        self._require_timesteps()
        if self.step_index is None:
            self.step_index = self.index_for_timestep(timestep)
        if self.step_index >= len(self.timesteps):
            raise FdError(f"step called {self.step_index + 1} times for a {len(self.timesteps)}-step schedule; "
                          "run set_timesteps again")
        if timestep != self.timesteps[self.step_index]:
            raise FdError(f"step got timestep {timestep} but expected {self.timesteps[self.step_index]}; "
                          "step in order over .timesteps")
        return self.step_index


def vp_add_noise(alphas_cumprod: np.ndarray, original, noise, timesteps) -> np.ndarray:
    """Forward process q(x_t | x0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, per batch element, for the
    schedulers that work on the variance-preserving latent at integer training timesteps."""
    x0 = as_f32(original, "original")
    noise = as_f32(noise, "noise")
    a = alphas_cumprod[np.atleast_1d(np.asarray(timesteps, dtype=np.int64)).reshape(-1)]
    sqrt_a = per_sample(np.sqrt(a), x0.ndim)
    sqrt_1ma = per_sample(np.sqrt(np.float32(1.0) - a), x0.ndim)
    return (sqrt_a * x0 + sqrt_1ma * noise).astype(np.float32, copy=False)
