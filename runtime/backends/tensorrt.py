"""TensorRT runner: the engines of every graph of a folder on one CUDA stream, with every buffer allocated once.

Each input and output of each engine gets one device buffer, sized for the largest shape its profile
allows; the engines share one activation block (they run one at a time on one stream). Values between
graphs are `DeviceView`s into those buffers: the UNet encoder's cache is bound as the decoder's input
where it lies, and is concatenated device-to-device into the decoder's own input buffers for a window;
it never visits the host.

APIs as documented in TensorRT 10's Python API (ICudaEngine, IExecutionContext; TensorRT 11 keeps the
ones used here) and cuda-python's runtime module. tensorrt and cuda are imported lazily, when a
TensorRT folder is loaded, so the rest of fd runs without them.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from fd.runtime.backends import trt_plan
from fd.runtime.backends.cuda_memory import (DeviceBuffer, DeviceView, MemoryMeter, check, cuda_device, cudart,
                                          device_free_bytes)
from fd.runtime.backends.runner import NUMPY_DTYPES, Capabilities, Runner
from fd.runtime.errors import FdError
from fd.runtime.sizes import rebuild_command

TENSOR_ALIGNMENT = 256  # bytes: TensorRT's rule for every address bound to an engine's input or output
INSTALL = "pip install tensorrt-cu12 'cuda-python>=12.6,<13', or tensorrt-cu13 'cuda-python>=13,<14' for CUDA 13"


@dataclass(frozen=True)
class RowsView(DeviceView):
    """Some rows of a value: the same buffer, `offset` bytes in (a view; nothing is copied)."""
    offset: int = 0

    @property
    def ptr(self) -> int:
        return self.buffer.ptr + self.offset


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


class TensorRTRunner(Runner):
    name = "tensorrt"
    capabilities = Capabilities(on_gpu=True, peak_memory=True, cuda_graphs=True, dynamic_shapes=True)

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
        self.meter = MemoryMeter()  # every buffer this runner allocates
        self.tensorrt_bytes = 0  # what TensorRT itself took: engine weights, execution contexts
        self._allocated: weakref.WeakSet[DeviceBuffer] = weakref.WeakSet()  # freed by close(), uploads too
        self._scratch: dict[object, list[DeviceBuffer]] = {}  # concat results not bound for a graph input
        self._zeros: dict[np.dtype, DeviceBuffer] = {}
        self.stream = check(rt.cudaStreamCreate(), "creating a CUDA stream")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # kept alive as long as the engines it made
        self.dtypes = {name: {t["name"]: np.dtype(NUMPY_DTYPES[t["dtype"]]) for t in spec["inputs"] + spec["outputs"]}
                       for name, spec in self.specs.items()}
        self.engines = {name: self._load_engine(name) for name in self.specs}
        self.buffers = {name: {tensor: self._alloc(math.prod(shape) * self.dtypes[name][tensor].itemsize,
                                                   f"{name}.{tensor}")
                               for tensor, shape in trt_plan.max_shapes(spec, manifest).items()}
                        for name, spec in self.specs.items()}
        self.activations = self._alloc(max(map(_activation_bytes, self.engines.values())), "TensorRT activations")
        self.contexts = {name: self._new_context(name) for name in self.specs}

    def _alloc(self, nbytes: int, what: str) -> DeviceBuffer:
        buffer = DeviceBuffer(nbytes, what, self.meter)
        self._allocated.add(buffer)
        return buffer

    def _measured(self, make):
        """make(), counting the device memory it took into tensorrt_bytes (TensorRT allocates weights and
        context state itself, not through this runner)."""
        free = device_free_bytes()
        try:
            return make()
        finally:
            self.tensorrt_bytes += max(free - device_free_bytes(), 0)

    def _load_engine(self, graph: str):
        spec = self.specs[graph]
        data = (self.engine_dir / spec["file"]).read_bytes()
        engine = self._measured(lambda: self._runtime.deserialize_cuda_engine(data))
        if engine is None:
            raise FdError(f"TensorRT could not load {self.engine_dir / spec['file']} (its log above says why): "
                          f"rebuild with `{rebuild_command(self.manifest, self.engine_dir)}`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {name: np.dtype(self.trt.nptype(engine.get_tensor_dtype(name))) for name in names}
        if io != self.dtypes[graph]:
            raise FdError(f"{self.engine_dir / spec['file']} does not match its manifest (tensors {io}, expected "
                          f"{self.dtypes[graph]}): rebuild with `{rebuild_command(self.manifest, self.engine_dir)}`")
        return engine

    def _new_context(self, graph: str):
        """An execution context that computes in the shared activation block instead of its own.

        create_execution_context(USER_MANAGED) then set_device_memory(pointer, size), the calls Polygraphy
        0.53's TrtRunner makes; TensorRT 10.0 has only the pointer-only `device_memory` property."""
        context = self._measured(lambda: self.engines[graph].create_execution_context(
            self.trt.ExecutionContextAllocationStrategy.USER_MANAGED))
        if context is None:
            raise FdError(f"TensorRT could not create an execution context for {graph} (its log above says why)")
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: binds setDeviceMemoryV2
            context.set_device_memory(self.activations.ptr, self.activations.nbytes)
        else:  # TensorRT 10.0
            context.device_memory = self.activations.ptr
        return context

    # --- running graphs ---------------------------------------------------------------------------------
    def run(self, graph, feeds):
        # Host arrays are copied into the graph's own input buffers rather than into a fresh upload() (what
        # Runner.run would do): those addresses never change, so a captured CUDA graph stays valid and no
        # call allocates. Device values are bound where they lie.
        return super().run(graph, {name: self._place(graph, name, value) if isinstance(value, np.ndarray) else value
                                   for name, value in feeds.items()})

    def upload_input(self, graph, name, array):
        """The array in `graph`'s own input buffer `name` (fixed address, as in run()); valid until another
        value is placed or concatenated there."""
        return self._place(graph, name, array)

    def _place(self, graph: str, name: str, array: np.ndarray) -> DeviceView:
        if name not in self.buffers[graph]:
            raise KeyError(f"{graph} has no tensor {name!r}")
        return self._copy_in(array, self.buffers[graph][name].view(array.shape, self.dtypes[graph][name], name))

    def _execute(self, graph, feeds):
        inputs = []
        for tensor in self.specs[graph]["inputs"]:
            name, view = tensor["name"], feeds[tensor["name"]]
            if view.dtype != self.dtypes[graph][name]:
                raise FdError(f"{graph}.{name} is given {view.dtype} where its engine takes "
                              f"{self.dtypes[graph][name]}: the folder's graphs disagree, rebuild with "
                              f"`{rebuild_command(self.manifest, self.engine_dir)}`")
            inputs.append((name, view))
        if not self.cuda_graphs:
            return self._enqueue(self.contexts[graph], graph, inputs)
        # A CUDA graph replays the kernels it recorded with the pointers and shapes they had then. That is
        # valid here because every buffer is allocated once: the key (the inputs' shapes and addresses)
        # recurs every window and also fixes the outputs' addresses. Each graph keeps its own context, whose
        # state must stay as captured, and TensorRT may update that state on the first run after a shape
        # change (TensorRT developer guide, "CUDA Graphs"): run once, then capture.
        key = (graph, tuple((name, view.ptr, view.shape) for name, view in inputs))
        if key in self.graphs:
            executable, outputs, _ = self.graphs[key]
            check(cudart().cudaGraphLaunch(executable, self.stream), f"replaying the {graph} CUDA graph")
            return outputs
        context = self._new_context(graph)
        outputs = self._enqueue(context, graph, inputs)
        self.graphs[key] = (self._capture(context, graph), outputs, context)
        return outputs

    def _enqueue(self, context, graph: str, inputs: list) -> dict:
        """Set the inputs' shapes, bind every tensor's address, enqueue (execute_async_v3 takes the stream
        handle as an int, set_tensor_address a device pointer as an int)."""
        for name, view in inputs:
            if not context.set_input_shape(name, view.shape):
                raise FdError(f"{graph}: {name} of shape {view.shape} is outside the engine's profile "
                              f"{self.specs[graph].get('profile', {}).get(name)}: rebuild with larger limits")
        outputs = {t["name"]: self.buffers[graph][t["name"]].view(context.get_tensor_shape(t["name"]),
                                                                 self.dtypes[graph][t["name"]], t["name"])
                   for t in self.specs[graph]["outputs"]}
        for name, view in [*inputs, *outputs.items()]:
            if not context.set_tensor_address(name, view.ptr):
                raise RuntimeError(f"TensorRT refused the address of {graph}.{name}")
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT failed to run {graph} (its log above says why)")
        return outputs

    def _capture(self, context, graph: str):
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
              f"starting CUDA graph capture of {graph}")
        try:
            captured = context.execute_async_v3(int(self.stream))
        finally:
            cuda_graph = check(rt.cudaStreamEndCapture(self.stream), f"ending CUDA graph capture of {graph}")
        if not captured:
            raise RuntimeError(f"TensorRT failed to enqueue {graph} during CUDA graph capture")
        # ...WithFlags has one signature in cuda-python 11.8 to 13; cudaGraphInstantiate changed its in 12
        executable = check(rt.cudaGraphInstantiateWithFlags(cuda_graph, 0), f"instantiating the {graph} CUDA graph")
        check(rt.cudaGraphDestroy(cuda_graph), "releasing a captured graph")  # the executable graph is independent
        return executable

    # --- moving values --------------------------------------------------------------------------------
    def _copy_in(self, array: np.ndarray, view: DeviceView) -> DeviceView:
        host = np.ascontiguousarray(array, dtype=view.dtype)
        # from pageable memory the call returns once the data is staged, so `host` may be freed after it
        self._memcpy(view.ptr, host.ctypes.data, host.nbytes, "cudaMemcpyHostToDevice")
        return view

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, src, nbytes, getattr(rt.cudaMemcpyKind, kind), self.stream), kind)

    def upload(self, array, dtype):
        """A host array in its own new device buffer (run() and upload_input() reuse the graphs' buffers)."""
        dtype = np.dtype(NUMPY_DTYPES[dtype])
        return self._copy_in(array, self._alloc(array.size * dtype.itemsize, "an upload").view(array.shape, dtype,
                                                                                                 "upload"))

    def download(self, value):
        host = np.empty(value.shape, value.dtype)
        self._memcpy(host.ctypes.data, value.ptr, value.nbytes, "cudaMemcpyDeviceToHost")
        self.synchronize()
        return host

    def concat(self, values, axis=0, key=None):
        """Device-to-device copies into one buffer, chosen by `key`:

        - "graph.tensor" naming an input of a graph: that graph's own input buffer (fixed address, so the
          CUDA graphs of its calls replay);
        - any other key: a scratch buffer kept for that key (None: for these input shapes and axis), grown
          when needed, so its address is stable from call to call.
        The result is valid until the next concat into the same buffer. A buffer that one of `values` lies
        in is never written, except when it is the first part, already in place."""
        first = values[0]
        axis = axis % len(first.shape)
        for value in values:
            if value.dtype != first.dtype or value.shape[:axis] != first.shape[:axis] \
                    or value.shape[axis + 1:] != first.shape[axis + 1:]:
                raise ValueError(f"cannot concatenate {[(v.shape, str(v.dtype)) for v in values]} along axis {axis}")
        shape = (*first.shape[:axis], sum(v.shape[axis] for v in values), *first.shape[axis + 1:])
        out = self._concat_destination(values, shape, axis, key)
        rows = math.prod(shape[:axis])  # 2-D copies: `rows` rows, each part filling its slice of every row
        row_bytes, offset = math.prod(shape[axis:]) * first.dtype.itemsize, 0
        rt = cudart()
        for value in values:
            width = math.prod(value.shape[axis:]) * value.dtype.itemsize
            if out.ptr + offset == value.ptr:  # the first part, already in place
                pass
            elif axis == 0:
                self._memcpy(out.ptr + offset, value.ptr, value.nbytes, "cudaMemcpyDeviceToDevice")
            else:
                check(rt.cudaMemcpy2DAsync(out.ptr + offset, row_bytes, value.ptr, width, width, rows,
                                           rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream),
                      "cudaMemcpy2DAsync")
            offset += width
        return out

    def _concat_destination(self, values: list, shape: tuple, axis: int, key) -> DeviceView:
        dtype, name = values[0].dtype, key or "concat"
        holders = [value.buffer for value in values]
        target = self._input_buffer(key)
        in_place = axis == 0 and target is holders[0] and values[0].ptr == target.ptr \
            and all(h is not target for h in holders[1:])
        if target is not None and (in_place or all(h is not target for h in holders)):
            return target.view(shape, dtype, name)
        # scratch: the first buffer of this key's list that holds none of the inputs, grown if too small
        nbytes = math.prod(shape) * dtype.itemsize
        pool = self._scratch.setdefault(key if key is not None else (axis, *(v.shape for v in values), dtype.str), [])
        for index, buffer in enumerate(pool):
            if all(h is not buffer for h in holders):
                if buffer.nbytes < nbytes:
                    buffer = pool[index] = self._alloc(nbytes, f"concatenating {name}")
                return buffer.view(shape, dtype, name)
        pool.append(self._alloc(nbytes, f"concatenating {name}"))
        return pool[-1].view(shape, dtype, name)

    def _input_buffer(self, key) -> DeviceBuffer | None:
        """The buffer of graph input "graph.tensor", or None when `key` names none."""
        graph, _, tensor = (key or "").partition(".")
        if graph in self.specs and tensor in {t["name"] for t in self.specs[graph]["inputs"]}:
            return self.buffers[graph][tensor]
        return None

    def take_rows(self, value, start, stop):
        """Rows start…stop-1 of a device value: a RowsView into its buffer (no copy) when that address keeps
        TensorRT's 256-byte alignment (buffers start aligned, so the offset decides), else a device-to-device
        copy into a scratch buffer kept for this source region (a stable address, so CUDA graphs replay)."""
        if not 0 <= start <= stop <= len(value):
            raise ValueError(f"rows {start}:{stop} of {value.name} {value.shape}")
        row_bytes = math.prod(value.shape[1:]) * value.dtype.itemsize
        offset = value.ptr - value.buffer.ptr + start * row_bytes
        rows = RowsView(value.buffer, (stop - start, *value.shape[1:]), value.dtype, value.name, offset)
        if offset % TENSOR_ALIGNMENT == 0:
            return rows
        return self.concat([rows], key=f"rows@{value.buffer.ptr:#x}+{offset}:{rows.nbytes}")

    def zeros_like(self, value):
        """Zeros from one buffer per dtype, grown when needed (nothing else writes there)."""
        buffer = self._zeros.get(value.dtype)
        if buffer is None or buffer.nbytes < value.nbytes:
            buffer = self._zeros[value.dtype] = self._alloc(value.nbytes, "zeros")
        check(cudart().cudaMemsetAsync(buffer.ptr, 0, value.nbytes, self.stream), "cudaMemsetAsync")
        return buffer.view(value.shape, value.dtype, value.name)

    # --- device -----------------------------------------------------------------------------------------
    def synchronize(self):
        check(cudart().cudaStreamSynchronize(self.stream), "waiting for the GPU")

    def peak_memory_bytes(self):
        """What TensorRT took at load and for contexts (weights, context state: measured as the drop in the
        device's free memory around those calls) plus the peak of this runner's own buffers since the last
        reset. Like torch's max_memory_allocated, it leaves out the CUDA context and kernel code."""
        return self.tensorrt_bytes + self.meter.peak

    def reset_peak_memory(self):
        self.meter.reset()

    def close(self):
        if self.stream is None:
            return
        self.synchronize()
        for executable, _, _ in self.graphs.values():
            check(cudart().cudaGraphExecDestroy(executable), "releasing a CUDA graph")
        self.graphs.clear()
        self.contexts.clear()  # contexts before the engines they belong to
        self.engines.clear()
        for buffer in list(self._allocated):  # I/O buffers, activations, scratch, zeros, uploads
            buffer.free()
        self._scratch.clear()
        self._zeros.clear()
        check(cudart().cudaStreamDestroy(self.stream), "releasing the CUDA stream")
        self.stream = None


def _activation_bytes(engine) -> int:
    """Scratch memory an execution context needs (device_memory_size_v2 since TensorRT 10.1; 11 drops v1)."""
    return engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size
