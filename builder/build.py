"""fd-build's steps: model → split modules → checked ONNX graphs (torch: checked .pt2 programs) → (TensorRT
engines) → engine folder.

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

import numpy as np
from tqdm import tqdm

from builder import export
from builder.flops import unet_flops
from builder.staging import staged_folder
from builder.specs import Limits, TORCH_DTYPE_NAMES, cache_names, component_specs
from builder.split import check_supported, unet_levels
from runtime.errors import FdError
from runtime.manifest import BACKENDS, COMPONENTS, MANIFEST_NAME, MANIFEST_VERSION, write_json_atomic

MAX_SIDE = 2048
PRECISIONS = ("fp32", "fp16", "tf32")


@dataclass
class BuildOptions:
    model: str
    backend: str = "onnxruntime"
    precision: str | None = None  # None: fp16 for GPU backends, fp32 for onnxruntime
    height: int | None = None  # None: the model's native size
    width: int | None = None
    max_batch_size: int = 1
    max_window: int = 15  # the longest window of the paper's DDIM-50 key steps
    out: str | None = None
    force: bool = False
    seed: int = 0
    backend_options: dict | None = None  # backend-specific knobs (TensorRT: opt level, dynamic shape, …)

    def resolved_precision(self) -> str:
        return self.precision or ("fp32" if self.backend == "onnxruntime" else "fp16")


def validate_options(opts: BuildOptions) -> None:
    """Checks that need no model: all of them run before anything heavy is loaded."""
    if opts.backend not in BACKENDS:
        raise FdError(f"unknown backend '{opts.backend}': choose one of {', '.join(BACKENDS)}")
    precision = opts.resolved_precision()
    if precision not in PRECISIONS or (precision == "tf32" and opts.backend != "tensorrt"):
        raise FdError(f"precision '{precision}' is not available for {opts.backend}: use fp32 or fp16"
                      + (" (tf32 is TensorRT-only)" if precision == "tf32" else ""))
    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is not None and (value <= 0 or value % 8 or value > MAX_SIDE):
            raise FdError(f"--{name} {value} is not allowed: use a multiple of 8 between 8 and {MAX_SIDE}")
    if not 1 <= opts.max_batch_size <= 64:
        raise FdError(f"--max-batch-size {opts.max_batch_size} is out of range: use 1 to 64")
    if not 1 <= opts.max_window <= 1000:
        raise FdError(f"--max-window {opts.max_window} is out of range: use 1 to 1000")
    if dynamic_range(opts) and opts.backend == "torch":
        raise FdError("--dynamic-shape is for TensorRT and ONNX Runtime folders (torch folders are built for one "
                      "size): drop it, or build for --backend tensorrt or onnxruntime")


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
    name = Path(model).name if Path(model).expanduser().is_dir() else model.replace("/", "--")
    return Path("engines") / f"{name}-{opts.resolved_precision()}-{opts.backend}"


def build(opts: BuildOptions, log=print) -> Path:
    """Run every step and return the finished engine folder."""
    validate_options(opts)
    out = Path(opts.out) if opts.out else default_out(opts)
    precision = opts.resolved_precision()
    backend_module = _backend_builder(opts.backend)  # fails early if the backend's libraries are missing

    from builder.models import load_components
    started = time.perf_counter()
    with staged_folder(out, opts.force) as stage:  # output problems surface here, before the model loads
        comps = load_components(opts.model)
        check_supported(comps.unet)
        log(f"loaded {opts.model} in {time.perf_counter() - started:.1f} s")
        geometry = model_geometry(comps, opts)
        limits = Limits(opts.max_batch_size, opts.max_window)
        export_precision = "fp32" if precision == "tf32" else precision  # tf32: a TensorRT flag on fp32 graphs
        modules = export.graph_modules(comps, export_precision)
        specs = make_specs(comps, modules, geometry, export_precision, limits)
        rng = np.random.default_rng(opts.seed)
        vocab = comps.text_encoder.config.vocab_size
        for name in tqdm(COMPONENTS, desc="export + check", unit="graph", disable=None):
            spec, module = specs[name], modules[name]
            if opts.backend == "torch":  # the .pt2 programs are the engines: the torch runtime reads no ONNX
                path, t0 = stage / f"{name}.pt2", time.perf_counter()
                backend_module.export_program(module, spec, rng, vocab, path)
                seconds = time.perf_counter() - t0
                check = backend_module.check_program(path, module, spec, rng, vocab, export_precision)
            else:
                path = stage / f"{name}.onnx"
                feeds = export.random_inputs(spec, spec["batch"]["min"] + 1, rng, vocab)
                t0 = time.perf_counter()
                export.export_onnx(module, spec, feeds, path,
                                   dynamic_spatial=geometry["dynamic_shape"] is not None)
                seconds = time.perf_counter() - t0
                check = export.check_onnx(path, module, spec, feeds, export_precision)
                if geometry["dynamic_shape"] and has_image_axes(spec):
                    check = check_other_size(path, module, spec, geometry, check, rng, vocab, export_precision)
            spec.update(file=path.name, export_seconds=round(seconds, 2), check=check)
            tqdm.write(f"  {name}: {export.file_size(path) / 1e6:.1f} MB, max relative error vs PyTorch "
                       f"{check['max_rel_error']:.2e} (tolerance {check['tolerance']:g})"
                       + "".join(f", checked at {h}x{w}" for h, w in check.get("sizes", [])))
        flops = unet_flops(modules, specs)
        backend_info = backend_module.finish(stage, specs, modules, precision, opts, geometry, log) if backend_module else {}
        comps.tokenizer.save_pretrained(str(stage / "tokenizer"))
        manifest = make_manifest(opts, comps, geometry, specs, limits, precision, backend_info)
        manifest["flops_per_sample"] = flops
        write_json_atomic(stage / MANIFEST_NAME, manifest)
    log(f"built {out} in {time.perf_counter() - started:.1f} s")
    return out


def has_image_axes(spec: dict) -> bool:
    return any(len(t["shape"]) == 4 for t in spec["inputs"] + spec["outputs"])


def check_other_size(path, module, spec, geometry, check, rng, vocab, precision) -> dict:
    """Check a dynamic-size graph again at the smallest side of its range: a size baked into the graph
    by tracing would pass at the built size and fail here."""
    built, side = (geometry["height"], geometry["width"]), geometry["dynamic_shape"]["min"]
    feeds = export.random_inputs(spec, spec["batch"]["min"], rng, vocab, resize=(built, (side, side)))
    other = export.check_onnx(path, module, spec, feeds, precision)
    return {**check, "max_rel_error": max(check["max_rel_error"], other["max_rel_error"]),
            "sizes": [list(built), [side, side]]}


def _backend_builder(backend: str):
    """The backend's build module, whose finish() completes the folder (None: the ONNX graphs are the engines).

    tensorrt_build turns the checked ONNX graphs into engines; torch_build's programs replace the ONNX
    export in build()'s loop, so its finish() only describes them."""
    if backend == "onnxruntime":
        return None
    if backend == "tensorrt":
        from builder import tensorrt_build
        tensorrt_build.require_tensorrt()
        return tensorrt_build
    from builder import torch_build
    return torch_build


def model_geometry(comps, opts: BuildOptions) -> dict:
    """Image/latent sizes for the build, refusing sizes the UNet cannot split evenly."""
    vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    multiple = vae_scale * unet_levels(comps.unet)
    native = comps.unet.config.sample_size * vae_scale
    height, width = opts.height or native, opts.width or native
    side_range = dynamic_range(opts)
    checked = [("height", height), ("width", width)]
    if side_range:
        checked += [("dynamic-shape MIN", side_range[0]), ("dynamic-shape MAX", side_range[1])]
        if not side_range[0] <= min(height, width) <= max(height, width) <= side_range[1]:
            raise FdError(f"--height/--width {height}x{width} lie outside --dynamic-shape "
                          f"{side_range[0]}:{side_range[1]}: widen the range or change the size")
    for name, value in checked:
        if value % multiple:
            raise FdError(f"--{name} {value} does not fit this model: use a multiple of {multiple} "
                          f"(VAE scale {vae_scale} x UNet downsampling {multiple // vae_scale}), e.g. {native}")
    return {"height": height, "width": width, "vae_scale_factor": vae_scale,
            "latent_height": height // vae_scale, "latent_width": width // vae_scale,
            "latent_channels": comps.unet.config.in_channels,
            # image side range in pixels the engines accept; None: only height x width
            "dynamic_shape": {"min": side_range[0], "max": side_range[1]} if side_range else None}


def make_specs(comps, modules, geometry, precision, limits) -> dict:
    import torch
    unet_dtype = TORCH_DTYPE_NAMES[precision]
    lh, lw = geometry["latent_height"], geometry["latent_width"]
    text_len = comps.tokenizer.model_max_length
    text_dim = comps.text_encoder.config.hidden_size
    with torch.no_grad():  # one tiny encoder pass tells the shapes of the cache
        dtype = next(comps.unet.parameters()).dtype
        cache = modules["unet_encoder"](torch.zeros(1, geometry["latent_channels"], lh, lw, dtype=dtype),
                                        torch.zeros(1), torch.zeros(1, text_len, text_dim, dtype=dtype))
    return component_specs(
        text_len=text_len, text_dim=text_dim, latent_channels=geometry["latent_channels"], latent_hw=(lh, lw),
        image_hw=(geometry["height"], geometry["width"]), cache_shapes=[tuple(t.shape[1:]) for t in cache],
        unet_dtype=unet_dtype, text_dtype="float32", limits=limits)


def make_manifest(opts, comps, geometry, specs, limits, precision, backend_info) -> dict:
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": comps.source,
        "backend": opts.backend,
        "precision": precision,
        **geometry,
        "vae_scaling_factor": comps.vae.config.scaling_factor,
        "limits": {"max_batch_size": limits.max_batch_size, "max_window": limits.max_window},
        "scheduler_config": comps.scheduler_config,
        "prediction_type": comps.scheduler_config.get("prediction_type", "epsilon"),
        "tokenizer": {"file": "tokenizer/tokenizer.json", "max_length": comps.tokenizer.model_max_length,
                      "pad_token_id": comps.tokenizer.pad_token_id},
        "cache": cache_names(len(specs["unet_encoder"]["outputs"])),
        "components": specs,
        "backend_info": backend_info,
        "versions": library_versions(),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
    }


def library_versions() -> dict:
    versions = {}
    for package in ("fd", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "polygraphy", "tensorrt"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions
