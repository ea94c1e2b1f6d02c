"""What one generation asks of an engine folder: `Request`, and its FasterDiffusion part, `Policy`.

fd-run builds a Request from its flags, fd-serve from its JSON body, fd-bench from its flags, the Python API takes
one directly; the pipeline checks it against the folder (`FasterDiffusionPipeline.prepare`) and runs it. Each input
is declared here once. What can be checked without the folder is checked when a Request is made, so every front
end refuses a bad value with the same one line (an FdError) before any engine loads; what depends on the folder
(its family, size, limits, ControlNets) is checked by `prepare`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.policy import (FasterDiffusionPolicy, NoiseInjection, check_guidance_interval, default_key_steps,
                               uniform_key_steps)

MAX_STEPS = 1000
NAMED_KEY_STEPS = ("paper", "calibrated")
# Far above any useful scale (SD's usual 7.5, the papers' sweeps stop near 20); larger ones only saturate the
# image, and near float's limit the guided prediction overflows to a black image.
MAX_GUIDANCE_SCALE = 100.0
DEFAULT_STRENGTH = 0.8  # StableDiffusionImg2ImgPipeline's default


@dataclass(frozen=True)
class Policy:
    """The FasterDiffusion settings a request asks for; the defaults are the paper's.

    It is resolved against the folder and the steps that run (`resolve`) into a FasterDiffusionPolicy, the plan
    with concrete key steps. A FasterDiffusionPolicy may stand in a Request's `policy` too, as an explicit plan."""

    # loop indices that run the encoder; "paper": the paper's set for the steps; "calibrated": the folder's fd-calibrate
    # set for this scheduler and step count; None: the calibrated set where the folder has one, else the paper's
    key_steps: tuple[int, ...] | str | None = None
    uniform: int | None = None  # a key step every `uniform` steps, instead of key_steps
    baseline: bool = False  # every step a key step, no noise injection: the plain sampler (diffusers' pipeline)
    noise_injection: bool = True  # prior noise injection (alpha 0.003, the folder family's tau)
    guidance_interval: tuple[float, float] | None = None  # CFG only for sigma in (low, high]; None: every step
    max_window: int | None = None  # most steps per decoder call; None: the folder's limit

    def __post_init__(self):
        if isinstance(self.key_steps, str):
            if self.key_steps not in NAMED_KEY_STEPS:
                raise FdError(f"key steps {self.key_steps!r}: give step indices, 'paper' or 'calibrated'")
        elif self.key_steps is not None:
            keys = tuple(self.key_steps)
            if not keys or not all(_is_int(k) for k in keys):
                raise FdError(f"key steps {list(keys)} are not step indices: give whole numbers such as "
                              "0,1,2,3,5,10,15,25,35")
            object.__setattr__(self, "key_steps", tuple(int(k) for k in keys))
        if self.uniform is not None and not (_is_int(self.uniform) and self.uniform >= 1):
            raise FdError(f"--uniform {self.uniform} is not allowed: use a whole number of steps of at least 1")
        chosen = [name for name, given in (("key steps", self.key_steps is not None),
                                           ("uniform", self.uniform is not None), ("baseline", self.baseline)) if given]
        if len(chosen) > 1:
            raise FdError(f"{' and '.join(chosen)} both choose the key steps: give one of them")
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))
        if self.max_window is not None and not (_is_int(self.max_window) and self.max_window >= 1):
            raise FdError(f"max window {self.max_window} must be a whole number of at least 1")

    def resolve(self, steps: int, folder_max_window: int, tau: int,
                calibrated: tuple[int, ...] | None = None) -> FasterDiffusionPolicy:
        """The plan for `steps` steps that run, on a folder whose decoder takes `folder_max_window` steps per call,
        with the family's noise-injection `tau` and the folder's calibrated key steps for these steps (None: none)."""
        if self.baseline:
            return FasterDiffusionPolicy.baseline(steps, self.guidance_interval)
        if self.key_steps == "calibrated" and calibrated is None:
            raise FdError(f"--key-steps calibrated: this engine folder has no calibrated key steps for this scheduler "
                          f"at {steps} steps: run fd-calibrate with the same --scheduler and --steps, or give "
                          "--key-steps paper")
        if self.uniform is not None:
            keys = uniform_key_steps(steps, self.uniform)
        elif self.key_steps == "paper" or (self.key_steps is None and calibrated is None):
            keys = default_key_steps(steps)
        elif self.key_steps in (None, "calibrated"):
            keys = calibrated
        else:
            keys = self.key_steps
        return FasterDiffusionPolicy(keys, folder_max_window if self.max_window is None else self.max_window,
                                     NoiseInjection(tau=tau) if self.noise_injection else None, self.guidance_interval)


@dataclass(frozen=True, eq=False)  # eq=False: latents and images are arrays, not values to compare
class Request:
    """One generation: one image per prompt (or class label), every other field shared by them."""

    prompts: Sequence[str] = ()  # text-to-image folders: one image per prompt
    class_labels: Sequence[int | str] = ()  # class-conditional folders (DiT): a class id or an id2label name each
    negative_prompt: str | Sequence[str] | None = None  # None: none (SD encodes "", SDXL conditions on zeros)
    steps: int = 50
    scheduler: str = "ddim"  # a name from fd.runtime.schedulers.SCHEDULERS, configured from the folder's config
    guidance_scale: float | None = None  # classifier-free guidance; 1 or less: off; None: the family's default
    seed: int | None = 0  # seeds the initial noise (and a stochastic sampler's); None: fresh noise
    latents: np.ndarray | None = None  # initial unit noise (images, channels, h, w) instead of the seed's
    height: int | None = None  # pixels; None: the size the folder was built for
    width: int | None = None
    original_size: tuple[int, int] | None = None  # SDXL size conditioning; None: the image size
    crops_coords_top_left: tuple[int, int] | None = None  # SDXL crop conditioning; None: (0, 0)
    policy: Policy | FasterDiffusionPolicy = field(default_factory=Policy)  # None: Policy(), the paper's
    control_images: Sequence[Any] = ()  # one image (path or PIL image) per ControlNet of the folder, in build order
    controlnet_scales: float | Sequence[float] | None = None  # one for all ControlNets or one each; None: 1.0
    init_image: Any = None  # image to image: the start image (path or PIL image), on a folder built with --img2img
    strength: float | None = None  # image to image: the share of the schedule that runs; None: 0.8
    # run-time LoRAs ("FILE[:SCALE]" texts or (file, scale) pairs) on a folder built with fd-build --refittable;
    # None: the pipeline's current set (pipe.set_loras), (): none. The pipeline swaps only when the set differs.
    loras: Sequence[str | tuple] | None = None
    # Python API: a stochastic scheduler's noise, one (images, C, H, W) array per step that draws noise, in order,
    # instead of the seed's stream (tests feed diffusers' own); None: drawn from the seed
    step_noise: Sequence[np.ndarray] | None = None
    # DeepFloyd IF stage II: the stage-I image and T5 embeddings it upscales (runtime/if_cascade.py makes it)
    super_resolution: Any = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise once
        for name in ("prompts", "class_labels", "control_images"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Sequence):
                raise FdError(_SEQUENCE_HINTS[name])
            set_(name, tuple(value))
        if not self.prompts and not self.class_labels:
            raise FdError("give at least one --prompt (or --class-label for a class-conditional model such as DiT)")
        if self.prompts and self.class_labels:
            raise FdError("give --prompt (text models) or --class-label (class-conditional models), not both")
        if not all(isinstance(p, str) for p in self.prompts):
            raise FdError(_SEQUENCE_HINTS["prompts"])
        if not all(isinstance(c, str) or _is_int(c) for c in self.class_labels):
            raise FdError(_SEQUENCE_HINTS["class_labels"])
        negative = self.negative_prompt
        texts = [*self.prompts, *(c for c in self.class_labels if isinstance(c, str)),
                 *([negative] if isinstance(negative, str) else negative if isinstance(negative, Sequence) else [])]
        for text in texts:
            check_text(text)
        if not (negative is None or isinstance(negative, str)):
            if not (isinstance(negative, Sequence) and len(negative) == len(self.inputs)
                    and all(isinstance(n, str) for n in negative)):
                raise FdError(f"negative prompt must be one string or a list of {len(self.inputs)} strings, one per "
                              "prompt")
            set_("negative_prompt", list(negative))
        if not (_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS):
            raise FdError(f"--steps {self.steps} is out of range: use 1 to {MAX_STEPS}")
        if not isinstance(self.scheduler, str):
            raise FdError(f"--scheduler {self.scheduler!r} is not a scheduler name such as ddim or dpmpp-2m")
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)
        check_seed(self.seed)  # with latents given, a stochastic sampler's per-step noise still comes from it
        if self.latents is not None:
            latents = np.asarray(self.latents)
            if not (np.issubdtype(latents.dtype, np.floating) or np.issubdtype(latents.dtype, np.integer)):
                raise FdError(f"initial latents hold {latents.dtype} values: give real numbers (float32)")
            if not np.isfinite(latents).all():
                raise FdError("initial latents contain NaN or infinite values: give finite noise")
            set_("latents", latents.astype(np.float32, copy=False))
        for name, flag, least in (("original_size", "--original-size", 1), ("crops_coords_top_left",
                                                                            "--crops-coords-top-left", 0)):
            value = getattr(self, name)
            if value is not None:
                set_(name, check_pair(value, flag, least))
        if self.policy is None:
            set_("policy", Policy())
        if not isinstance(self.policy, (Policy, FasterDiffusionPolicy)):
            raise FdError(f"policy must be an fd.Policy, not {type(self.policy).__name__}")
        scales = self.controlnet_scales
        if scales is not None:
            scales = list(scales) if isinstance(scales, Sequence) else [scales]
            for scale in scales:
                if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                    raise FdError(f"--controlnet-scale {scale} is not allowed: give a finite number (1.0 is the "
                                  "default)")
            set_("controlnet_scales", [float(s) for s in scales])
        if self.init_image is None and self.strength is not None:
            raise FdError("--strength is for image to image: give --init-image PATH too, or drop --strength")
        if self.loras is not None:
            from fd.runtime.lora import lora_choices
            set_("loras", lora_choices(self.loras))
        if self.step_noise is not None:
            arrays = [np.asarray(a) for a in self.step_noise]
            if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in arrays):
                raise FdError("step_noise must be finite float arrays, one per noisy step")
            set_("step_noise", tuple(a.astype(np.float32, copy=False) for a in arrays))
        if self.super_resolution is not None:
            from fd.runtime.if_cascade import SuperResolutionInput
            if not isinstance(self.super_resolution, SuperResolutionInput):
                raise FdError("super_resolution must be an fd.runtime.if_cascade.SuperResolutionInput")
        if self.init_image is not None:
            self.steps_run  # noqa: B018 - refuses a strength out of range, or one that runs no step

    @property
    def inputs(self) -> list:
        """The prompts, or the class labels: one image each."""
        return list(self.prompts or self.class_labels)

    @property
    def steps_run(self) -> int:
        """The steps that run: all of them, or image to image's last int(steps x strength); key steps index these."""
        if self.init_image is None:
            return self.steps
        strength = DEFAULT_STRENGTH if self.strength is None else self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
                math.isfinite(strength) and 0 < strength <= 1):
            raise FdError(f"--strength {strength} is out of range: give a number above 0 and at most 1 "
                          f"(the share of the schedule that runs; default {DEFAULT_STRENGTH})")
        run = min(int(self.steps * strength), self.steps)  # diffusers' get_timesteps
        if run < 1:
            raise FdError(f"--strength {strength} with --steps {self.steps} runs no step (int({self.steps} x "
                          f"{strength}) = 0): raise --strength or --steps")
        return run

    def replace(self, **changes) -> "Request":
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)


FIELDS = tuple(f.name for f in fields(Request))

_SEQUENCE_HINTS = {"prompts": "give at least one prompt (a list of strings)",
                   "class_labels": "give at least one class label (a list of ints or names)",
                   "control_images": "control images must be a list: one image (path or PIL image) per ControlNet"}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_guidance_scale(guidance_scale) -> None:
    # NaN passes every comparison and inf overflows the guided prediction: both give black or noise images.
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)) or not (
            math.isfinite(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE_SCALE):
        raise FdError(f"--guidance-scale {guidance_scale} is not allowed: give a finite number from 0 to "
                      f"{MAX_GUIDANCE_SCALE:g} (1 or less turns guidance off; 7.5 is usual)")


def check_text(text) -> None:
    """Prompts and labels must be Unicode a tokenizer can take: no lone surrogates, which are what Python makes of
    argv bytes that are not UTF-8 (surrogateescape) and what JSON's unpaired \\ud800-\\udfff escapes decode to."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise FdError(f"prompt {text.encode('utf-8', 'replace').decode()[:60]!r} is not valid text (bytes that are "
                          "not UTF-8, or an unpaired UTF-16 surrogate): give the prompt as UTF-8") from None


def check_seed(seed) -> None:
    """None draws fresh noise; numpy's generators take whole numbers of 0 or more (negative ones fail deep inside)."""
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise FdError(f"--seed {seed} is not allowed: give a whole number, 0 or more")


def check_pair(value, flag: str, least: int) -> tuple[int, int]:
    """SDXL's two whole numbers (a size above 0, or offsets of 0 or more), from a pair or fd-run's "A,B" text."""
    if isinstance(value, str):
        try:
            value = tuple(int(part) for part in value.split(","))
        except ValueError:
            raise FdError(f"{flag} {value!r} is not two whole numbers, e.g. {flag} 1024,1024") from None
    if not (isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) for v in value)):
        raise FdError(f"{flag} {value!r} is not two whole numbers, e.g. {flag} 1024,1024")
    if min(value) < least:
        raise FdError(f"{flag} {','.join(map(str, value))} is out of range: give sizes above 0 (offsets 0 or more)")
    return int(value[0]), int(value[1])
