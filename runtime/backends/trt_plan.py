"""TensorRT decisions that need no GPU: optimization profiles, engine file names, and whether an engine
folder can run here.

Plain Python on spec and manifest data, so every rule is unit-tested on any machine. The two modules
that import tensorrt (builder/tensorrt_build.py, runtime/backends/tensorrt.py) only carry them out.
"""
from __future__ import annotations

import re

from fd.runtime.errors import FdError
from fd.runtime.sizes import check_size, rebuild_command, scaled_shape

MIN_TENSORRT = (10, 0)  # name-based I/O, user-managed context memory, progress monitors
ENGINE_DIR_PLACEHOLDER = "<engine folder>"


def engine_filename(component: str) -> str:
    return f"{component}.plan"


def parse_version(text: str) -> tuple[int, int, int]:
    """'10.7.0.23' or '10.7.0.post1' → (10, 7, 0): a serialized engine is tied to major.minor.patch."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return tuple(int(part) for part in match.groups())


# --- optimization profiles -------------------------------------------------------------------------
def shape_range(tensor: dict, batch: dict, geometry: dict) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shape of one spec tensor.

    The "batch" axis takes the graph's batch range. In a dynamic-shape build (geometry["dynamic_shape"]
    = {"min", "max"} image side in pixels) the axes named "height" and "width" scale with the image side;
    `opt` stays at the built size, which is what TensorRT tunes its kernels for.
    """
    sides = geometry.get("dynamic_shape")
    built = (geometry["height"], geometry["width"])
    shapes = []
    for key in ("min", "opt", "max"):
        shape = [batch[key] if dim == "batch" else dim for dim in tensor["shape"]]
        if sides and key != "opt":
            shape = scaled_shape(shape, tensor["axes"], built, (sides[key], sides[key]), tensor["name"])
        shapes.append(tuple(shape))
    return tuple(shapes)


def profile_shapes(spec: dict, geometry: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """The one optimization profile of a graph: (min, opt, max) per input.

    `geometry` is the builder's geometry or a manifest (which holds the same keys)."""
    return {t["name"]: shape_range(t, spec["batch"], geometry) for t in spec["inputs"]}


def max_shapes(spec: dict, geometry: dict) -> dict[str, tuple]:
    """The largest shape of every input and output: what the runtime allocates once."""
    return {t["name"]: shape_range(t, spec["batch"], geometry)[2] for t in spec["inputs"] + spec["outputs"]}


def profile_record(shapes: dict[str, tuple]) -> dict[str, dict[str, list]]:
    """A profile as JSON for the manifest: {input: {"min": [...], "opt": [...], "max": [...]}}."""
    return {name: dict(zip(("min", "opt", "max"), (list(s) for s in triple))) for name, triple in shapes.items()}


# --- the manifest's record of a TensorRT build ----------------------------------------------------------
def backend_info(*, tensorrt_version: str, gpu_name: str, compute_capability: str, profiles: dict,
                 build_seconds: dict, optimization_level: int | None, strongly_typed: bool, precision: str,
                 timing_cache: str | None) -> dict:
    """manifest["backend_info"] of a TensorRT folder; `profiles` maps component → profile_record(...)."""
    return {"tensorrt_version": tensorrt_version, "gpu_name": gpu_name, "compute_capability": compute_capability,
            "profiles": profiles, "build_seconds": build_seconds, "optimization_level": optimization_level,
            "strongly_typed": strongly_typed, "precision": precision, "timing_cache": timing_cache}


# --- can these engines run here? ----------------------------------------------------------------------
def check_compatible(manifest: dict, trt_version: str, gpu_name: str, compute_capability: str, height: int,
                     width: int, batch_rows: dict | None = None, engine_dir=ENGINE_DIR_PLACEHOLDER) -> None:
    """Raise one FdError line when the engines cannot run on this machine or at this size.

    Engines are tied to the TensorRT version (major.minor.patch) and to the GPU's compute capability
    (fd does not build hardware-compatible engines); a different GPU name of the same capability is fine.
    """
    info = manifest.get("backend_info") or {}
    if not {"tensorrt_version", "gpu_name", "compute_capability"} <= info.keys():
        raise FdError(f"{engine_dir} does not record which GPU and TensorRT built it: "
                      f"rebuild with `{rebuild_command(manifest, engine_dir)}`")
    same_version = parse_version(info["tensorrt_version"]) == parse_version(trt_version)
    if not same_version or info["compute_capability"] != compute_capability:
        raise FdError(f"engines in {engine_dir} were built for {info['gpu_name']} ({_sm(info['compute_capability'])}) "
                      f"with TensorRT {info['tensorrt_version']}; this machine has {gpu_name} "
                      f"({_sm(compute_capability)}) with TensorRT {trt_version}: "
                      f"rebuild with `{rebuild_command(manifest, engine_dir)}`")
    check_size(manifest, height, width, engine_dir)
    for component, rows in (batch_rows or {}).items():
        batch = manifest["components"][component]["batch"]
        if not batch["min"] <= rows <= batch["max"]:
            raise FdError(f"{component} needs {rows} rows per call, the engines in {engine_dir} take "
                          f"{batch['min']} to {batch['max']}: rebuild with a larger --max-batch-size or --max-window")


def _sm(compute_capability: str) -> str:
    return "sm_" + compute_capability.replace(".", "")
