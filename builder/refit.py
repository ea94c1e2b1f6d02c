"""fd-build --refittable: keep the weights a LoRA changes swappable at run time (ONNX Runtime and TensorRT folders
here; torch folders record their programs' parameters instead, builder/torch_refit.py).

Each ONNX graph is saved with every weight in its data file `<graph>.onnx.data`, and the manifest's `refit`
record lists, per graph, each initializer that holds a LoRA-able weight (a Linear or Conv weight of the UNet or
a text encoder): the parameter it is, whether the exporter stored it transposed (a Linear's MatMul operand),
and where its bytes lie in the data file. The runtime (runtime/lora.py) then reads the base weight there, adds
the LoRA's update and hands the result to ONNX Runtime as an initializer (SessionOptions.add_external_initializers) of a
fresh session of the graphs the LoRA touches; the other graphs keep their sessions. TensorRT folders keep the
data files beside their engines (built with the REFIT flag) and refit the touched engines in place.

Initializers are matched to parameters by their bytes (the export renames what constant folding produced,
such as a Linear's transposed weight), so a weight whose bytes two parameters share cannot be told apart: it
is left out, and a LoRA changing it is refused at run time.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fd.runtime.errors import FdError

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def check_refittable(backend: str) -> None:
    if backend not in ("onnxruntime", "tensorrt", "torch"):
        raise FdError(f"--refittable is implemented for ONNX Runtime, TensorRT and torch folders, not {backend}: "
                      "build with --backend onnxruntime, or fuse the LoRA at build with --lora")


def make_refittable(stage: Path, specs: dict, comps, log=print, modules: dict | None = None) -> dict:
    """Re-save every graph with external weights (torch programs: as they are) and return the manifest's `refit`
    record."""
    if all(spec["file"].endswith(".pt2") for spec in specs.values()):
        from fd.builder.torch_refit import torch_refit_record
        graphs, shapes = torch_refit_record(stage, specs, comps, modules)
        return _record(graphs, shapes, comps, log)
    import onnx
    from onnx import numpy_helper

    index, shapes = _parameter_index(comps)
    graphs = {}
    for name, spec in specs.items():
        path = stage / spec["file"]
        model = onnx.load(str(path), load_external_data=True)
        found = {}
        for initializer in model.graph.initializer:
            hit = index.get(_digest(numpy_helper.to_array(initializer)))
            if hit is not None and hit != "ambiguous":
                found[initializer.name] = hit
        data = f"{path.name}.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=0)
        saved = onnx.load(str(path), load_external_data=False)
        weights, everything = [], {}
        for initializer in saved.graph.initializer:
            where = {entry.key: entry.value for entry in initializer.external_data}
            location = {"offset": int(where.get("offset", 0)), "length": int(where["length"]),
                        "shape": list(initializer.dims),
                        "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)).name}
            everything[initializer.name] = location
            if initializer.name in found:
                component, parameter, transposed = found[initializer.name]
                weights.append({"initializer": initializer.name, "component": component, "parameter": parameter,
                                "transposed": transposed, **location})
        if weights:
            # "initializers": every weight's place, for TensorRT's refitter, which asks again for the weights it
            # combined with a changed one at build (runtime/backends/trt_refit.py)
            graphs[name] = {"data": data, "weights": weights, "initializers": everything}
    return _record(graphs, shapes, comps, log)


def _record(graphs: dict, shapes: dict, comps, log) -> dict:
    mapped = {(w["component"], w["parameter"]) for g in graphs.values() for w in g["weights"]}
    log(f"  refittable: {len(mapped)} of {sum(len(t) for t in shapes.values())} LoRA-able weights swappable at "
        f"run time, in {', '.join(graphs)}")
    return {"graphs": graphs, "parameters": {component: {p: list(s) for p, s in table.items()}
                                             for component, table in shapes.items()},
            "unet_config": _jsonable(dict(comps.unet.config)) if comps.unet is not None else None}


def lora_weights(comps) -> dict:
    """{component: {parameter name: its module's weight}} for every LoRA-able weight (a Linear's or Conv's)."""
    out = {}
    for component in LORA_COMPONENTS:
        module = getattr(comps, component, None)
        if module is not None:
            out[component] = {f"{name}.weight": layer.weight for name, layer in module.named_modules()
                              if isinstance(layer, (nn.Linear, nn.Conv2d))}
    return out


def _parameter_index(comps) -> tuple[dict, dict]:
    """(digest of a weight's bytes as the export may store it → (component, parameter, transposed), and per
    component every LoRA-able weight's shape). Both float32 and float16 forms are indexed."""
    index, shapes = {}, {}
    for component, weights in lora_weights(comps).items():
        table = shapes.setdefault(component, {})
        for parameter, weight in weights.items():
            weight = weight.detach()
            table[parameter] = tuple(weight.shape)
            for dtype in (torch.float32, torch.float16):
                forms = [(weight.to(dtype), False)] + ([(weight.to(dtype).T, True)] if weight.ndim == 2 else [])
                for tensor, transposed in forms:
                    key = _digest(tensor.contiguous().numpy())
                    index[key] = "ambiguous" if key in index and index[key][:2] != (component, parameter) \
                        else (component, parameter, transposed)
    return index, shapes


def _digest(array: np.ndarray) -> tuple:
    return array.dtype.name, array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
            if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
