"""The FasterDiffusion policy: which steps run the encoder, how windows are batched, noise injection,
and in which noise range classifier-free guidance applies.

Terms (Li et al., NeurIPS 2024, arXiv 2312.09608):
  key step   a loop index i at which the UNet encoder runs and refreshes the cache
  window     a key step and the non-key steps after it; all of them decode from that key step's cache,
             so their decoder calls run as one batch (split into calls of at most `max_window` steps)
  prior noise injection  z ← z + α·ε before each scheduler step whose timestep t < τ, on the
             variance-preserving latent z with ε the unit initial noise (for a sigma-space scheduler such as
             Euler, whose sample is z·sqrt(1 + σ_t²), that is x ← x + α·sqrt(1 + σ_t²)·ε; runtime/pipeline.py)
  guidance interval  (low, high] in the model's sigma σ_t = sqrt((1 − ᾱ_t)/ᾱ_t): classifier-free guidance
             applies at the steps whose σ lies inside it and the others use the conditional prediction
             alone (Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
             Distribution Quality in Diffusion Models", NeurIPS 2024), so their unconditional rows are
             never computed
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fd.runtime.errors import FdError

# The paper's chosen key steps for SD with DDIM-50 ("non-uniform IV"); for DPM-Solver++-20 the paper
# keeps the members below 20: {0, 1, 2, 3, 5, 10, 15}.
PAPER_KEY_STEPS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)
# At this many steps or fewer (LCM-style sampling) every step is a key step by default: a window
# reuses the encoder over steps far apart in noise level, and saves too few calls to pay off.
FEW_STEPS = 8
NOISE_ALPHA = 0.003
NOISE_TAU = 500  # SD's; each runtime family says its own (runtime/families: noise_injection_tau, DiT 300)
# The paper's interval for SD-XL (EDM2-style sigma); the flag's "paper" value.
PAPER_GUIDANCE_INTERVAL = (0.28, 5.42)


def default_key_steps(num_steps: int) -> tuple[int, ...]:
    """Every step for N ≤ FEW_STEPS; the paper's set for 50 steps, its members below N for N ≤ 50, and
    that set scaled by N/50 above.

    This gives exactly the paper's sets at 50 steps (9 keys) and 20 steps (7 keys).
    """
    if num_steps <= FEW_STEPS:
        return tuple(range(num_steps))
    if num_steps <= 50:
        return tuple(k for k in PAPER_KEY_STEPS_50 if k < num_steps)
    return tuple(sorted({round(k * num_steps / 50) for k in PAPER_KEY_STEPS_50}))


def uniform_key_steps(num_steps: int, every: int) -> tuple[int, ...]:
    if every < 1:
        raise FdError(f"--uniform {every} is not allowed: use a whole number of steps of at least 1")
    return tuple(range(0, num_steps, every))


@dataclass(frozen=True)
class NoiseInjection:
    alpha: float = NOISE_ALPHA
    tau: int = NOISE_TAU

    def applies(self, timestep: float) -> bool:
        return timestep < self.tau


@dataclass(frozen=True)
class Window:
    """One encoder call at `key_step`, then decoder calls over `chunks` (each a list of step indices)."""

    key_step: int
    chunks: tuple[tuple[int, ...], ...]


def model_sigmas(alphas_cumprod, timesteps) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of each timestep, from a scheduler's alphas_cumprod (float64); a fractional
    timestep (Euler's interpolated schedules) gets the linear interpolation of its neighbours' σ."""
    alpha_bar = np.asarray(alphas_cumprod, np.float64)
    train = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    return np.interp(np.asarray(timesteps, np.float64), np.arange(len(train)), train)


@dataclass(frozen=True)
class FasterDiffusionPolicy:
    key_steps: tuple[int, ...]
    max_window: int
    noise_injection: NoiseInjection | None = NoiseInjection()
    guidance_interval: tuple[float, float] | None = None  # (low, high] in sigma; None: guidance at every step

    def __post_init__(self):
        # Step 0 is always a key step: nothing is cached before it.
        object.__setattr__(self, "key_steps", tuple(sorted(set(self.key_steps) | {0})))
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))

    @classmethod
    def baseline(cls, num_steps: int, guidance_interval: tuple[float, float] | None = None) -> "FasterDiffusionPolicy":
        """Every step a key step and no injection: the plain sampler, i.e. diffusers' pipeline (with guidance
        limited to `guidance_interval` when one is given)."""
        return cls(tuple(range(num_steps)), max_window=1, noise_injection=None, guidance_interval=guidance_interval)

    def resolve(self, steps: int, folder_max_window: int, tau: int, calibrated=None) -> "FasterDiffusionPolicy":
        """An explicit plan stands as it is (fd.runtime.request.Policy resolves the same way from options)."""
        return self

    def validate(self, num_steps: int) -> None:
        bad = [k for k in self.key_steps if not 0 <= k < num_steps]
        if bad:
            raise FdError(f"key step {bad[0]} is out of range for {num_steps} steps: use indices 0 to {num_steps - 1}")
        if self.max_window < 1:
            raise FdError(f"max window {self.max_window} must be at least 1")

    def guided_steps(self, sigmas) -> tuple[bool, ...]:
        """Per step, whether classifier-free guidance applies: σ in (low, high], or every step without an
        interval. `sigmas` are the steps' model sigmas (model_sigmas)."""
        if self.guidance_interval is None:
            return (True,) * len(sigmas)
        low, high = self.guidance_interval
        return tuple(bool(low < sigma <= high) for sigma in sigmas)

    def windows(self, num_steps: int) -> list[Window]:
        self.validate(num_steps)
        keys = self.key_steps
        result = []
        for key, end in zip(keys, [*keys[1:], num_steps]):
            steps = tuple(range(key, end))
            chunks = tuple(steps[i:i + self.max_window] for i in range(0, len(steps), self.max_window))
            result.append(Window(key, chunks))
        return result

    def describe(self) -> dict:
        return {"key_steps": list(self.key_steps), "max_window": self.max_window,
                "noise_injection": None if self.noise_injection is None else
                {"alpha": self.noise_injection.alpha, "tau": self.noise_injection.tau},
                "guidance_interval": None if self.guidance_interval is None else list(self.guidance_interval)}


def check_guidance_interval(interval) -> tuple[float, float]:
    """(low, high] as two floats with 0 ≤ low ≤ high (high may be inf); anything else is one FdError line."""
    try:
        low, high = (float(bound) for bound in interval)
    except (TypeError, ValueError):
        raise FdError(f"guidance interval {interval!r} is not two numbers (low, high], e.g. 0.28,5.42") from None
    if math.isnan(low) or math.isnan(high) or not 0 <= low <= high or math.isinf(low):
        raise FdError(f"guidance interval ({low:g}, {high:g}] is not allowed: give 0 ≤ LOW ≤ HIGH in sigma, "
                      f"LOW finite (HIGH may be inf), e.g. 0.28,5.42")
    return low, high


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """--guidance-interval "LOW,HIGH" (in sigma) or "paper" (the paper's SD-XL interval 0.28,5.42)."""
    if text.strip().lower() == "paper":
        return PAPER_GUIDANCE_INTERVAL
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise FdError(f"--guidance-interval {text!r} is not LOW,HIGH in sigma (e.g. 0.28,5.42) or 'paper'") from None
    return check_guidance_interval((low, high))


def parse_key_steps(text: str) -> tuple[int, ...]:
    """Parse "0,1,2,3" into (0, 1, 2, 3); an empty list is refused rather than silently meaning the default."""
    example = "e.g. 0,1,2,3,5,10,15,25,35"
    try:
        keys = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise FdError(f"--key-steps {text!r} is not a comma-separated list of step indices, {example}") from None
    if not keys:
        raise FdError(f"--key-steps {text!r} names no steps: give comma-separated step indices, {example} "
                      "(or 'paper' for the paper's set)")
    return keys
