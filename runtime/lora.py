"""Run-time LoRA: apply LoRAs to a refittable engine folder (fd-build --refittable) without a rebuild.

`set_loras(pipeline, ["style.safetensors:0.8", ...])` replaces the folder's LoRA set (an empty list: none):
for every graph whose weights the new or the previous set changes, a fresh ONNX Runtime session is made from
the portable graph with the changed weights given as initializers (SessionOptions.add_external_initializers:
ONNX Runtime uses them instead of the data file's and optimizes the graph with them); graphs neither set touches keep
their sessions. Each changed weight is the base weight, read from the graph's data file where the build's
`refit` record says it lies (builder/refit.py), plus Σ scale · update, the update computed by the build's own
LoRA reader (builder/lora.py: diffusers' key conversion, so this needs fd's build extra: torch and diffusers).

TensorRT folders built --refittable are refitted in place instead (runtime/backends/trt_refit.py, trt.Refitter:
untested here, no TensorRT on this machine). Not here: swapping while a generation runs (call it between
generations), and TensorRT's CUDA graphs (refused).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fd.runtime.errors import FdError

REFIT_HINT = "rebuild the folder with fd-build --refittable, or fuse the LoRA at build with fd-build --lora"


def set_loras(pipeline, loras: list) -> dict:
    """Replace the pipeline's run-time LoRAs by `loras` ("FILE[:SCALE]" texts or (path, scale) pairs).
    Returns {"graphs": the graphs reloaded (ONNX Runtime) or refitted (TensorRT), "seconds": the time it took}."""
    refit = pipeline.manifest.get("refit")
    if not refit:
        raise FdError(f"{pipeline.engine_dir} was built without --refittable, so its weights cannot be swapped: "
                      f"{REFIT_HINT}")
    runner = pipeline.runner
    if runner.name not in ("onnxruntime", "tensorrt"):
        raise FdError(f"run-time LoRA is implemented for ONNX Runtime and TensorRT folders, not {runner.name}: "
                      f"{REFIT_HINT}")
    if getattr(runner, "cuda_graphs", False):
        raise FdError("run-time LoRA with --cuda-graphs is not supported (captured graphs would keep the old "
                      "weights): drop --cuda-graphs")
    started = time.perf_counter()
    totals = _summed_updates(pipeline.manifest, refit, loras)
    changed = pipeline.__dict__.setdefault("_lora_changed", {})  # graph → initializers now off their base
    done = []
    for graph, record in refit["graphs"].items():
        if Path(record["data"]).name != record["data"]:  # the folder's own file, never a path elsewhere
            raise FdError(f"{pipeline.engine_dir}: manifest refit.graphs.{graph}.data is not a file name: "
                          "rebuild the folder with fd-build --refittable")
        data = pipeline.engine_dir / record["data"]
        values = {w["initializer"]: _new_weight(data, w, totals[w["component"], w["parameter"]])
                  for w in record["weights"] if (w["component"], w["parameter"]) in totals}
        if not values and not changed.get(graph):
            continue  # neither the old nor the new set changes this graph: its session or engine stays
        if runner.name == "onnxruntime":
            _reopen(runner, graph, values)  # a fresh session starts from the file's weights
        else:
            from fd.runtime.backends.trt_refit import refit_engine
            reverted = {name: _base(data, record["initializers"][name])
                        for name in changed.get(graph, set()) - set(values)}
            refit_engine(runner.trt, runner.engines[graph], runner._logger, {**reverted, **values},
                         lambda name: _base(data, record["initializers"][name]), graph)
        changed[graph] = set(values)
        done.append(graph)
    return {"graphs": done, "seconds": time.perf_counter() - started}


def check_lora_options(texts: list[str]) -> None:
    """fd-run --lora FILE[:SCALE]: the files exist and are .safetensors, checked before any engine loads."""
    from fd.builder.adapt import parse_lora
    for text in texts:
        parse_lora(text, False)


def _summed_updates(manifest: dict, refit: dict, loras: list) -> dict:
    """{(component, parameter): Σ scale · update} as float32 arrays, checked against what the folder can swap."""
    from fd.builder.adapt import LoraSpec, parse_lora
    from fd.builder.lora import lora_deltas
    specs = [LoraSpec(Path(item[0]), float(item[1])) if isinstance(item, (tuple, list)) else parse_lora(item, False)
             for item in loras]
    swappable = {(w["component"], w["parameter"]) for g in refit["graphs"].values() for w in g["weights"]}
    tables = {component: {p: tuple(s) for p, s in table.items()} for component, table in refit["parameters"].items()}
    totals: dict = {}
    for spec in specs:
        if not spec.path.is_file():
            raise FdError(f"--lora {spec.path}: no such file: give the path of a .safetensors file")
        for d in lora_deltas(spec.path, manifest["family"], tables, refit.get("unet_config")):
            key = (d.component, d.parameter)
            if key not in swappable:
                raise FdError(f"--lora {spec.path.name}: it changes {d.component}.{d.parameter}, which this folder "
                              "cannot swap at run time: fuse this LoRA at build with fd-build --lora")
            totals[key] = totals.get(key, 0) + np.float32(spec.scale) * d.delta.numpy()
    return totals


def _base(data: Path, place: dict) -> np.ndarray:
    """A weight as built, from where the refit record says it lies in the graph's data file."""
    dtype = np.dtype(place["dtype"])
    return np.fromfile(data, dtype=dtype, count=place["length"] // dtype.itemsize,
                       offset=place["offset"]).reshape(place["shape"])


def _new_weight(data: Path, weight: dict, update: np.ndarray) -> np.ndarray:
    """The base weight from the graph's data file plus the update, in the initializer's layout and dtype."""
    dtype = np.dtype(weight["dtype"])
    base = _base(data, weight)
    if weight["transposed"]:
        update = update.T
    return (base.astype(np.float32) + update.reshape(base.shape)).astype(dtype)


def _reopen(runner, graph: str, values: dict) -> None:
    """A new session of `graph` from its portable file, with `values` replacing those initializers."""
    from fd.runtime.backends.onnxruntime import open_session
    ort = runner.ort
    options = ort.SessionOptions()
    # add_external_initializers replaces the graph's external-data initializers before any optimization. Not
    # add_initializer: with all optimizations on, the CPU's NCHWc Conv layout still read the file's Conv weights
    # (a zeroed conv_in.weight changed nothing at ORT_ENABLE_ALL; ONNX Runtime 1.32).
    arrays = {name: np.ascontiguousarray(value) for name, value in values.items()}
    if arrays:
        options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    spec = runner.specs[graph]
    started = time.perf_counter()
    session = open_session(ort, runner.engine_dir / spec["file"], graph, spec, options, runner.providers)
    runner.sessions[graph] = session
    runner.load_seconds[graph] = time.perf_counter() - started
    runner.loaded_files[graph] = spec["file"]
