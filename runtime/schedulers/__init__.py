"""numpy-only diffusion schedulers that reproduce diffusers' numbers (no torch, no diffusers), and their registry.

Each takes a diffusers scheduler_config.json dict from any scheduler class, keeps the keys it knows
and uses diffusers' defaults for the rest, exactly as `SchedulerClass.from_config(config)` does.

The registry below is the one place that says which names fd offers, which fd class and diffusers
class each is, and which config keys the name fixes (`dpmpp-2m-karras` is DPM-Solver++ 2M with
use_karras_sigmas, `pndm` is PNDM with skip_prk_steps): diffusers' counterpart of a name is
`DiffusersClass.from_config(config, **overrides)`. fd-run, fd-bench and the tests all read it.

Every fd scheduler has the same verbs: set_timesteps(n), scale_model_input(sample, t),
step(model_output, t, sample, generator=None) and add_noise(x0, noise, t); plus `timesteps`,
`init_noise_sigma`, `stochastic` (steps draw noise from `generator`, a numpy Generator) and
`vp_scale(t)` (how much larger its sample is than the variance-preserving latent at t: 1, or
sqrt(1 + sigma_t^2) for the sigma-space Euler schedulers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fd.runtime.errors import FdError
from fd.runtime.schedulers import common, ddim, ddpm, dpmsolver, euler, euler_ancestral, flow_match, lcm, pndm, unipc
from fd.runtime.schedulers.ddim import DDIMScheduler
from fd.runtime.schedulers.ddpm import DDPMScheduler
from fd.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler
from fd.runtime.schedulers.euler import EulerDiscreteScheduler
from fd.runtime.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from fd.runtime.schedulers.flow_match import FlowMatchEulerDiscreteScheduler
from fd.runtime.schedulers.lcm import LCMScheduler
from fd.runtime.schedulers.pndm import PNDMScheduler
from fd.runtime.schedulers.unipc import UniPCMultistepScheduler


@dataclass(frozen=True)
class SchedulerSpec:
    name: str  # what --scheduler takes
    fd_class: type  # fd's numpy scheduler
    defaults: dict  # the diffusers class's __init__ defaults (what from_config falls back to)
    diffusers_class: str  # the diffusers scheduler it equals
    summary: str  # one phrase for --help
    overrides: dict = field(default_factory=dict)  # config keys this name fixes

    @property
    def stochastic(self) -> bool:
        """Whether each step adds fresh noise (drawn from fd's seeded generator)."""
        return self.fd_class.stochastic

    @property
    def prediction_types(self) -> tuple[str, ...]:
        return self.fd_class.prediction_types


REGISTRY: dict[str, SchedulerSpec] = {spec.name: spec for spec in (
    SchedulerSpec("ddim", DDIMScheduler, ddim.DEFAULTS, "DDIMScheduler", "DDIM, eta 0"),
    SchedulerSpec("dpmpp-2m", DPMSolverMultistepScheduler, dpmsolver.DEFAULTS, "DPMSolverMultistepScheduler",
                  "DPM-Solver++ 2M", {"use_karras_sigmas": False}),
    SchedulerSpec("dpmpp-2m-karras", DPMSolverMultistepScheduler, dpmsolver.DEFAULTS, "DPMSolverMultistepScheduler",
                  "DPM-Solver++ 2M on Karras sigmas", {"use_karras_sigmas": True}),
    SchedulerSpec("euler", EulerDiscreteScheduler, euler.DEFAULTS, "EulerDiscreteScheduler", "Euler"),
    SchedulerSpec("euler-a", EulerAncestralDiscreteScheduler, euler_ancestral.DEFAULTS,
                  "EulerAncestralDiscreteScheduler", "Euler ancestral"),
    SchedulerSpec("pndm", PNDMScheduler, pndm.DEFAULTS, "PNDMScheduler", "PLMS, SD1.5's default",
                  {"skip_prk_steps": True}),
    SchedulerSpec("unipc", UniPCMultistepScheduler, unipc.DEFAULTS, "UniPCMultistepScheduler", "UniPC bh2, order 2"),
    SchedulerSpec("lcm", LCMScheduler, lcm.DEFAULTS, "LCMScheduler", "LCM, for LCM and LCM-LoRA models at 2-8 steps"),
    SchedulerSpec("ddpm", DDPMScheduler, ddpm.DEFAULTS, "DDPMScheduler", "DDPM"),
)}
SCHEDULERS = tuple(REGISTRY)
# Flow-matching samplers (SD3, FLUX.1) apart: they run only flow-matching models, and VP samplers only the others
FLOW_REGISTRY: dict[str, SchedulerSpec] = {spec.name: spec for spec in (
    SchedulerSpec("flow-euler", FlowMatchEulerDiscreteScheduler, flow_match.DEFAULTS, flow_match.FLOW_CLASS,
                  "flow-matching Euler, for SD3 and FLUX.1 (their default)"),
)}
FLOW_SCHEDULERS = tuple(FLOW_REGISTRY)
_ALL = {**REGISTRY, **FLOW_REGISTRY}
MODEL = "model"  # the scheduler class the model's own scheduler_config.json names
CHOICES = (*SCHEDULERS, *FLOW_SCHEDULERS, MODEL)
DEFAULT = "ddim"


def with_overrides(config: dict, overrides: dict) -> dict:
    """config with `overrides` set, as diffusers' from_config(config, **overrides) sees it: an override
    wins even where a live scheduler's config lists the key among its defaulted ones."""
    if not isinstance(config, dict):
        raise FdError(f"scheduler config must be a dict (scheduler_config.json), got {type(config).__name__}")
    merged = {**config, **overrides}
    if "_use_default_values" in config:
        merged["_use_default_values"] = [k for k in config["_use_default_values"] or () if k not in overrides]
    return merged


def scheduler_for_model(config: dict) -> str:
    """The registry name of the scheduler the model ships with (its config's _class_name and options)."""
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    candidates = [spec for spec in _ALL.values() if spec.diffusers_class == class_name]
    if not candidates:
        raise FdError(f"the model's scheduler is {class_name or 'not named in its scheduler config'}, which fd "
                      f"does not offer: choose --scheduler {', '.join(SCHEDULERS)}")
    for spec in candidates:
        resolved = common.resolve_config(config, spec.defaults)
        if all(resolved[key] == value for key, value in spec.overrides.items()):
            return spec.name
    spec = candidates[0]
    key = next(k for k, v in spec.overrides.items() if common.resolve_config(config, spec.defaults)[k] != v)
    raise FdError(f"the model's {class_name} sets {key}={common.resolve_config(config, spec.defaults)[key]!r}, "
                  f"which fd does not run: choose --scheduler {', '.join(SCHEDULERS)}")


def resolve_name(name: str, config: dict) -> str:
    """A registry name; "model" becomes the name of the model's own scheduler, and so does the default name
    (ddim) for a flow-matching model, which no diffusion sampler can run."""
    if name == MODEL or (name == DEFAULT and flow_match.is_flow_config(config)):
        return scheduler_for_model(config)
    if name not in _ALL:
        raise FdError(f"unknown scheduler {name!r}; choose one of: {', '.join(CHOICES)}")
    flow_model, flow_name = flow_match.is_flow_config(config), name in FLOW_REGISTRY
    if flow_model != flow_name:
        raise FdError(f"--scheduler {name} " + (f"is for flow-matching models (SD3, FLUX.1); this one is a diffusion "
                      f"model: choose one of {', '.join(SCHEDULERS)}" if flow_name else
                      f"cannot run a flow-matching model (SD3, FLUX.1): use --scheduler "
                      f"{' or '.join(FLOW_SCHEDULERS)} (or model)"))
    return name


def make_scheduler(name: str, config: dict):
    """fd's scheduler called `name` (or "model"), configured from a scheduler_config.json dict."""
    spec = _ALL[resolve_name(name, config)]
    return spec.fd_class(with_overrides(config, spec.overrides))


def diffusers_scheduler(name: str, config: dict):
    """diffusers' counterpart of `name` on the same config (imports diffusers: for baselines and tests)."""
    import diffusers
    spec = _ALL[resolve_name(name, config)]
    return getattr(diffusers, spec.diffusers_class).from_config(config, **spec.overrides)


def choices_help() -> str:
    """Every name and what it is, for --help."""
    names = [f"{spec.name} = {spec.summary}{', stochastic' if spec.stochastic else ''}" for spec in _ALL.values()]
    return "; ".join(names) + f"; {MODEL} = the scheduler class the model ships with. Default: {DEFAULT}"


__all__ = ["CHOICES", "DEFAULT", "FLOW_REGISTRY", "FLOW_SCHEDULERS", "MODEL", "REGISTRY", "SCHEDULERS", "SchedulerSpec",
           "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
           "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "LCMScheduler",
           "PNDMScheduler", "UniPCMultistepScheduler", "choices_help", "diffusers_scheduler", "make_scheduler",
           "resolve_name", "scheduler_for_model", "with_overrides"]
