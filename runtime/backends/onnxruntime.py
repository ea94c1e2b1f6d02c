"""ONNX Runtime backend: the portable one (CPU everywhere; CUDA with onnxruntime-gpu)."""
from __future__ import annotations

import numpy as np

from runtime.backends.base import NUMPY_DTYPES, Backend
from runtime.errors import FdError


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, engine_dir, manifest: dict, providers: list[str] | None = None, threads: int | None = None,
                 cuda_graphs: bool = False):
        super().__init__(engine_dir, manifest)
        if cuda_graphs:
            raise FdError("--cuda-graphs is for TensorRT and torch engine folders; this one is for ONNX Runtime")
        try:
            import onnxruntime as ort
        except ImportError:
            raise FdError("this engine folder needs ONNX Runtime: pip install 'fd[ort]'") from None
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(str(self.engine_dir / spec["file"]), options, providers=self.providers)
            for name, spec in self.specs.items()
        }
        self.output_names = {name: [t["name"] for t in spec["outputs"]] for name, spec in self.specs.items()}

    def _run(self, component, feeds):
        return self.sessions[component].run(self.output_names[component], feeds)

    def upload(self, array, dtype):
        return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype])

    def download(self, value):
        return value

    def repeat(self, value, times):
        return np.concatenate([value] * times)

    def close(self):
        self.sessions.clear()
