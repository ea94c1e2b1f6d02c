"""fd-build: options, then a chain of steps, each in its own module:

  model (models.py) → adaptations: LoRA, textual inversion (adapt.py) → family modules and specs (families/)
  → checked graphs (graphs.py)
  → engines (tensorrt_build.py, torch_build.py) → engine folder with its manifest (staging.py, here)

Everything is written into a hidden folder next to the target and swapped into place only when complete
(builder/staging.py), so a failed or interrupted build never leaves a half-written engine folder.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from fd.builder.adapt import Adaptations, adapt
from fd.builder.flops import unet_flops
from fd.builder.graphs import export_and_check
from fd.builder.staging import staged_folder
from fd.runtime.backends import BACKENDS, backend_info
from fd.runtime.batch import Limits
from fd.runtime.errors import FdError
from fd.runtime.manifest import MANIFEST_NAME, MANIFEST_VERSION, write_json_atomic

MAX_SIDE = 2048


@dataclass
class BuildOptions:
    model: str
    backend: str = "onnxruntime"
    precision: str | None = None  # None: the backend's default (fp32 for onnxruntime, fp16 for GPU backends)
    height: int | None = None  # None: the model's native size
    width: int | None = None
    max_batch_size: int = 1
    max_window: int = 15  # the longest window of the paper's DDIM-50 key steps
    out: str | None = None
    force: bool = False
    seed: int = 0
    backend_options: dict | None = None  # backend-specific knobs (TensorRT: opt level, dynamic shape, …)
    controlnets: tuple[str, ...] = ()  # --controlnet: tiny-controlnet, local folders or hub ids, applied in order
    img2img: bool = False  # --img2img: also build the VAE encoder (fd-run --init-image)
    split_block: int | None = None  # --split-block: transformer families' first decoder block (None: the family's)
    adaptations: Adaptations = Adaptations()  # --lora, --textual-inversion, --allow-pickle (builder/adapt.py)
    config: str | None = None  # --config: a single-file checkpoint's config folder (builder/single_file.py)
    refittable: bool = False  # --refittable: LoRA-able weights swappable at run time (builder/refit.py)
    device: str = "cpu"  # --device: where the torch backend checks its programs (builder/torch_build.py)
    frames: int | None = None  # --frames: video families' frames per video (None: the family's default, 16)

    def resolved_precision(self) -> str:
        return self.precision or backend_info(self.backend).default_precision


def validate_options(opts: BuildOptions) -> None:
    """Checks that need no model: all of them run before anything heavy is loaded."""
    info = backend_info(opts.backend)
    precision = opts.resolved_precision()
    if precision not in info.precisions:
        raise FdError(f"precision '{precision}' is not available for {opts.backend}: use "
                      f"{' or '.join(info.precisions)}")
    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is not None and (value <= 0 or value % 8 or value > MAX_SIDE):
            raise FdError(f"--{name} {value} is not allowed: use a multiple of 8 between 8 and {MAX_SIDE}")
    if not 1 <= opts.max_batch_size <= 64:
        raise FdError(f"--max-batch-size {opts.max_batch_size} is out of range: use 1 to 64")
    if opts.split_block is not None and opts.split_block < 1:
        raise FdError(f"--split-block {opts.split_block} is not allowed: give the index of the first decoder block, "
                      "1 or more")
    if opts.frames is not None and not 1 <= opts.frames <= 1024:
        raise FdError(f"--frames {opts.frames} is out of range: use 1 to 1024 frames per video (default 16)")
    if not 1 <= opts.max_window <= 1000:
        raise FdError(f"--max-window {opts.max_window} is out of range: use 1 to 1000")
    from fd.builder.controlnet import check_controlnet_options
    check_controlnet_options(list(opts.controlnets))
    opts.adaptations.check()
    if opts.refittable:
        from fd.builder.refit import check_refittable
        check_refittable(opts.backend)
    if opts.device != "cpu":
        from fd.builder.torch_build import check_device
        check_device(opts.device, opts.backend)
    if dynamic_range(opts) and not info.dynamic_shapes:
        able = " or ".join(b.name for b in BACKENDS.values() if b.dynamic_shapes)
        raise FdError(f"--dynamic-shape is for {able} folders ({opts.backend} folders are built for one size): "
                      f"drop it, or build for --backend {able}")


def dynamic_range(opts: BuildOptions) -> tuple[int, int] | None:
    """--dynamic-shape MIN:MAX as (min, max) image side in pixels, or None for static engines."""
    text = (opts.backend_options or {}).get("dynamic_shape")
    if not text:
        return None
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise FdError(f"--dynamic-shape {text!r} is not MIN:MAX in pixels, e.g. 256:768") from None
    if not 8 <= low <= high <= MAX_SIDE:
        raise FdError(f"--dynamic-shape {text} is out of range: use 8 <= MIN <= MAX <= {MAX_SIDE}")
    return low, high


def default_out(opts: BuildOptions) -> Path:
    model = opts.model.rstrip("/")
    path = Path(model).expanduser()
    name = path.name if path.is_dir() else path.stem if path.is_file() else model.replace("/", "--")
    return Path("engines") / f"{name}-{opts.resolved_precision()}-{opts.backend}"


def build(opts: BuildOptions, log=print) -> Path:
    """Run every step and return the finished engine folder."""
    validate_options(opts)
    out = Path(opts.out) if opts.out else default_out(opts)
    precision = opts.resolved_precision()
    export_precision = "fp32" if precision == "tf32" else precision  # tf32: a TensorRT flag on fp32 graphs
    backend_module = _backend_builder(opts.backend)  # fails early if the backend's libraries are missing

    from fd.builder.families import FAMILIES
    from fd.builder.models import load_components
    started = time.perf_counter()
    with staged_folder(out, opts.force) as stage:  # output problems surface here, before the model loads
        comps = load_components(opts.model, opts.config, opts.adaptations.allow_pickle)
        family = FAMILIES[comps.family]
        family.check_supported(comps)
        family.set_split_block(comps, opts.split_block)
        family.set_frames(comps, opts.frames)
        # both are proven on latent UNet image pipelines only
        if (opts.controlnets or opts.img2img) and (comps.unet is None or comps.vae is None or not family.image_inputs):
            flag = "--controlnet" if opts.controlnets else "--img2img"
            raise FdError(f"{flag} is for UNet families (sd, sdxl); the {family.name} family has no diffusers "
                          f"{flag[2:]} pipeline fd is checked against: drop {flag}")
        log(f"loaded {opts.model} ({family.name} family) in {time.perf_counter() - started:.1f} s")
        adapted = adapt(comps, opts.adaptations, log)
        geometry = {**model_geometry(comps, opts), **family.extra_geometry(comps)}
        limits = Limits(opts.max_batch_size, opts.max_window)
        modules = family.graph_modules(comps, export_precision)
        specs = family.specs(comps, modules, geometry, export_precision, limits)
        controlnets = add_image_input_graphs(opts, comps, family, modules, specs, geometry, export_precision, limits)
        vocab = min((encoder.config.vocab_size for encoder in comps.text_encoders), default=None)
        export_and_check(modules, specs, stage, opts.backend, geometry, export_precision, vocab, opts.seed,
                         opts.device)
        flops = unet_flops(modules, specs)
        if opts.refittable:  # before the backend's finish, which stores optimized copies of these graphs
            from fd.builder.refit import make_refittable
            refit = make_refittable(stage, specs, comps, log, modules)
        engines = backend_module.finish(stage, specs, modules, precision, opts, geometry, log) if backend_module else {}
        tokenizers = save_tokenizers(comps, stage)
        manifest = make_manifest(opts, comps, geometry, specs, limits, precision, engines, tokenizers)
        manifest["flops_per_sample"] = flops
        adapted.annotate(manifest)
        if opts.refittable:
            manifest["refit"] = refit
        if controlnets:
            manifest["controlnets"] = controlnets
        write_json_atomic(stage / MANIFEST_NAME, manifest)
    log(f"built {out} in {time.perf_counter() - started:.1f} s")
    return out


def add_image_input_graphs(opts, comps, family, modules: dict, specs: dict, geometry: dict, precision: str,
                           limits: Limits) -> list[dict]:
    """Add the optional graphs: one per --controlnet (builder/controlnet.py) and, with --img2img, the VAE
    encoder. Returns the ControlNets' manifest records."""
    records = []
    if opts.controlnets:
        from fd.builder.controlnet import controlnet_graphs
        more, more_specs, records = controlnet_graphs(comps, list(opts.controlnets), specs, geometry, precision)
        modules.update(more)
        specs.update(more_specs)
    if opts.img2img:
        modules["vae_encoder"], specs["vae_encoder"] = family.vae_encoder_graph(comps, geometry, precision, limits)
    return records


def save_tokenizers(comps, stage: Path) -> list[dict]:
    """Each tokenizer as tokenizer.json (what the runtime's `tokenizers` library reads), with its padding."""
    records = []
    for folder, tokenizer in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), comps.tokenizers):
        tokenizer.save_pretrained(str(stage / folder))
        records.append({"file": f"{folder}/tokenizer.json", "max_length": tokenizer.model_max_length,
                        "pad_token_id": tokenizer.pad_token_id})
    return records


def _backend_builder(backend: str):
    """The backend's build module, whose finish() completes the folder.

    onnxruntime_build stores the checked graphs as ONNX Runtime optimizes them (a faster load); tensorrt_build
    turns them into engines; torch_build's programs replace the ONNX export in build()'s loop, so its
    finish() only describes them."""
    if backend == "onnxruntime":
        from fd.builder import onnxruntime_build
        return onnxruntime_build
    if backend == "tensorrt":
        from fd.builder import tensorrt_build
        tensorrt_build.require_tensorrt()
        return tensorrt_build
    from fd.builder import torch_build
    return torch_build


def model_geometry(comps, opts: BuildOptions) -> dict:
    """Image/latent sizes for the build, refusing sizes the UNet cannot split evenly."""
    from fd.builder.families import FAMILIES
    family = FAMILIES[comps.family]
    latent_channels, latent_multiple, native_latent = family.size_rule(comps)
    vae_scale = family.vae_scale(comps)
    multiple, native = vae_scale * latent_multiple, native_latent * vae_scale
    height, width = opts.height or native, opts.width or native
    side_range = dynamic_range(opts)
    if side_range and not family.supports_dynamic_shape:
        raise FdError(f"--dynamic-shape is not supported for the {family.name} family: build one folder per size "
                      "with --height/--width")
    checked = [("height", height), ("width", width)]
    if side_range:
        checked += [("dynamic-shape MIN", side_range[0]), ("dynamic-shape MAX", side_range[1])]
        if not side_range[0] <= min(height, width) <= max(height, width) <= side_range[1]:
            raise FdError(f"--height/--width {height}x{width} lie outside --dynamic-shape "
                          f"{side_range[0]}:{side_range[1]}: widen the range or change the size")
    for name, value in checked:
        if value % multiple:
            raise FdError(f"--{name} {value} does not fit this model: use a multiple of {multiple} "
                          f"(VAE scale {vae_scale} x denoiser downsampling {multiple // vae_scale}), e.g. {native}")
    return {"height": height, "width": width, "vae_scale_factor": vae_scale,
            "latent_height": height // vae_scale, "latent_width": width // vae_scale,
            "latent_channels": latent_channels,
            # image side range in pixels the engines accept; None: only height x width
            "dynamic_shape": {"min": side_range[0], "max": side_range[1]} if side_range else None}


def make_manifest(opts, comps, geometry, specs, limits, precision, engines: dict, tokenizers: list) -> dict:
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "family": comps.family,
        "family_options": comps.options,
        "source": comps.source,
        "backend": opts.backend,
        "precision": precision,
        **geometry,
        "vae_scaling_factor": comps.vae.config.scaling_factor if comps.vae is not None else 1.0,  # pixel space: none
        "limits": {"max_batch_size": limits.max_batch_size, "max_window": limits.max_window},
        "scheduler_config": comps.scheduler_config,
        "prediction_type": comps.scheduler_config.get("prediction_type", "epsilon"),
        "tokenizers": tokenizers,
        "cache": [t["name"] for t in specs["denoiser_encoder"]["outputs"]],
        "components": specs,
        "backend_info": engines,
        "versions": library_versions(),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
    }


def library_versions() -> dict:
    versions = {}
    for package in ("fd", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "polygraphy", "tensorrt"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions
