"""Run-time LoRA: apply LoRAs to a refittable engine folder (fd-build --refittable) without a rebuild.

`set_loras(pipeline, ["style.safetensors:0.8", ...])` replaces the folder's LoRA set (an empty list: none), and
touches only the graphs whose weights the new or the previous set changes:
- ONNX Runtime: a fresh session of the portable graph, the changed weights given as initializers
  (SessionOptions.add_external_initializers: ONNX Runtime uses them instead of the data file's and optimizes the
  graph with them); the other graphs keep their sessions.
- TensorRT: the touched engines refitted in place (runtime/backends/trt_refit.py, trt.Refitter: untested here,
  no TensorRT on this machine).
- torch: the merged tensors copied into the loaded programs' parameters, in place (no program reloads); the base
  values of the parameters a LoRA changed are kept on the host, so removing a LoRA restores them exactly.
Each changed weight is the base weight (ONNX: read from the graph's data file where the build's `refit` record
says it lies, builder/refit.py) plus Σ scale · update, the update computed by the build's own LoRA reader
(builder/lora.py: diffusers' key conversion, so swapping needs fd's build extra: torch and diffusers).

A Request's `loras` (fd-run --lora, fd-serve's "loras", the API's `pipe(..., loras=[...])`) names the set a
generation runs with; the pipeline swaps only when it differs from the current one (`apply_request_loras`).
Not here: swapping while a generation runs (the pipeline swaps between generations), and CUDA graphs (refused).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from fd.runtime.errors import FdError

REFIT_HINT = "rebuild the folder with fd-build --refittable, or fuse the LoRA at build with fd-build --lora"
SWAPPING_BACKENDS = ("onnxruntime", "tensorrt", "torch")


# --- the request's declaration: (file, scale) pairs ----------------------------------------------------------

def split_lora_text(text: str) -> tuple[str, float]:
    """FILE[:SCALE] → (FILE, SCALE): the part after the last colon is the scale when it is a number (1.0 else)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, check_scale(float(tail), text)
        except ValueError:
            pass  # a colon inside the path
    return text, 1.0


def check_scale(scale: float, text) -> float:
    if not math.isfinite(scale):
        raise FdError(f"--lora {text}: the scale must be a finite number, e.g. style.safetensors:0.8")
    return scale


def lora_choices(loras) -> tuple[tuple[str, float], ...]:
    """A Request's `loras` ("FILE[:SCALE]" texts or (file, scale) pairs) as (file, scale) pairs, checked without
    touching the file system (fd-run checks the files, fd-serve resolves names in its --lora-dir)."""
    if isinstance(loras, (str, bytes, os.PathLike)) or not isinstance(loras, (list, tuple)):
        raise FdError("loras must be a list of 'FILE[:SCALE]' texts or (file, scale) pairs")
    choices = []
    for item in loras:
        if isinstance(item, str):
            path, scale = split_lora_text(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            path, scale = os.fspath(item[0]), item[1]
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
                raise FdError(f"--lora {path}: the scale {scale!r} is not a number, e.g. ({path!r}, 0.8)")
            scale = check_scale(float(scale), f"{path}:{scale}")
        else:
            raise FdError(f"LoRA {item!r} is neither 'FILE[:SCALE]' nor a (file, scale) pair")
        if not path.strip():
            raise FdError("--lora: the file name is empty: give the path of a .safetensors file")
        choices.append((path, float(scale)))
    return tuple(choices)


def check_folder_takes_loras(manifest: dict, engine_dir, loras) -> None:
    """The request's LoRAs against the folder (EngineFolder.prepare): it must be refittable, on a backend that
    swaps. What the files change is checked when they are applied (reading them needs torch and diffusers)."""
    if not loras:
        return
    if not manifest.get("refit"):
        raise FdError(f"{engine_dir} was built without --refittable, so its weights cannot be swapped: {REFIT_HINT}")
    if manifest["backend"] not in SWAPPING_BACKENDS:
        raise FdError(f"run-time LoRA is implemented for {', '.join(SWAPPING_BACKENDS)} folders, not "
                      f"{manifest['backend']}: {REFIT_HINT}")


def apply_request_loras(pipeline, loras) -> dict | None:
    """Swap to the request's LoRA set unless it is the current one (same files, unchanged on disk, same scales);
    None: no swap was needed."""
    if loras is None or _identity(loras) == pipeline.__dict__.get("_lora_identity", ()):
        return None
    return set_loras(pipeline, list(loras))


def _identity(loras) -> tuple:
    """What makes two LoRA sets the same: each file (resolved, with its size and modification time, so a file
    replaced on disk counts as new) and scale, in order."""
    out = []
    for path, scale in lora_choices(list(loras)):
        resolved = Path(path).expanduser().resolve()
        stat = resolved.stat() if resolved.is_file() else None
        out.append((str(resolved), stat and (stat.st_size, stat.st_mtime_ns), scale))
    return tuple(out)


# --- swapping ----------------------------------------------------------------------------------------------

def set_loras(pipeline, loras: list) -> dict:
    """Replace the pipeline's run-time LoRAs by `loras` ("FILE[:SCALE]" texts or (path, scale) pairs).
    Returns {"graphs": the graphs reloaded (ONNX Runtime), refitted (TensorRT) or updated in place (torch),
    "seconds": the time it took}."""
    refit = pipeline.manifest.get("refit")
    if not refit:
        raise FdError(f"{pipeline.engine_dir} was built without --refittable, so its weights cannot be swapped: "
                      f"{REFIT_HINT}")
    runner = pipeline.runner
    if runner.name not in SWAPPING_BACKENDS:
        raise FdError(f"run-time LoRA is implemented for {', '.join(SWAPPING_BACKENDS)} folders, not {runner.name}: "
                      f"{REFIT_HINT}")
    if getattr(runner, "cuda_graphs", False) or (runner.name == "torch" and runner.graphs is not None):
        raise FdError("run-time LoRA with --cuda-graphs is not supported (captured graphs would keep the old "
                      "weights): drop --cuda-graphs")
    started = time.perf_counter()
    choices = lora_choices(list(loras))
    totals = _summed_updates(pipeline.manifest, refit, choices)
    changed = pipeline.__dict__.setdefault("_lora_changed", {})  # graph → weights now off their base
    done = []
    for graph, record in refit["graphs"].items():
        if runner.name == "torch":
            values = {w["name"]: totals[key] for w in record["weights"]
                      if (key := (w["component"], w["parameter"])) in totals}
        else:
            values = _onnx_values(pipeline, graph, record, totals)
        if not values and not changed.get(graph):
            continue  # neither the old nor the new set changes this graph: its session or engine stays
        if runner.name == "onnxruntime":
            _reopen(runner, graph, values)  # a fresh session starts from the file's weights
        elif runner.name == "torch":
            _update_program(runner, graph, values, changed.get(graph, set()))
        else:
            from fd.runtime.backends.trt_refit import refit_engine
            data = pipeline.engine_dir / record["data"]
            reverted = {name: _base(data, record["initializers"][name])
                        for name in changed.get(graph, set()) - set(values)}
            refit_engine(runner.trt, runner.engines[graph], runner._logger, {**reverted, **values},
                         lambda name: _base(data, record["initializers"][name]), graph)
        changed[graph] = set(values)
        done.append(graph)
    pipeline.__dict__["_lora_identity"] = _identity(choices)
    return {"graphs": done, "seconds": time.perf_counter() - started}


def check_lora_options(texts: list[str]) -> None:
    """fd-run --lora FILE[:SCALE]: the files exist and are .safetensors, checked before any engine loads."""
    from fd.builder.adapt import parse_lora
    for text in texts:
        parse_lora(text, False)


def _summed_updates(manifest: dict, refit: dict, choices) -> dict:
    """{(component, parameter): Σ scale · update} as float32 arrays, checked against what the folder can swap."""
    from fd.builder.adapt import check_file
    from fd.builder.lora import lora_deltas
    swappable = {(w["component"], w["parameter"]) for g in refit["graphs"].values() for w in g["weights"]}
    tables = {component: {p: tuple(s) for p, s in table.items()} for component, table in refit["parameters"].items()}
    totals: dict = {}
    for text, scale in choices:
        path = check_file(text, "--lora", allow_pickle=False)
        for d in lora_deltas(path, manifest["family"], tables, refit.get("unet_config")):
            key = (d.component, d.parameter)
            if key not in swappable:
                raise FdError(f"--lora {path.name}: it changes {d.component}.{d.parameter}, which this folder "
                              "cannot swap at run time: fuse this LoRA at build with fd-build --lora")
            totals[key] = totals.get(key, 0) + np.float32(scale) * d.delta.numpy()
    return totals


def _onnx_values(pipeline, graph: str, record: dict, totals: dict) -> dict:
    """{initializer: new value} of an ONNX Runtime or TensorRT graph, from its data file's base weights."""
    if Path(record["data"]).name != record["data"]:  # the folder's own file, never a path elsewhere
        raise FdError(f"{pipeline.engine_dir}: manifest refit.graphs.{graph}.data is not a file name: "
                      "rebuild the folder with fd-build --refittable")
    data = pipeline.engine_dir / record["data"]
    return {w["initializer"]: _new_weight(data, w, totals[w["component"], w["parameter"]])
            for w in record["weights"] if (w["component"], w["parameter"]) in totals}


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


def _update_program(runner, graph: str, values: dict, before: set) -> None:
    """Copy base + update into the loaded torch program's parameters (named as in the program), in place; the
    parameters the previous set changed and this one does not get their base values back."""
    torch = runner.torch
    module = runner.modules[graph]
    bases = runner.__dict__.setdefault("lora_bases", {}).setdefault(graph, {})  # name → base value, on the host
    with torch.no_grad():
        for name in set(values) | before:
            parameter = module.get_parameter(name)
            if name not in bases:
                bases[name] = parameter.detach().to("cpu", copy=True)
            base = bases[name]
            if name in values:
                merged = base.float() + torch.from_numpy(values[name]).reshape(base.shape)
                parameter.copy_(merged.to(parameter.dtype))
            else:
                parameter.copy_(base)
