"""Which image sizes an engine folder accepts, and the fd-build command that rebuilds it for another.

A folder is built for one height x width, or (`fd-build --dynamic-shape MIN:MAX`, TensorRT and ONNX
Runtime) for any side from MIN to MAX pixels that keeps every height/width axis a whole size. The rule is
the same for every backend, so it lives here as plain Python on manifest data.
"""
from __future__ import annotations

import math

from fd.runtime.errors import FdError


def side_step(specs: dict, geometry: dict, axis: str) -> int:
    """The multiple an image side ("height" or "width") must be for every tensor axis of that name to scale
    to a whole size: lcm over such axes of built_side / gcd(size, built_side) (VAE x UNet downsampling)."""
    built = geometry[axis]
    step = 1
    for spec in specs.values():
        for tensor in spec["inputs"] + spec["outputs"]:
            for size, name in zip(tensor["shape"], tensor["axes"]):
                if name == axis:
                    step = math.lcm(step, built // math.gcd(size, built))
    return step


def check_size(manifest: dict, height: int, width: int, engine_dir) -> None:
    """Raise one FdError line when the folder's graphs cannot run at height x width."""
    sides = manifest.get("dynamic_shape")
    if sides is None:
        if (height, width) != (manifest["height"], manifest["width"]):
            from fd.runtime.backends import BACKENDS
            info = BACKENDS.get(manifest.get("backend"))
            hint = " (or add --dynamic-shape MIN:MAX for a range of sizes)" if info and info.dynamic_shapes else ""
            raise FdError(f"engines in {engine_dir} are built for {manifest['height']}x{manifest['width']} only, not "
                          f"{height}x{width}: rebuild with `{rebuild_command(manifest, engine_dir, height, width)}`"
                          + hint)
        return
    for name, value in (("height", height), ("width", width)):
        step = side_step(manifest["components"], manifest, name)
        if not sides["min"] <= value <= sides["max"] or value % step:
            raise FdError(f"{name} {value} is outside what the engines in {engine_dir} accept (multiples of {step} "
                          f"from {sides['min']} to {sides['max']} px): choose such a size, or rebuild with a "
                          f"--dynamic-shape range that holds it")


def scaled_shape(shape, axes, built_hw: tuple[int, int], hw: tuple[int, int], name: str = "tensor") -> list:
    """A shape at another image size: the "height" and "width" axes scale with the image; a size that
    would make an axis fractional is a ValueError."""
    scaled = []
    for dim, axis in zip(shape, axes):
        if axis in ("height", "width"):
            side, built_side = (hw[0], built_hw[0]) if axis == "height" else (hw[1], built_hw[1])
            if (dim * side) % built_side:
                raise ValueError(f"{name}: a {dim}-wide axis at {built_side} px is not whole at {side} px "
                                 f"({dim} x {side} / {built_side}); use image sides that the model's downsampling "
                                 "divides")
            dim = dim * side // built_side
        scaled.append(dim)
    return scaled


def rebuild_command(manifest: dict, engine_dir, height: int | None = None, width: int | None = None) -> str:
    """The fd-build command that rebuilds this folder on this machine (optionally at another size)."""
    source = manifest.get("source", {})
    model = source.get("path") or source.get("model", "<model>")
    limits = manifest["limits"]
    parts = [f"fd-build --model {model} --backend {manifest['backend']} "
             f"--precision {manifest['precision']}",
             f"--height {height or manifest['height']} --width {width or manifest['width']}",
             f"--max-batch-size {limits['max_batch_size']} --max-window {limits['max_window']}"]
    if manifest.get("dynamic_shape"):
        parts.append(f"--dynamic-shape {manifest['dynamic_shape']['min']}:{manifest['dynamic_shape']['max']}")
    for record in manifest.get("controlnets", []):
        parts.append(f"--controlnet {record['source'].get('path') or record['source'].get('model')}")
    if manifest.get("frames"):
        parts.append(f"--frames {manifest['frames']}")
    if "vae_encoder" in manifest["components"]:
        parts.append("--img2img")
    parts.append(f"--out {engine_dir} --force")
    return " ".join(parts)
