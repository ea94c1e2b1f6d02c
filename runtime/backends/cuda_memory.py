"""CUDA through cuda-python for the TensorRT runner: device buffers, views into them, error checks.

Call shapes follow cuda-python's runtime module (every call returns (error, *values)). Imported lazily.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fd.runtime.errors import FdError


@functools.cache
def cudart():
    """cuda-python's runtime module (cuda.bindings.runtime since 12.6; cuda.cudart before, gone in 13)."""
    try:
        from cuda.bindings import runtime
    except Exception:
        try:
            from cuda import cudart as runtime
        except Exception:
            raise FdError("cuda-python is not installed: TensorRT engines need it (pip install cuda-python)") from None
    return runtime


def check(result, what: str):
    """cuda-python calls return (error, *values): raise on error, else return the value(s)."""
    rt = cudart()
    err, *values = result
    if err == rt.cudaError_t.cudaErrorMemoryAllocation:
        raise FdError(f"out of GPU memory while {what}: free the GPU, or rebuild with a smaller "
                      "--max-batch-size or --max-window")
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {getattr(err, 'name', err)} while {what}")
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device() -> tuple[str, str]:
    """(name, compute capability "major.minor") of the current GPU, read the same way at build and load."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:  # cuda-python 13 needs a CUDA 13 driver (580+)
        raise FdError("the NVIDIA driver is older than this cuda-python's CUDA: upgrade the driver, or install "
                      "the cuda-python of your CUDA major version (e.g. pip install 'cuda-python>=12.6,<13')")
    if err != rt.cudaError_t.cudaSuccess or count == 0:
        raise FdError(f"no CUDA GPU is visible ({getattr(err, 'name', err)}): TensorRT engines need an NVIDIA GPU "
                      "and driver (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    props = check(rt.cudaGetDeviceProperties(check(rt.cudaGetDevice(), "finding the GPU")), "reading the GPU")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.split("\x00")[0].strip(), f"{props.major}.{props.minor}"


def device_free_bytes() -> int:
    """Free memory of the current GPU (device-wide: other processes' allocations show here too)."""
    free, _total = check(cudart().cudaMemGetInfo(), "reading the GPU's free memory")
    return int(free)


class MemoryMeter:
    """Bytes held in the DeviceBuffers that name it, and their peak since the last reset."""

    def __init__(self):
        self.held = self.peak = 0

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def remove(self, nbytes: int) -> None:
        self.held -= nbytes

    def reset(self) -> None:
        self.peak = self.held


class DeviceBuffer:
    """One cudaMalloc'd block (256-byte aligned, as TensorRT requires)."""

    def __init__(self, nbytes: int, what: str, meter: MemoryMeter | None = None):
        self.nbytes, self.what, self.meter = max(int(nbytes), 1), what, None
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"allocating {self.nbytes / 2**20:.1f} MiB for {what}"))
        if meter is not None:
            self.meter = meter
            meter.add(self.nbytes)

    def view(self, shape, dtype, name: str) -> DeviceView:
        view = DeviceView(self, tuple(int(d) for d in shape), np.dtype(dtype), name)
        if view.nbytes > self.nbytes:
            raise FdError(f"{name} of shape {view.shape} is larger than this engine folder's profiles allow: "
                          "rebuild with a larger --max-batch-size or --max-window")
        return view

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            if self.meter is not None:
                self.meter.remove(self.nbytes)
            check(cudart().cudaFree(ptr), "freeing GPU memory")

    def __del__(self):  # buffers of a runner that failed half-way through construction, dropped scratch
        try:
            self.free()
        except Exception:
            pass


@dataclass(frozen=True)
class DeviceView:
    """A runner-native value: `shape` elements of `dtype` at the start of `buffer`. A graph's output stays
    valid until that graph runs again (the pipeline uses a cache only within its window); other values
    until their buffer is written again (see TensorRTRunner.concat)."""
    buffer: DeviceBuffer
    shape: tuple
    dtype: np.dtype
    name: str

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]
