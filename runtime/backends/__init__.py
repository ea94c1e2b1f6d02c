"""The backends, in one table: what each can do, and the runner that loads its engine folders.

Every check of a backend name or ability (fd-build's precisions and --dynamic-shape, fd-run's size and
--cuda-graphs checks, fd-bench) reads this table. Heavy libraries are imported only by the runner in use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from fd.runtime.errors import FdError


@dataclass(frozen=True)
class BackendInfo:
    name: str
    runner: str  # "module:class" of its runner, imported when a folder of this backend is loaded
    precisions: tuple[str, ...]
    default_precision: str
    dynamic_shapes: bool  # folders can be built for a range of image sizes (--dynamic-shape)
    cuda_graphs: bool  # the runner can capture and replay CUDA graphs (--cuda-graphs)


BACKENDS: dict[str, BackendInfo] = {info.name: info for info in (
    BackendInfo("onnxruntime", "fd.runtime.backends.onnxruntime:OnnxRuntimeRunner", ("fp32", "fp16"), "fp32",
                dynamic_shapes=True, cuda_graphs=False),
    BackendInfo("tensorrt", "fd.runtime.backends.tensorrt:TensorRTRunner", ("fp32", "fp16", "tf32"), "fp16",
                dynamic_shapes=True, cuda_graphs=True),
    BackendInfo("torch", "fd.runtime.backends.torch:TorchRunner", ("fp32", "fp16"), "fp16",
                dynamic_shapes=False, cuda_graphs=True),
)}


def backend_info(name: str, engine_dir=None) -> BackendInfo:
    info = BACKENDS.get(name)
    if info is None:
        where = f"engine folder {engine_dir} is for backend {name!r}, which this fd does not know: upgrade fd or " \
                "rebuild the folder" if engine_dir else f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}"
        raise FdError(where)
    return info


def load_runner(engine_dir, manifest: dict, **options):
    """The runner for the backend an engine folder was built for (its manifest says which)."""
    info = backend_info(manifest["backend"], engine_dir)
    if options.get("cuda_graphs") and not info.cuda_graphs:
        raise FdError(f"--cuda-graphs is for {', '.join(b.name for b in BACKENDS.values() if b.cuda_graphs)} engine "
                      f"folders; this one is for {info.name}: drop --cuda-graphs")
    module, cls = info.runner.split(":")
    return getattr(importlib.import_module(module), cls)(engine_dir, manifest, **options)
