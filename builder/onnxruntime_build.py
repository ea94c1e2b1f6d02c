"""ONNX Runtime folders: store each checked graph as ONNX Runtime optimizes it for the CPU, for a fast load.

Creating a session from the exported graph optimizes it first (all levels: constant folding, fusions and
the NCHWc layout for the CPU's vector width) and that took most of an SD-sized folder's load. Here each
graph is optimized once, at build time, and saved beside the portable one as <component>.opt.onnx with its
weights in <component>.opt.onnx.data (aligned, so ONNX Runtime memory-maps them instead of parsing and
copying them). The manifest names both files (components.<name>.optimized) and records what they were made
for (backend_info.optimized_graphs: ONNX Runtime's version, the CPU provider, the CPU's instruction sets).
backend_info.file_bytes records every graph file's size, checked before any session opens.

ONNX Runtime's documentation says an offline-optimized graph with layout optimizations must run with the
same options and on compatible hardware, so the runtime uses these graphs only where that record matches
(runtime/backends/onnxruntime.py) and otherwise loads the portable graph, optimizing it at load as before.
Prepacked weights are not stored: they depend on the CPU's kernels too and saved little more at load.
"""
from __future__ import annotations

import time
from pathlib import Path

from fd.runtime.backends.onnxruntime import STORED_PROVIDER, cpu_signature, stored_graphs_record
from fd.runtime.errors import FdError

OPTIMIZED_SUFFIX = ".opt.onnx"
EXTERNAL_MIN_BYTES = 1024  # initializers this size or larger go to the data file, where they can be mapped


def finish(stage: Path, specs: dict, modules: dict, precision: str, opts, geometry: dict, log) -> dict:
    """Add each graph's optimized copy to the stage and its files to its spec; return manifest["backend_info"].

    `modules`, `precision`, `opts` and `geometry` are unused: the graphs were checked before this step."""
    import onnxruntime as ort

    info = {}
    signature = cpu_signature()
    if signature is None:
        log("  no optimized graphs stored: this system does not say which instruction sets its CPU has "
            "(/proc/cpuinfo), so nothing could check that a later load runs on the same kind of CPU")
    else:
        started = time.perf_counter()
        for name, spec in specs.items():
            spec["optimized"] = save_optimized(ort, stage, name, spec["file"])
        log(f"  optimized graphs for ONNX Runtime {ort.__version__} on this CPU stored in "
            f"{time.perf_counter() - started:.1f} s")
        info["optimized_graphs"] = stored_graphs_record(ort.__version__, signature)
    # every graph file's size, so that a truncated copy is one line at load (and before fd-serve starts Ray)
    info["file_bytes"] = {path.name: path.stat().st_size for path in sorted(stage.iterdir())
                          if path.is_file() and path.name.endswith((".onnx", ".onnx.data"))}
    return info


def save_optimized(ort, stage: Path, name: str, graph_file: str) -> dict:
    """Optimize one graph with every level on the CPU provider and save it; return its manifest record."""
    graph = f"{name}{OPTIMIZED_SUFFIX}"
    data = f"{graph}.data"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(stage / graph)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(EXTERNAL_MIN_BYTES))
    options.log_severity_level = 3  # ORT warns that such a graph is for this hardware: the manifest records it
    try:
        ort.InferenceSession(str(stage / graph_file), options, providers=[STORED_PROVIDER])
    except Exception as exc:  # noqa: BLE001 - ORT's exceptions share no base class
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FdError(f"ONNX Runtime could not optimize {graph_file} for storing ({first})") from None
    if not (stage / graph).is_file():
        raise FdError(f"ONNX Runtime did not write the optimized graph {graph} for {graph_file}")
    return {"file": graph, **({"data": data} if (stage / data).is_file() else {})}
