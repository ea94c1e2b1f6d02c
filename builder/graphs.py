"""Family modules → checked graphs: every graph is exported (ONNX; for the torch backend a torch.export
program, which is its engine) and run against its PyTorch module on random inputs. A graph over
tolerance fails the build (export.compare raises), so a folder never holds an unchecked graph."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fd.builder import export
from fd.builder.specs import has_spatial_axes


def export_and_check(modules: dict, specs: dict, stage: Path, backend: str, geometry: dict, precision: str,
                     vocab: int, seed: int = 0, device: str = "cpu") -> None:
    """Write each graph into `stage`; record its file, export time and check in its spec."""
    rng = np.random.default_rng(seed)
    for name in tqdm(specs, desc="export + check", unit="graph", disable=None):  # no bar when not a terminal
        spec, module = specs[name], modules[name]
        started = time.perf_counter()
        if backend == "torch":  # the .pt2 programs are the engines: the torch runtime reads no ONNX
            from fd.builder import torch_build
            path = stage / f"{name}.pt2"
            torch_build.export_program(module, spec, rng, vocab, path)
            seconds = time.perf_counter() - started
            check = torch_build.check_program(path, module, spec, rng, vocab, precision, device)
        else:
            path = stage / f"{name}.onnx"
            feeds = export.random_inputs(spec, spec["batch"]["min"] + 1, rng, vocab)
            export.export_onnx(module, spec, feeds, path, dynamic_spatial=geometry["dynamic_shape"] is not None)
            seconds = time.perf_counter() - started
            check = export.check_onnx(path, module, spec, feeds, precision)
            if geometry["dynamic_shape"] and has_spatial_axes(spec):
                check = check_other_size(path, module, spec, geometry, check, rng, vocab, precision)
        spec.update(file=path.name, export_seconds=round(seconds, 2), check=check)
        tqdm.write(f"  {name}: {export.file_size(path) / 1e6:.1f} MB, max relative error vs PyTorch "
                   f"{check['max_rel_error']:.2e} (tolerance {check['tolerance']:g})"
                   + "".join(f", checked at {h}x{w}" for h, w in check.get("sizes", [])))


def check_other_size(path, module, spec, geometry, check, rng, vocab, precision) -> dict:
    """Check a dynamic-size graph again at the smallest side of its range: a size baked into the graph
    by tracing would pass at the built size and fail here."""
    built, side = (geometry["height"], geometry["width"]), geometry["dynamic_shape"]["min"]
    feeds = export.random_inputs(spec, spec["batch"]["min"], rng, vocab, resize=(built, (side, side)))
    other = export.check_onnx(path, module, spec, feeds, precision)
    return {**check, "max_rel_error": max(check["max_rel_error"], other["max_rel_error"]),
            "sizes": [list(built), [side, side]]}
