"""TensorRT backend: the four engines on one CUDA stream, with every buffer allocated once.

Each input and output of each engine gets one device buffer, sized for the largest shape its profile
allows; the engines share one activation block (they run one at a time on one stream). Values between
stages are `DeviceView`s into those buffers: the UNet encoder's cache is bound as the decoder's input
where it lies, and is repeated device-to-device for a window; it never visits the host.

APIs as documented in TensorRT 10's Python API (ICudaEngine, IExecutionContext; TensorRT 11 keeps the
ones used here) and cuda-python's runtime module. tensorrt and cuda are imported lazily, when a
TensorRT folder is loaded, so the rest of fd runs without them.
"""
from __future__ import annotations

import numpy as np

from runtime.backends import trt_plan
from runtime.backends.base import NUMPY_DTYPES, Backend
from runtime.backends.cuda_memory import DeviceBuffer, DeviceView, check, cuda_device, cudart
from runtime.errors import FdError
from runtime.sizes import rebuild_command

INSTALL = "pip install tensorrt-cu12 'cuda-python>=12.6,<13', or tensorrt-cu13 'cuda-python>=13,<14' for CUDA 13"


def import_tensorrt(fix: str):
    """The tensorrt module, or one FdError line saying how to get it."""
    try:
        import tensorrt as trt
    except Exception:  # a broken install raises OSError (missing libnvinfer/libnvonnxparser), not ImportError
        raise FdError(f"TensorRT is not installed: install it from NVIDIA ({INSTALL}) on a machine with an "
                      f"NVIDIA GPU, {fix}") from None
    if trt_plan.parse_version(trt.__version__)[:2] < trt_plan.MIN_TENSORRT:
        raise FdError(f"TensorRT {trt.__version__} is too old: fd needs {'.'.join(map(str, trt_plan.MIN_TENSORRT))} "
                      f"or newer ({INSTALL})")
    return trt


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_dir, manifest: dict, cuda_graphs: bool = False):
        super().__init__(engine_dir, manifest)
        trt = import_tensorrt("or use an engine folder built for --backend onnxruntime")
        self.trt, rt = trt, cudart()
        gpu_name, capability = cuda_device()
        # before deserializing: a mismatch gets one line with the rebuild command, not TensorRT's assertion
        trt_plan.check_compatible(manifest, trt.__version__, gpu_name, capability, manifest["height"],
                                  manifest["width"], engine_dir=str(self.engine_dir))
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.stream = check(rt.cudaStreamCreate(), "creating a CUDA stream")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # kept alive as long as the engines it made
        self.dtypes = {name: {t["name"]: np.dtype(NUMPY_DTYPES[t["dtype"]]) for t in spec["inputs"] + spec["outputs"]}
                       for name, spec in self.specs.items()}
        self.engines = {name: self._load_engine(name) for name in self.specs}
        self.buffers = {name: {tensor: DeviceBuffer(np.prod(shape) * self.dtypes[name][tensor].itemsize, tensor)
                               for tensor, shape in trt_plan.max_shapes(spec, manifest).items()}
                        for name, spec in self.specs.items()}
        self.activations = DeviceBuffer(max(map(_activation_bytes, self.engines.values())), "TensorRT activations")
        self.contexts = {name: self._new_context(name) for name in self.specs}

    def _load_engine(self, component: str):
        spec = self.specs[component]
        engine = self._runtime.deserialize_cuda_engine((self.engine_dir / spec["file"]).read_bytes())
        if engine is None:
            raise FdError(f"TensorRT could not load {self.engine_dir / spec['file']} (its log above says why): "
                          f"rebuild with `{rebuild_command(self.manifest, self.engine_dir)}`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {name: np.dtype(self.trt.nptype(engine.get_tensor_dtype(name))) for name in names}
        if io != self.dtypes[component]:
            raise FdError(f"{self.engine_dir / spec['file']} does not match its manifest (tensors {io}, expected "
                          f"{self.dtypes[component]}): rebuild with "
                          f"`{rebuild_command(self.manifest, self.engine_dir)}`")
        return engine

    def _new_context(self, component: str):
        """An execution context that computes in the shared activation block instead of its own.

        create_execution_context(USER_MANAGED) then set_device_memory(pointer, size), the calls Polygraphy
        0.53's TrtRunner makes; TensorRT 10.0 has only the pointer-only `device_memory` property."""
        context = self.engines[component].create_execution_context(
            self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise FdError(f"TensorRT could not create an execution context for {component} (its log above says why)")
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: binds setDeviceMemoryV2
            context.set_device_memory(self.activations.ptr, self.activations.nbytes)
        else:  # TensorRT 10.0
            context.device_memory = self.activations.ptr
        return context

    # --- primitives -----------------------------------------------------------------------------------
    def _run(self, component, feeds):
        inputs = [(t["name"], feeds[t["name"]]) for t in self.specs[component]["inputs"]]
        if not self.cuda_graphs:
            return self._execute(self.contexts[component], component, inputs)
        # A CUDA graph replays the kernels it recorded with the pointers and shapes they had then. That is
        # valid here because every buffer is allocated once: the key (the inputs' shapes and addresses)
        # recurs every window and also fixes the outputs' addresses. Each graph keeps its own context, whose
        # state must stay as captured, and TensorRT may update that state on the first run after a shape
        # change (TensorRT developer guide, "CUDA Graphs"): run once, then capture.
        key = (component, tuple((name, view.ptr, view.shape) for name, view in inputs))
        if key in self.graphs:
            graph, outputs, _ = self.graphs[key]
            check(cudart().cudaGraphLaunch(graph, self.stream), f"replaying the {component} CUDA graph")
            return outputs
        context = self._new_context(component)
        outputs = self._execute(context, component, inputs)
        self.graphs[key] = (self._capture(context, component), outputs, context)
        return outputs

    def _execute(self, context, component: str, inputs: list) -> list:
        """Set the inputs' shapes, bind every tensor's address, enqueue (execute_async_v3 takes the stream
        handle as an int, set_tensor_address a device pointer as an int)."""
        for name, view in inputs:
            if not context.set_input_shape(name, view.shape):
                raise FdError(f"{component}: {name} of shape {view.shape} is outside the engine's profile "
                              f"{self.specs[component].get('profile', {}).get(name)}: rebuild with larger limits")
        outputs = [self.buffers[component][t["name"]].view(context.get_tensor_shape(t["name"]),
                                                          self.dtypes[component][t["name"]], t["name"])
                   for t in self.specs[component]["outputs"]]
        for name, view in [*inputs, *((view.name, view) for view in outputs)]:
            if not context.set_tensor_address(name, view.ptr):
                raise RuntimeError(f"TensorRT refused the address of {component}.{name}")
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT failed to run {component} (its log above says why)")
        return outputs

    def _capture(self, context, component: str):
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
              f"starting CUDA graph capture of {component}")
        try:
            captured = context.execute_async_v3(int(self.stream))
        finally:
            graph = check(rt.cudaStreamEndCapture(self.stream), f"ending CUDA graph capture of {component}")
        if not captured:
            raise RuntimeError(f"TensorRT failed to enqueue {component} during CUDA graph capture")
        # ...WithFlags has one signature in cuda-python 11.8 to 13; cudaGraphInstantiate changed its in 12
        executable = check(rt.cudaGraphInstantiateWithFlags(graph, 0), f"instantiating the {component} CUDA graph")
        check(rt.cudaGraphDestroy(graph), "releasing a captured graph")  # the executable graph is independent
        return executable

    def _inputs(self, component, arrays):
        """Host arrays go straight into the component's own input buffers (fixed addresses, so CUDA graphs
        replay); device values, such as the cache, are bound where they lie."""
        placed = {}
        for name, value in arrays.items():
            if isinstance(value, np.ndarray):
                value = self._copy_in(value, self.buffers[component][name].view(
                    value.shape, self.dtypes[component][name], name))
            placed[name] = value
        return placed

    def _copy_in(self, array: np.ndarray, view: DeviceView) -> DeviceView:
        host = np.ascontiguousarray(array, dtype=view.dtype)
        # from pageable memory the call returns once the data is staged, so `host` may be freed after it
        self._memcpy(view.ptr, host.ctypes.data, host.nbytes, "cudaMemcpyHostToDevice")
        return view

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, src, nbytes, getattr(rt.cudaMemcpyKind, kind), self.stream), kind)

    def upload(self, array, dtype):
        """A host array in its own new device buffer (the stages use `_inputs`, which reuses buffers)."""
        dtype = np.dtype(NUMPY_DTYPES[dtype])
        buffer = DeviceBuffer(array.size * dtype.itemsize, "an upload")
        return self._copy_in(array, buffer.view(array.shape, dtype, "upload"))

    def download(self, value):
        host = np.empty(value.shape, value.dtype)
        self._memcpy(host.ctypes.data, value.ptr, value.nbytes, "cudaMemcpyDeviceToHost")
        self.synchronize()
        return host

    def repeat(self, value, times):
        # The cache keeps its tensor names from the encoder's outputs to the decoder's inputs, so the copies
        # land in the decoder's own input buffer; the encoder's output stays intact for the window's next call.
        shape = (len(value) * times, *value.shape[1:])
        out = self.buffers["unet_decoder"][value.name].view(shape, value.dtype, value.name)
        for k in range(times):
            if out.ptr + k * value.nbytes != value.ptr:  # else this copy is already in place
                self._memcpy(out.ptr + k * value.nbytes, value.ptr, value.nbytes, "cudaMemcpyDeviceToDevice")
        return out

    def synchronize(self):
        check(cudart().cudaStreamSynchronize(self.stream), "waiting for the GPU")

    def close(self):
        if self.stream is None:
            return
        self.synchronize()
        for graph, _, _ in self.graphs.values():
            check(cudart().cudaGraphExecDestroy(graph), "releasing a CUDA graph")
        self.graphs.clear()
        self.contexts.clear()  # contexts before the engines they belong to
        self.engines.clear()
        for buffer in [self.activations, *(b for tensors in self.buffers.values() for b in tensors.values())]:
            buffer.free()
        check(cudart().cudaStreamDestroy(self.stream), "releasing the CUDA stream")
        self.stream = None


def _activation_bytes(engine) -> int:
    """Scratch memory an execution context needs (device_memory_size_v2 since TensorRT 10.1; 11 drops v1)."""
    return engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size
