"""Inference backends behind one interface; heavy libraries are imported only by the backend in use."""
from __future__ import annotations

from runtime.errors import FdError


def load_backend(engine_dir, manifest, **options):
    """The backend an engine folder was built for (its manifest says which)."""
    backend = manifest["backend"]
    if backend == "onnxruntime":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend as cls
    elif backend == "tensorrt":
        from runtime.backends.tensorrt import TensorRTBackend as cls
    elif backend == "torch":
        from runtime.backends.torch import TorchBackend as cls
    else:
        raise FdError(f"engine folder {engine_dir} is for backend '{backend}', which this fd does not know: "
                      "upgrade fd or rebuild the folder")
    return cls(engine_dir, manifest, **options)
