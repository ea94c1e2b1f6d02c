"""fd: FasterDiffusion inference engines (Li et al., NeurIPS 2024, arXiv 2312.09608).

    from fd import Pipeline, Request
    pipe = Pipeline("engines/tiny-fp32-onnxruntime")
    result = pipe(Request(prompts=["a photo of an astronaut"], steps=50))
    result.images[0].save("astronaut.png")

`Pipeline` runs an engine folder made by fd-build (ONNX Runtime, TensorRT or torch); `Request` is everything one
generation asks for, `Policy` the FasterDiffusion part of it (key steps, window, noise injection, guidance interval).
The parts: fd.builder (fd-build), fd.runtime (fd-run and this API), fd.benchmarks (fd-bench), fd.serve (fd-serve).
"""
from __future__ import annotations

__all__ = ["Pipeline", "Policy", "Request", "Result", "FdError"]

_EXPORTS = {"Pipeline": ("fd.runtime.pipeline", "FasterDiffusionPipeline"),
            "Result": ("fd.runtime.pipeline", "GenerationResult"),
            "Request": ("fd.runtime.request", "Request"),
            "Policy": ("fd.runtime.request", "Policy"),
            "FdError": ("fd.runtime.errors", "FdError")}


def __getattr__(name: str):
    # Imported on first use, so `fd-build` and `fd-serve`'s HTTP front pay nothing for the runtime's imports.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fd' has no attribute {name!r}")
    import importlib
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__():
    return sorted(__all__)
