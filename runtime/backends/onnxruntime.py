"""ONNX Runtime runner: the portable one (CPU everywhere; CUDA with onnxruntime-gpu).

Each graph's session is checked against the manifest when it opens (names, dtypes, ranks and fixed sizes
of its inputs and outputs), so a corrupt or foreign .onnx file is one line at load, not an error mid-run.

Cold start. Creating a session optimizes its graph (constant folding, fusions, the CPU's NCHWc layout),
which took most of an SD-sized folder's load. fd-build therefore also stores each graph as ONNX Runtime
optimized it for the CPU (builder/onnxruntime_build.py), with its weights in an external file ONNX Runtime
memory-maps. Those graphs hold layouts for one CPU's vector width, so the runner opens them (optimizations
off) only on the CPU provider, with the ONNX Runtime version and the CPU instruction sets they were made
with (`stored_graphs_usable`); anywhere else it opens the portable graphs and optimizes them at load, as
before. CPU sessions are created in parallel threads (ONNX Runtime releases the GIL while it builds one).
"""
from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fd.runtime.backends.runner import NUMPY_DTYPES, Capabilities, Runner
from fd.runtime.errors import FdError

REBUILD = "rebuild the engine folder with fd-build --force"
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}
STORED_PROVIDER = "CPUExecutionProvider"  # the provider stored graphs are optimized for
# Instruction-set extensions ONNX Runtime's CPU kernels (MLAS) pick code paths and NCHWc block sizes by
# (/proc/cpuinfo's names, x86 and Arm): a stored graph is used only where the same ones are present.
ISA_EXTENSIONS = frozenset((
    "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
    "avx512vl", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx_vnni", "amx_tile",
    "amx_bf16", "amx_int8", "asimd", "asimdhp", "asimddp", "fphp", "i8mm", "sve", "sve2", "bf16"))


class OnnxRuntimeRunner(Runner):
    """Every graph runs through IOBinding on OrtValues: outputs stay where the execution provider put them
    (GPU memory with the CUDA provider) and are bound as the next graph's inputs there; only the latents
    the numpy scheduler steps and the final image are copied to the host."""

    name = "onnxruntime"
    holds_batch_minimum = False  # the graphs' batch axis is symbolic: any number of rows runs

    def __init__(self, engine_dir, manifest: dict, providers: list[str] | None = None, threads: int | None = None,
                 cuda_graphs: bool = False):
        super().__init__(engine_dir, manifest)
        if cuda_graphs:
            raise FdError("--cuda-graphs is for TensorRT and torch engine folders; this one is for ONNX Runtime")
        try:
            import onnxruntime as ort
        except ImportError:
            raise FdError("this engine folder needs ONNX Runtime: pip install 'fd[ort]'") from None
        self.ort = ort
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.capabilities = Capabilities(on_gpu=self.device == "cuda", peak_memory=False, cuda_graphs=False,
                                         dynamic_shapes=True)
        check_file_sizes(self.engine_dir, manifest)
        self.load_seconds: dict[str, float] = {}  # per graph: creating its session (cold-start reports)
        self.loaded_files: dict[str, str] = {}  # per graph: the file its session was made from
        self.sessions = self._open_sessions(threads)
        self.output_names = {name: [t["name"] for t in spec["outputs"]] for name, spec in self.specs.items()}

    def _open_sessions(self, threads: int | None) -> dict:
        self.stored_graphs_problem = stored_graphs_usable(self.ort, self.manifest, self.providers)
        stored = self.stored_graphs_problem is None

        def one(name: str):
            spec = self.specs[name]
            options = self.ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            path, key = self.engine_dir / spec["file"], "file"
            if stored and "optimized" in spec:
                path, key = self.engine_dir / spec["optimized"]["file"], "optimized.file"
                options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done at build
            started = time.perf_counter()
            session = open_session(self.ort, path, name, spec, options, self.providers, key)
            self.load_seconds[name] = time.perf_counter() - started
            self.loaded_files[name] = path.name
            return session

        names = list(self.specs)
        if self.device != "cpu":  # one after another on the GPU: parallel creation there is untested
            return {name: one(name) for name in names}
        with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1))) as pool:
            return dict(zip(names, pool.map(one, names)))

    def _execute(self, graph, feeds):
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names[graph]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return dict(zip(self.output_names[graph], binding.get_outputs()))

    def upload(self, array, dtype):
        return self._value(np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype]))

    def download(self, value):
        return value.numpy()

    def rows_of(self, value) -> int:
        return value.shape()[0]

    def concat(self, values, axis=0, key=None):
        if self.device == "cpu":
            return self._value(np.concatenate([v.numpy() for v in values], axis=axis))
        return self._join_on_device(values, axis)

    def take_rows(self, value, start, stop):
        if self.device == "cpu":
            return self._value(np.ascontiguousarray(value.numpy()[start:stop]))
        return self._rows_on_device(value, start, stop)

    def zeros_like(self, value):
        return self._value(np.zeros(value.shape(), _numpy_dtype(value)))

    def close(self):
        self.sessions.clear()

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def _join_on_device(self, values, axis: int):
        """CUDA OrtValues joined along `axis` on the GPU with cuda-python's 2-D copies (ONNX Runtime's Python
        API has no device copy): rows = the product of the axes before `axis`, each part adding its row's bytes.
        Not run here: no GPU was lent (on the CPU the runner uses numpy)."""
        from fd.runtime.backends.cuda_memory import check, cudart
        rt, dtype = cudart(), _numpy_dtype(values[0])
        shapes = [list(v.shape()) for v in values]
        axis = axis % len(shapes[0])
        out_shape = [*shapes[0][:axis], sum(s[axis] for s in shapes), *shapes[0][axis + 1:]]
        out = self.ort.OrtValue.ortvalue_from_shape_and_type(out_shape, dtype, "cuda", 0)
        count = int(np.prod(out_shape[:axis], dtype=np.int64))
        out_row = int(np.prod(out_shape[axis:], dtype=np.int64)) * dtype.itemsize
        check(rt.cudaDeviceSynchronize(), "waiting for ONNX Runtime's stream")  # ORT's stream is not ours
        at = 0
        for value, shape in zip(values, shapes):
            row = int(np.prod(shape[axis:], dtype=np.int64)) * dtype.itemsize
            check(rt.cudaMemcpy2D(out.data_ptr() + at, out_row, value.data_ptr(), row, row, count,
                                  rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice), "joining tensors on the GPU")
            at += row
        return out

    def _rows_on_device(self, value, start: int, stop: int):
        """Rows start…stop-1 of a CUDA OrtValue: one contiguous device-to-device copy. Not run here (no GPU)."""
        from fd.runtime.backends.cuda_memory import check, cudart
        rt, dtype, shape = cudart(), _numpy_dtype(value), list(value.shape())
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = self.ort.OrtValue.ortvalue_from_shape_and_type([stop - start, *shape[1:]], dtype, "cuda", 0)
        check(rt.cudaDeviceSynchronize(), "waiting for ONNX Runtime's stream")
        check(rt.cudaMemcpy(out.data_ptr(), value.data_ptr() + start * row, (stop - start) * row,
                            rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice), "taking rows on the GPU")
        return out


def check_file_sizes(engine_dir, manifest: dict) -> None:
    """Every graph file has the size fd-build wrote (backend_info.file_bytes; folders built before it was
    recorded are not checked): a truncated or partial copy is one line before any session opens."""
    sizes = (manifest.get("backend_info") or {}).get("file_bytes") or {}
    folder = Path(engine_dir)
    for component, spec in manifest["components"].items():
        optimized = spec.get("optimized") or {}
        named = [(f"components.{component}.file", spec["file"]),
                 (f"the external weights of components.{component}.file", spec["file"] + ".data"),
                 *((f"components.{component}.optimized.{key}", optimized[key]) for key in ("file", "data")
                   if key in optimized)]
        for key, name in named:
            if name not in sizes:
                continue
            try:
                size = (folder / name).stat().st_size
            except OSError:
                raise FdError(f"{folder} is missing {name} ({key}): {REBUILD}") from None
            if size != sizes[name]:
                raise FdError(f"{folder / name} ({key}) is {size} bytes, fd-build wrote {sizes[name]}: the engine "
                              f"folder is incomplete or damaged (a partial copy?): copy it again, or {REBUILD}")


def cpu_signature() -> dict | None:
    """What a graph optimized for the CPU depends on besides ONNX Runtime's version: the machine and the
    instruction-set extensions its kernels use. None where /proc/cpuinfo cannot be read (then no stored graph
    is made or used)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return {"machine": platform.machine(), "isa": sorted(flags & ISA_EXTENSIONS)}


def stored_graphs_record(ort_version: str, signature: dict) -> dict:
    """manifest["backend_info"]["optimized_graphs"]: what the stored graphs were optimized for."""
    return {"level": "all", "provider": STORED_PROVIDER, "onnxruntime": ort_version, "cpu": signature}


def stored_graphs_usable(ort, manifest: dict, providers: list[str]) -> str | None:
    """Why the folder's stored optimized graphs cannot be used here (None: they can)."""
    record = (manifest.get("backend_info") or {}).get("optimized_graphs")
    if not record:
        return "the folder has none (built before fd stored them)"
    if record["level"] != "all":  # opened with optimizations off, so they must hold every level's work
        return f"they were optimized at level {record['level']!r}, this fd opens level 'all' only"
    if providers != [record["provider"]]:
        return f"they are for {record['provider']} alone, this session runs on {', '.join(providers)}"
    if record["onnxruntime"] != ort.__version__:
        return f"they were made by ONNX Runtime {record['onnxruntime']}, this is {ort.__version__}"
    if record["cpu"] != cpu_signature():
        return "they were made on a CPU with other instruction sets"
    return None


def open_session(ort, path, component: str, spec: dict, options, providers: list[str], key: str = "file"):
    """A session for one graph, refused in one line if the file is not the graph the manifest describes."""
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT's exceptions (InvalidProtobuf, Fail, ...) share no base
        raise FdError(f"ONNX Runtime {ort.__version__} cannot load {path} (components.{component}.{key}): "
                      f"{_reason(exc)}; {REBUILD}") from None
    problem = signature_mismatch(session, spec)
    if problem:
        raise FdError(f"{path} is not the graph that components.{component} describes ({problem}): {REBUILD}")
    return session


def signature_mismatch(session, spec: dict) -> str | None:
    """How a session's inputs and outputs differ from a component spec (names, dtypes, ranks, fixed sizes);
    None when they agree. The graph may have outputs the spec does not ask for, but no unfed inputs."""
    for side, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        graph = {arg.name: (ORT_DTYPES.get(arg.type, arg.type), arg.shape) for arg in args}
        for index, tensor in enumerate(spec[side]):
            key = f"{side}[{index}]"
            if tensor["name"] not in graph:
                return f"{key} {tensor['name']!r} is not among the graph's {side}: {', '.join(graph) or 'none'}"
            dtype, shape = graph[tensor["name"]]
            if dtype != tensor["dtype"]:
                return f"{key} {tensor['name']!r} is {dtype} in the graph, {tensor['dtype']} in the manifest"
            if not _same_shape(shape, tensor["shape"]):
                return f"{key} {tensor['name']!r} has shape {shape} in the graph, {tensor['shape']} in the manifest"
        if side == "inputs":
            unfed = [name for name in graph if name not in {t["name"] for t in spec["inputs"]}]
            if unfed:
                return f"the graph also needs inputs {', '.join(unfed)}"
    return None


def _same_shape(graph: list, spec: list) -> bool:
    """Same rank, and equal sizes where both fix one (dynamic axes are names or None in the graph)."""
    fixed = [(g, w) for g, w in zip(graph, spec) if isinstance(g, int) and isinstance(w, int)]
    return len(graph) == len(spec) and all(g == w for g, w in fixed)


def _reason(exc: Exception) -> str:
    """ORT's message, first line, without the 'Load model from PATH failed:' preamble (the path is shown)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(" failed:", 1)[-1].strip().rstrip(".") if "Load model from" in text else text


def _numpy_dtype(value) -> np.dtype:
    return np.dtype(NUMPY_DTYPES[ORT_DTYPES[value.data_type()]])
