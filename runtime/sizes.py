"""Which image sizes an engine folder accepts, and the fd-build command that rebuilds it for another.

A folder is built for one height x width, or (`fd-build --dynamic-shape MIN:MAX`, TensorRT and ONNX
Runtime) for any side from MIN to MAX pixels that keeps every image-like tensor a whole size. The rule is
the same for every backend, so it lives here as plain Python on manifest data.
"""
from __future__ import annotations

import math

from runtime.errors import FdError


def side_step(specs: dict, geometry: dict, axis: int) -> int:
    """The multiple an image height (axis 2) or width (axis 3) must be for every NCHW tensor to scale
    to whole sizes: lcm over tensors of built_side / gcd(dim, built_side) (VAE x UNet downsampling)."""
    built = geometry["height"] if axis == 2 else geometry["width"]
    step = 1
    for spec in specs.values():
        for tensor in spec["inputs"] + spec["outputs"]:
            if len(tensor["shape"]) == 4:
                step = math.lcm(step, built // math.gcd(tensor["shape"][axis], built))
    return step


def check_size(manifest: dict, height: int, width: int, engine_dir) -> None:
    """Raise one FdError line when the folder's graphs cannot run at height x width."""
    sides = manifest.get("dynamic_shape")
    if sides is None:
        if (height, width) != (manifest["height"], manifest["width"]):
            hint = "" if manifest.get("backend") == "torch" else " (or add --dynamic-shape MIN:MAX for a range of sizes)"
            raise FdError(f"engines in {engine_dir} are built for {manifest['height']}x{manifest['width']} only, not "
                          f"{height}x{width}: rebuild with `{rebuild_command(manifest, engine_dir, height, width)}`"
                          + hint)
        return
    for name, value, axis in (("height", height, 2), ("width", width, 3)):
        step = side_step(manifest["components"], manifest, axis)
        if not sides["min"] <= value <= sides["max"] or value % step:
            raise FdError(f"{name} {value} is outside what the engines in {engine_dir} accept (multiples of {step} "
                          f"from {sides['min']} to {sides['max']} px): choose such a size, or rebuild with a "
                          f"--dynamic-shape range that holds it")


def scaled_shape(shape, built_hw: tuple[int, int], hw: tuple[int, int], name: str = "tensor") -> list:
    """A shape at another image size: H and W of image-like (NCHW) tensors scale with the image; a size
    that would make an axis fractional is a ValueError."""
    if len(shape) != 4:
        return list(shape)
    scaled = list(shape[:2])
    for dim, side, built_side in zip(shape[2:], hw, built_hw):
        if (dim * side) % built_side:
            raise ValueError(f"{name}: a {dim}-wide axis at {built_side} px is not whole at {side} px "
                             f"({dim} x {side} / {built_side}); use image sides that the model's downsampling divides")
        scaled.append(dim * side // built_side)
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
    parts.append(f"--out {engine_dir} --force")
    return " ".join(parts)
