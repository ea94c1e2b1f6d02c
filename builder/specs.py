"""Tensors with named axes, and the batch range of each graph.

A tensor record (what the manifest stores for every graph input and output):
  {"name": "sample", "dtype": "float16", "shape": ["batch", 4, 64, 64], "axes": ["batch", null, "height", "width"]}
`shape` holds the sizes at the built image size ("batch" for the dynamic batch axis); `axes` names the axes
that can vary: "batch" always, "height" / "width" with the image in a --dynamic-shape build (their scale to
the image is size / built image side), "sequence" for token positions. Export's dynamic axes, TensorRT's
profiles and the runtime's size checks all read `axes`, never the tensor's rank.

Batch ranges come from runtime/batch.py (the runtime checks a folder's limits with the same rule).
"""
from __future__ import annotations

from dataclasses import dataclass

SPATIAL_AXES = ("height", "width")


@dataclass(frozen=True)
class Axis:
    """A named axis and its size at the built image size."""

    name: str
    size: int


def tensor(name: str, dtype: str, dims: list) -> dict:
    """A tensor record; `dims` are the per-row dimensions, each an int (fixed) or an Axis (named)."""
    return {"name": name, "dtype": dtype,
            "shape": ["batch", *(d.size if isinstance(d, Axis) else int(d) for d in dims)],
            "axes": ["batch", *(d.name if isinstance(d, Axis) else None for d in dims)]}


def cache_names(count: int) -> list[str]:
    """mid, then skip_00 … in the order the down blocks produce them (the decoder pops from the end)."""
    return ["mid", *(f"skip_{i:02d}" for i in range(count - 1))]


def names(tensors: list[dict]) -> list[str]:
    return [t["name"] for t in tensors]


def has_spatial_axes(spec: dict) -> bool:
    """Whether any of a graph's tensors scales with the image (checked again at another size when dynamic)."""
    return any(axis in SPATIAL_AXES for t in spec["inputs"] + spec["outputs"] for axis in t["axes"])
