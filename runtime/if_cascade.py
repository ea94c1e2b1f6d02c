"""DeepFloyd IF's cascade: stage II (IFSuperResolutionPipeline) upscaling stage I's image, on two engine folders.

fd-run --engine-dir STAGE1 --prompt … --super-resolution STAGE2 runs stage I, then stage II on its final sample,
each with its own FasterDiffusion key steps (the policy is resolved for each stage's step count). A stage-II
folder holds no T5: it conditions on stage I's T5 embeddings, as diffusers' cascade passes stage I's
prompt_embeds to stage II, so stage I's text encoder runs once more for the rows stage II's guidance needs. Its
own `denoiser_conditions` graph turns them and the noise level into its UNet's prompt terms.

As IFSuperResolutionPipeline: the stage-I image (its final sample in [-1, 1]) is upscaled bilinearly (corners
aligned) to stage II's size, noised to `noise_level` with the folder's image-noising DDPM and unit noise, and fed
beside the sample to every encoder call (guided rows: the same image for both halves).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fd.runtime.errors import FdError

UPSCALE_NOISE_STREAM = 2  # the seed's third stream (runtime/pipeline.py: 0 the initial noise, 1 the step noise)
DEFAULT_NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default
DEFAULT_SR_STEPS = 50  # IFSuperResolutionPipeline's default


@dataclass(frozen=True, eq=False)
class SuperResolutionInput:
    """What a stage-II folder upscales: Request.super_resolution."""

    image: np.ndarray  # (images, 3, h, w): stage I's final sample, in [-1, 1]
    text_embeddings: np.ndarray  # stage I's T5 states, rows [negative…, positive…] when guided, else [positive…]
    noise: np.ndarray  # (images, 3, H, W) unit noise the upscaled image is noised with, at stage II's size
    noise_level: int = DEFAULT_NOISE_LEVEL

    def __post_init__(self):
        for name in ("image", "text_embeddings", "noise"):
            value = np.asarray(getattr(self, name))
            if not (np.issubdtype(value.dtype, np.floating) and np.isfinite(value).all()):
                raise FdError(f"super-resolution {name} must be finite float arrays")
            object.__setattr__(self, name, value.astype(np.float32, copy=False))
        if isinstance(self.noise_level, bool) or not isinstance(self.noise_level, (int, np.integer)) or \
                not 0 <= self.noise_level < 1000:
            raise FdError(f"--noise-level {self.noise_level} is out of range: give a whole number from 0 to 999 "
                          f"(IFSuperResolutionPipeline's default is {DEFAULT_NOISE_LEVEL})")

    def check(self, images: int, guided: bool, height: int, width: int, text_spec: dict) -> None:
        """Against the stage-II folder and request (EngineFolder.prepare)."""
        if self.image.ndim != 4 or self.image.shape[:2] != (images, 3):
            raise FdError(f"the stage-I image has shape {self.image.shape}; {images} prompts need ({images}, 3, h, w)")
        if self.noise.shape != (images, 3, height, width):
            raise FdError(f"the upscaling noise has shape {self.noise.shape}, stage II needs {(images, 3, height, width)}")
        rows, length, width_ = 2 * images if guided else images, *text_spec["shape"][1:]
        if self.text_embeddings.shape != (rows, length, width_):
            raise FdError(f"stage I's T5 embeddings have shape {self.text_embeddings.shape}, this stage-II folder "
                          f"takes ({rows}, {length}, {width_}): use the stage-I folder of the same IF release")


def upscale(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with aligned corners, as torch's interpolate(mode="bilinear", align_corners=True) computes
    it on the CPU: float32 source positions, along the width first, then the height."""
    def taps(size_in: int, size_out: int):
        scale = np.float32((size_in - 1) / (size_out - 1)) if size_out > 1 else np.float32(0)
        position = np.arange(size_out, dtype=np.float32) * scale
        low = np.clip(np.floor(position).astype(np.int64), 0, size_in - 1)
        frac = position - low.astype(np.float32)
        return low, np.minimum(low + 1, size_in - 1), np.float32(1) - frac, frac
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = taps(image.shape[2], height), taps(image.shape[3], width)
    top = image[:, :, y0][..., x0] * wx0 + image[:, :, y0][..., x1] * wx1
    bottom = image[:, :, y1][..., x0] * wx0 + image[:, :, y1][..., x1] * wx1
    return (top * wy0[:, None] + bottom * wy1[:, None]).astype(np.float32)


def noised_upscale(condition: SuperResolutionInput, height: int, width: int, noising_config: dict) -> np.ndarray:
    """The upscaled stage-I image at its noise level (IFSuperResolutionPipeline's image_noising_scheduler)."""
    from fd.runtime.schedulers import DDPMScheduler
    upscaled = upscale(condition.image, height, width)
    return DDPMScheduler(noising_config).add_noise(upscaled, condition.noise,
                                                   np.full(len(upscaled), condition.noise_level))


def super_resolution_input(stage_one, stage_two, request, image: np.ndarray,
                           noise_level: int = DEFAULT_NOISE_LEVEL) -> SuperResolutionInput:
    """Stage I's T5 embeddings for stage II's rows, and the upscaling noise from the request's seed."""
    from fd.runtime.families import PromptRequest
    if stage_one.family.name != "if":
        raise FdError(f"--super-resolution upscales a DeepFloyd IF stage-I image; --engine-dir is a "
                      f"{stage_one.family.name} folder: give an IF stage-I folder")
    if stage_two.family.name != "if-sr":
        raise FdError(f"--super-resolution needs an IF stage-II folder (fd-build --model if-sr or an "
                      f"IFSuperResolutionPipeline folder); {stage_two.engine_dir} is a {stage_two.family.name} folder")
    guidance = stage_two.family.default_guidance_scale
    guided = stage_two.family.classifier_free_guidance(guidance)
    height, width = stage_two.image_size(None, None)
    prompt = PromptRequest(list(request.prompts), request.negative_prompt, guided, height, width)
    text = stage_one.runner.download(stage_one.family.text_embeddings(stage_one.runner, stage_one.tokenizers, prompt))
    noise = np.random.default_rng(None if request.seed is None else [int(request.seed), UPSCALE_NOISE_STREAM]) \
        .standard_normal((len(image), 3, height, width), dtype=np.float32)
    return SuperResolutionInput(np.asarray(image), np.asarray(text, np.float32), noise, noise_level)


def stage_two_request(request, condition: SuperResolutionInput, steps: int):
    """Stage II's request: the same prompts, seed, scheduler and policy; its own steps, size, guidance (the
    stage-II pipeline's default) and noise; the stage-I image and embeddings to upscale."""
    return request.replace(steps=steps, latents=None, height=None, width=None, guidance_scale=None,
                           step_noise=None, super_resolution=condition)


def stage_two_folder(engine_dir: str, steps: int, noise_level: int):
    """--super-resolution's folder and options, checked (an IF stage-II folder) before anything runs."""
    from fd.runtime.pipeline import EngineFolder
    from fd.runtime.request import MAX_STEPS
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < 1000:
        raise FdError(f"--noise-level {noise_level} is out of range: give a whole number from 0 to 999 "
                      f"(IFSuperResolutionPipeline's default is {DEFAULT_NOISE_LEVEL})")
    if not 1 <= steps <= MAX_STEPS:
        raise FdError(f"--sr-steps {steps} is out of range: use 1 to {MAX_STEPS}")
    folder = EngineFolder(engine_dir)
    if folder.family.name != "if-sr":
        raise FdError(f"--super-resolution needs an IF stage-II folder (fd-build --model if-sr, tiny-if-sr or an "
                      f"IFSuperResolutionPipeline folder); {engine_dir} is a {folder.family.name} folder")
    return folder


def run_stage_two(stage_one, folder, request, first, steps: int, noise_level: int):
    """fd-run --super-resolution: stage II's request checked against its folder before its engines load, then run."""
    from fd.runtime.pipeline import FasterDiffusionPipeline
    second = stage_two_request(request, super_resolution_input(stage_one, folder, request, first.latents,
                                                               noise_level), steps)
    folder.prepare(second)
    return FasterDiffusionPipeline(folder.engine_dir)(second)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("DeepFloyd IF cascade (docs/if.md)")
    group.add_argument("--super-resolution", metavar="STAGE2",
                       help="then upscale the stage-I image with this IF stage-II engine folder (its own key steps)")
    group.add_argument("--sr-steps", type=int, default=DEFAULT_SR_STEPS,
                       help=f"stage II's steps (default {DEFAULT_SR_STEPS}, IFSuperResolutionPipeline's)")
    group.add_argument("--noise-level", type=int, default=DEFAULT_NOISE_LEVEL,
                       help=f"noise level of the upscaled image (default {DEFAULT_NOISE_LEVEL})")
