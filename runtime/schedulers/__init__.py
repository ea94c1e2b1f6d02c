"""numpy-only diffusion schedulers that reproduce diffusers' numbers (no torch, no diffusers).

Each takes a diffusers scheduler_config.json dict from any scheduler class, keeps the keys it knows
and uses diffusers' defaults for the rest, exactly as `SchedulerClass.from_config(config)` does.
"""

from runtime.errors import FdError
from runtime.schedulers.ddim import DDIMScheduler
from runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler

_CLASSES = {"ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}
SCHEDULERS = tuple(_CLASSES)


def make_scheduler(name: str, config: dict):
    """The scheduler called `name` ("ddim" or "dpmpp-2m"), configured from a scheduler_config.json dict."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise FdError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return cls(config)


__all__ = ["SCHEDULERS", "DDIMScheduler", "DPMSolverMultistepScheduler", "make_scheduler"]
