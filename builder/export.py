"""Modules → ONNX graphs, and the check of each graph against its PyTorch module.

The legacy TorchScript exporter (opset 17) is used on purpose: it exports our modules in ~1 s each
where the dynamo exporter takes ~15 s on the tiny model, it is the path TensorRT's own demos use, and
dynamic axes need no symbolic-shape constraints. Graphs over 2 GB are re-saved with one external data file.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fd.builder.specs import SPATIAL_AXES, names
from fd.runtime.errors import FdError
from fd.runtime.sizes import scaled_shape

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3
# max |onnx - torch| / max |torch| over all outputs; a wrong graph is off by O(1).
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def random_inputs(spec: dict, batch: int, rng: np.random.Generator, vocab_size: int,
                  resize: tuple[tuple[int, int], tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Random inputs of a spec's shapes: integers in the tensor record's "range" [low, high] (inclusive; e.g.
    DiT's class labels, the null class included) or else ids in the vocabulary, timesteps in [0, 1000), the
    rest N(0, 1).

    `resize=(built_hw, hw)` scales the height/width axes from the built image size to another one."""
    feeds = {}
    for tensor in spec["inputs"]:
        shape = [batch if d == "batch" else d for d in tensor["shape"]]
        if resize:
            shape = scaled_shape(shape, tensor["axes"], *resize)
        if tensor["dtype"] == "int64":
            low, high = tensor["range"] if "range" in tensor else (0, vocab_size - 1)
            feeds[tensor["name"]] = rng.integers(low, high, size=shape, dtype=np.int64, endpoint=True)
        elif tensor["name"] == "timestep":
            feeds[tensor["name"]] = rng.uniform(0, 1000, size=shape).astype(np.float32)
        else:
            feeds[tensor["name"]] = rng.standard_normal(shape).astype(NUMPY_DTYPES[tensor["dtype"]])
    return feeds


def run_torch(module: nn.Module, spec: dict, feeds: dict[str, np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    """The module's outputs on host inputs, as float32 host arrays; `device` is where the module already is."""
    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[n]).to(device) for n in names(spec["inputs"])))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().cpu().numpy() for o in outs]


def dynamic_axes(spec: dict, spatial: bool) -> dict[str, dict[int, str]]:
    """Batch is always dynamic; the height/width axes too when asked (a --dynamic-shape build)."""
    axes = {}
    for tensor in spec["inputs"] + spec["outputs"]:
        axes[tensor["name"]] = {0: "batch"}
        if spatial:
            axes[tensor["name"]].update({i: f"{tensor['name']}_{axis}" for i, axis in enumerate(tensor["axes"])
                                         if axis in SPATIAL_AXES})
    return axes


def export_onnx(module: nn.Module, spec: dict, feeds: dict[str, np.ndarray], path: Path,
                dynamic_spatial: bool = False) -> None:
    """Export one module to `path` (plus `path`.data when the weights pass the 2 GB protobuf limit)."""
    import onnx

    from fd.builder import onnx_ops
    onnx_ops.register()  # aten::rms_norm (FLUX.1) at opset 17
    input_names, output_names = names(spec["inputs"]), names(spec["outputs"])
    args = tuple(torch.from_numpy(feeds[n]) for n in input_names)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks are expected
        raw = Path(scratch) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes(spec, dynamic_spatial),
                          do_constant_folding=True)
        # Over 2 GB the exporter scatters one file per weight; gather them into one data file.
        model = onnx.load(str(raw), load_external_data=True)
        big = sum(t.ByteSize() for t in model.graph.initializer) > PROTOBUF_LIMIT * 0.9
        onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=path.name + ".data" if big else None)


def check_onnx(path: Path, module: nn.Module, spec: dict, feeds: dict[str, np.ndarray], precision: str) -> dict:
    """Run the graph under ONNX Runtime and the module under PyTorch on the same inputs; fail if they differ."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names(spec["outputs"]), feeds)
    want = run_torch(module, spec, feeds)
    return compare(got, want, precision, f"{path.name} under ONNX Runtime")


def compare(got: list[np.ndarray], want: list[np.ndarray], precision: str, what: str) -> dict:
    """Relative max error over all outputs against the precision's tolerance; raises FdError when over."""
    error = 0.0
    for g, w in zip(got, want):
        scale = max(float(np.abs(w).max()), 1e-6)
        error = max(error, float(np.abs(g.astype(np.float32) - w).max()) / scale)
    tolerance = CHECK_TOLERANCE[precision]
    result = {"max_rel_error": error, "tolerance": tolerance}
    if not np.isfinite(error) or error > tolerance:
        raise FdError(f"{what} differs from PyTorch: max relative error {error:.3g} > {tolerance:g}; "
                      "the export is wrong for this model (report it with the model id)")
    return result


def file_size(path: Path) -> int:
    return sum(os.path.getsize(p) for p in [path, Path(str(path) + ".data")] if p.exists())
