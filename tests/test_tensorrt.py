"""TensorRT: profiles and compatibility rules (CPU), the backend's buffer logic on a CPU stand-in for
tensorrt + cuda-python, clear errors where TensorRT is missing, and real engines where it is not."""
from __future__ import annotations

import ctypes
import enum
import functools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from builder.specs import Limits, component_specs
from runtime import sizes
from runtime.backends import trt_plan
from runtime.errors import FdError
from runtime.pipeline import FasterDiffusionPipeline
from runtime.policy import FasterDiffusionPolicy
from tests.conftest import run_fd

PROMPT = "a photo of an astronaut riding a horse on the moon"
# the tiny UNet's cache: (channels, downsampling relative to the latent) of mid, then each skip
TINY_CACHE = [(64, 8), (32, 1), (32, 1), (32, 1), (32, 2), (32, 2), (32, 2), (32, 4), (64, 4), (64, 4),
              (64, 8), (64, 8), (64, 8)]


def tensorrt_absent() -> str | None:
    """Why the real-TensorRT tests cannot run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # a broken install raises OSError, not ImportError
        return "TensorRT is not installed"
    try:
        from runtime.backends.cuda_memory import cuda_device
        cuda_device()
    except Exception as exc:
        return f"no CUDA GPU ({exc})"
    return None


TENSORRT_IMPORTABLE = tensorrt_absent() != "TensorRT is not installed"
GPU_SKIP = tensorrt_absent()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")


def tiny_specs(max_batch=1, max_window=15, hw=(128, 128)):
    lh, lw = hw[0] // 8, hw[1] // 8
    return component_specs(text_len=77, text_dim=32, latent_channels=4, latent_hw=(lh, lw), image_hw=hw,
                           cache_shapes=[(c, lh // f, lw // f) for c, f in TINY_CACHE], unet_dtype="float16",
                           text_dtype="float32", limits=Limits(max_batch, max_window))


def tiny_manifest(dynamic=None, hw=(128, 128), trt_version="10.7.0.23", capability="9.0"):
    return {"backend": "tensorrt", "precision": "fp16", "height": hw[0], "width": hw[1], "dynamic_shape": dynamic,
            "limits": {"max_batch_size": 1, "max_window": 15}, "source": {"model": "tiny"},
            "components": tiny_specs(hw=hw),
            "backend_info": trt_plan.backend_info(
                tensorrt_version=trt_version, gpu_name="NVIDIA H200", compute_capability=capability, profiles={},
                build_seconds={}, optimization_level=None, strongly_typed=True, precision="fp16", timing_cache=None)}


# --- profiles ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,window", [(1, 15), (2, 3), (4, 1)])
def test_static_profiles_follow_the_batch_ranges(batch, window):
    specs, geometry = tiny_specs(batch, window), {"height": 128, "width": 128, "dynamic_shape": None}
    decoder = trt_plan.profile_shapes(specs["unet_decoder"], geometry)
    assert decoder["timestep"] == ((2,), (2 * min(5, window),), (2 * batch * window,))
    assert decoder["skip_00"] == ((2, 32, 16, 16), (2 * min(5, window), 32, 16, 16), (2 * batch * window, 32, 16, 16))
    assert set(decoder) == {"timestep", "encoder_hidden_states", "mid", *(f"skip_{i:02d}" for i in range(12))}
    text = trt_plan.profile_shapes(specs["text_encoder"], geometry)
    assert text == {"input_ids": ((1, 77), (2, 77), (2 * batch, 77))}
    assert trt_plan.max_shapes(specs["vae_decoder"], geometry) == {"latent": (batch, 4, 16, 16),
                                                                    "image": (batch, 3, 128, 128)}


def test_dynamic_profiles_scale_image_like_tensors_with_the_side():
    specs = tiny_specs(hw=(128, 192))
    geometry = {"height": 128, "width": 192, "dynamic_shape": {"min": 64, "max": 256}}
    encoder = trt_plan.profile_shapes(specs["unet_encoder"], geometry)
    assert encoder["sample"] == ((1, 4, 8, 8), (2, 4, 16, 24), (2, 4, 32, 32))
    assert encoder["timestep"] == ((1,), (2,), (2,))
    assert encoder["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (2, 77, 32))
    decoder = trt_plan.profile_shapes(specs["unet_decoder"], geometry)
    assert decoder["mid"] == ((2, 64, 1, 1), (10, 64, 2, 3), (30, 64, 4, 4))
    assert trt_plan.max_shapes(specs["vae_decoder"], geometry)["image"] == (1, 3, 256, 256)
    record = trt_plan.profile_record({"mid": decoder["mid"]})
    assert record == {"mid": {"min": [2, 64, 1, 1], "opt": [10, 64, 2, 3], "max": [30, 64, 4, 4]}}
    assert json.loads(json.dumps(record)) == record


def test_sides_the_downsampling_does_not_divide_are_refused():
    geometry = {"height": 128, "width": 128, "dynamic_shape": {"min": 96, "max": 256}}
    with pytest.raises(ValueError, match="not whole"):
        trt_plan.profile_shapes(tiny_specs()["unet_decoder"], geometry)  # mid: 2 x 96 / 128


def test_side_step_is_vae_times_unet_downsampling():
    geometry = {"height": 128, "width": 128}
    assert sizes.side_step(tiny_specs(), geometry, 2) == sizes.side_step(tiny_specs(), geometry, 3) == 64


def test_names_and_versions():
    assert trt_plan.engine_filename("unet_decoder") == "unet_decoder.plan"
    assert trt_plan.parse_version("10.7.0.23") == trt_plan.parse_version("10.7.0.post1") == (10, 7, 0)
    with pytest.raises(ValueError):
        trt_plan.parse_version("ten")


# --- compatibility ------------------------------------------------------------------------------------
def refused(manifest, **overrides) -> str:
    args = dict(trt_version="10.7.0.23", gpu_name="NVIDIA H200", compute_capability="9.0", height=128, width=128)
    with pytest.raises(FdError) as info:
        trt_plan.check_compatible(manifest, **{**args, **overrides}, engine_dir="engines/x")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_same_machine_and_version_is_compatible():
    trt_plan.check_compatible(tiny_manifest(), "10.7.0.30", "NVIDIA H200", "9.0", 128, 128)  # another build number
    trt_plan.check_compatible(tiny_manifest(), "10.7.0.23", "NVIDIA H100 80GB HBM3", "9.0", 128, 128)  # same SM


def test_other_tensorrt_version_is_refused_with_the_rebuild_command():
    message = refused(tiny_manifest(), trt_version="10.8.0.43")
    assert "10.7.0.23" in message and "10.8.0.43" in message
    assert "fd-build --model tiny --backend tensorrt --precision fp16" in message
    assert message.endswith("--out engines/x --force`")


def test_other_compute_capability_is_refused():
    message = refused(tiny_manifest(capability="8.0"), gpu_name="NVIDIA H200")
    assert "sm_80" in message and "sm_90" in message and "fd-build" in message


def test_sizes_outside_the_engines_are_refused():
    assert "built for 128x128 only" in refused(tiny_manifest(), height=256)
    dynamic = tiny_manifest(dynamic={"min": 64, "max": 256})
    trt_plan.check_compatible(dynamic, "10.7.0.23", "NVIDIA H200", "9.0", 192, 64)
    assert "multiples of 64 from 64 to 256" in refused(dynamic, height=320)
    assert "width 160" in refused(dynamic, width=160)  # inside the range, not a multiple of 64


def test_batch_rows_outside_the_profile_are_refused():
    assert "--max-window" in refused(tiny_manifest(), batch_rows={"unet_decoder": 32})


def test_folder_without_a_build_record_is_refused():
    manifest = tiny_manifest()
    manifest["backend_info"] = {}
    assert "does not record" in refused(manifest)


# --- without TensorRT: one clear line -------------------------------------------------------------------
@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is installed here")
def test_require_tensorrt_says_how_to_get_it():
    from builder.tensorrt_build import require_tensorrt
    with pytest.raises(FdError) as info:
        require_tensorrt()
    assert str(info.value).startswith("TensorRT is not installed") and "\n" not in str(info.value)
    assert "--backend onnxruntime" in str(info.value)


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is installed here")
def test_fd_build_for_tensorrt_fails_early_and_leaves_nothing(tmp_path):
    done = run_fd("builder.cli", "--model", "tiny", "--backend", "tensorrt", "--out", str(tmp_path / "engines" / "x"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed"), done.stderr
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is installed here")
def test_loading_a_tensorrt_folder_without_tensorrt_says_so(fake_trt_folder):
    with pytest.raises(FdError, match="TensorRT is not installed"):
        FasterDiffusionPipeline(fake_trt_folder)


# --- the backend's logic on a CPU stand-in --------------------------------------------------------------
class FakeCuda:
    """cuda-python's runtime calls over host memory (device pointers are real host addresses)."""
    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2,
                                                  "cudaErrorInsufficientDriver": 35})
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
                                                     "cudaMemcpyDeviceToDevice": 3})
    cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeGlobal": 0})

    def __init__(self):
        self.ok = self.cudaError_t.cudaSuccess
        self.blocks, self.capture, self.launches = {}, None, 0

    def cudaMalloc(self, nbytes):
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cudaFree(self, ptr):
        del self.blocks[ptr]
        return (self.ok,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert self.capture is None, "copies must stay outside captured graphs"
        ctypes.memmove(dst, src, nbytes)
        return (self.ok,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture = []
        return (self.ok,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capture = self.capture, None
        return self.ok, graph

    def cudaGraphLaunch(self, graph, stream):
        self.launches += 1
        for launch in graph:
            launch()
        return (self.ok,)

    def cudaGraphInstantiateWithFlags(self, graph, flags):
        return self.ok, tuple(graph)

    def cudaGetDeviceProperties(self, device):
        return self.ok, SimpleNamespace(name=b"Fake GPU", major=9, minor=0)

    def cudaStreamCreate(self):
        return self.ok, 7

    def cudaGetDeviceCount(self):
        return self.ok, 1

    def cudaGetDevice(self):
        return self.ok, 0

    def done(self, *_):
        return (self.ok,)

    cudaStreamSynchronize = cudaStreamDestroy = cudaGraphDestroy = cudaGraphExecDestroy = done


class FakeTensorRT:
    """The slice of tensorrt the backend uses; an engine "plan" is an ONNX graph that ONNX Runtime runs."""
    __version__ = "10.7.0.23"
    ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=2)
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(int64)": np.dtype(np.int64)}

    def __init__(self, cuda):
        self.cuda = cuda

    def Runtime(self, logger):
        return SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine(data, self.cuda))

    nptype = staticmethod(lambda dtype: dtype)


class FakeEngine:
    def __init__(self, data, cuda):
        import onnxruntime as ort
        self.session, self.cuda = ort.InferenceSession(data, providers=["CPUExecutionProvider"]), cuda
        self.tensors = {t.name: t for t in self.session.get_inputs() + self.session.get_outputs()}
        self.num_io_tensors, self.device_memory_size_v2 = len(self.tensors), 4096

    def get_tensor_name(self, index):
        return list(self.tensors)[index]

    def get_tensor_dtype(self, name):
        return FakeTensorRT.DTYPES[self.tensors[name].type]

    def create_execution_context(self, strategy):
        assert strategy == FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

    def set_device_memory(self, ptr, nbytes):
        self.memory = ptr

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        batch = next(iter(self.shapes.values()))[0]
        return [dim if isinstance(dim, int) else batch for dim in self.engine.tensors[name].shape]

    def execute_async_v3(self, stream):
        assert isinstance(stream, int) and self.memory is not None
        run = functools.partial(self._compute, dict(self.shapes), dict(self.addresses))  # a graph keeps these
        self.engine.cuda.capture.append(run) if self.engine.cuda.capture is not None else run()
        return True

    def _compute(self, shapes, addresses):
        def read(name):
            dtype, shape = FakeTensorRT.DTYPES[self.engine.tensors[name].type], shapes[name]
            raw = (ctypes.c_uint8 * (int(np.prod(shape)) * dtype.itemsize)).from_address(addresses[name])
            return np.frombuffer(raw, dtype).reshape(shape).copy()
        session = self.engine.session
        outputs = session.run(None, {t.name: read(t.name) for t in session.get_inputs()})
        for meta, value in zip(session.get_outputs(), outputs):
            value = np.ascontiguousarray(value)
            ctypes.memmove(addresses[meta.name], value.ctypes.data, value.nbytes)


@pytest.fixture
def fake_trt_folder(tiny_engine, tmp_path):
    """The tiny ONNX Runtime folder dressed as a TensorRT one (plans are the ONNX graphs)."""
    folder = tmp_path / "tiny-fake-tensorrt"
    shutil.copytree(tiny_engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, spec in manifest["components"].items():
        (folder / spec["file"]).rename(folder / trt_plan.engine_filename(name))
        spec["file"] = trt_plan.engine_filename(name)
    manifest["backend"] = "tensorrt"
    manifest["backend_info"] = trt_plan.backend_info(
        tensorrt_version=FakeTensorRT.__version__, gpu_name="Fake GPU", compute_capability="9.0", profiles={},
        build_seconds={}, optimization_level=None, strongly_typed=True, precision="fp32", timing_cache=None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def fake_cuda(monkeypatch):
    import runtime.backends.cuda_memory as cuda_memory
    import runtime.backends.tensorrt as backend_module
    cuda = FakeCuda()
    monkeypatch.setattr(cuda_memory, "cudart", lambda: cuda)
    monkeypatch.setattr(backend_module, "cudart", lambda: cuda)
    monkeypatch.setattr(backend_module, "import_tensorrt", lambda fix: FakeTensorRT(cuda))
    return cuda


def test_driver_older_than_cuda_python_says_which_to_install(fake_cuda, monkeypatch):
    from runtime.backends.cuda_memory import cuda_device
    monkeypatch.setattr(fake_cuda, "cudaGetDeviceCount", lambda: (fake_cuda.cudaError_t.cudaErrorInsufficientDriver, 0))
    with pytest.raises(FdError, match="driver is older than this cuda-python.*cuda-python>=12.6,<13"):
        cuda_device()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_backend_logic_reproduces_onnxruntime(fake_trt_folder, fake_cuda, tiny_engine, cuda_graphs):
    reference = FasterDiffusionPipeline(tiny_engine)
    pipe = FasterDiffusionPipeline(fake_trt_folder, cuda_graphs=cuda_graphs)
    for seed in (3, 4):  # the second run replays every graph the first one captured
        want, got = reference([PROMPT], steps=20, seed=seed), pipe([PROMPT], steps=20, seed=seed)
        np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
        # the paper's keys for 20 steps: windows of 1, 1, 1, 2, 5, 5, 5 steps
        assert got.calls == want.calls == {"text_encoder": 1, "unet_encoder": 7, "unet_decoder": 7, "vae_decoder": 1}
    if cuda_graphs:
        # encoder: one key; decoder: windows of 1 read the encoder's buffers, of 2 and 5 their own rows
        assert len(pipe.backend.graphs) == 1 + 1 + 3 + 1
        assert fake_cuda.launches == 2 * 16 - len(pipe.backend.graphs)
    baseline = pipe([PROMPT], steps=6, seed=1, policy=FasterDiffusionPolicy.baseline(6))
    want = reference([PROMPT], steps=6, seed=1, policy=FasterDiffusionPolicy.baseline(6))
    np.testing.assert_allclose(baseline.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
    pipe.close()
    assert not fake_cuda.blocks  # every buffer freed


def test_backend_primitives_round_trip(fake_trt_folder, fake_cuda):
    pipe = FasterDiffusionPipeline(fake_trt_folder)
    backend, array = pipe.backend, np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    view = backend.upload(array, "float32")
    assert view.dtype == np.float32 and np.array_equal(backend.download(view), array.astype(np.float32))
    cache = backend.buffers["unet_encoder"]["mid"].view((2, 64, 2, 2), np.float32, "mid")
    rows = np.random.default_rng(0).standard_normal((2, 64, 2, 2)).astype(np.float32)
    backend._copy_in(rows, cache)
    assert np.array_equal(backend.download(backend.repeat(cache, 3)), np.concatenate([rows] * 3))
    with pytest.raises(FdError, match="larger than this engine folder's profiles allow"):
        backend.repeat(cache, 16)  # 32 rows; the decoder takes at most 2 x 1 x 15
    pipe.close()


def test_load_refuses_engines_from_another_tensorrt(fake_trt_folder, fake_cuda):
    manifest = json.loads((fake_trt_folder / "manifest.json").read_text())
    manifest["backend_info"]["tensorrt_version"] = "10.3.0.26"
    (fake_trt_folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FdError, match="built for Fake GPU .sm_90. with TensorRT 10.3.0.26.*fd-build"):
        FasterDiffusionPipeline(fake_trt_folder)
    assert not fake_cuda.blocks  # refused before anything was allocated


def test_timing_cache_is_written_whole(tmp_path):
    from builder.tensorrt_build import save_timing_cache
    cache = tmp_path / "caches" / "timing.cache"
    save_timing_cache(SimpleNamespace(get_timing_cache=lambda: SimpleNamespace(serialize=lambda: b"tactics")), cache)
    save_timing_cache(SimpleNamespace(get_timing_cache=lambda: None), cache)  # no cache attached: the file stays
    assert cache.read_bytes() == b"tactics" and [p.name for p in cache.parent.iterdir()] == ["timing.cache"]


def test_timing_cache_of_earlier_builds_is_merged(tmp_path):
    from builder.tensorrt_build import reuse_timing_cache
    merged = []
    current = SimpleNamespace(combine=lambda old, ignore_mismatch: merged.append((old, ignore_mismatch)) or True)
    config = SimpleNamespace(create_timing_cache=lambda data: ("cache of", data), get_timing_cache=lambda: current)
    reuse_timing_cache(config, tmp_path / "timing.cache")  # no file yet: nothing to merge
    assert merged == []
    (tmp_path / "timing.cache").write_bytes(b"tactics")
    reuse_timing_cache(config, tmp_path / "timing.cache")
    assert merged == [(("cache of", b"tactics"), False)]  # never mixed with another device's timings


def test_progress_monitor_never_cancels_a_build():
    from builder.tensorrt_build import progress_monitor
    monitor = progress_monitor(SimpleNamespace(IProgressMonitor=object), "unet_decoder")
    monitor.phase_start("Building engine", None, 3)
    monitor.phase_start("Tactic selection", "Building engine", 2)
    assert all(monitor.step_complete("Tactic selection", step) for step in range(2))
    monitor.phase_finish("Tactic selection")
    assert monitor.step_complete("Building engine", 0) and monitor.step_complete("no such phase", 0)
    monitor.close()
    assert not monitor.bars and not monitor.cancelled


# --- real TensorRT on a GPU -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["fp16", "fp32"])
def trt_build(request, tmp_path_factory):
    if GPU_SKIP:
        pytest.skip(GPU_SKIP)
    from builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("trt")
    out = build(BuildOptions(model="tiny", backend="tensorrt", precision=request.param, out=str(root / "trt")),
                log=lambda *_: None)
    reference = build(BuildOptions(model="tiny", precision=request.param, out=str(root / "ort")), log=lambda *_: None)
    return request.param, out, reference


@pytest.mark.tensorrt
@needs_gpu
def test_tensorrt_matches_onnxruntime_and_calls_the_encoder_at_key_steps(trt_build):
    precision, folder, reference = trt_build
    manifest = json.loads((folder / "manifest.json").read_text())
    assert all(spec["file"].endswith(".plan") for spec in manifest["components"].values())
    assert not list(folder.glob("*.onnx*")) and (folder.parent / "timing.cache").is_file()
    want = FasterDiffusionPipeline(reference)([PROMPT], steps=50, seed=3)
    tolerance = {"fp32": 1e-3, "fp16": 5e-2}[precision]
    for cuda_graphs in (False, True):
        pipe = FasterDiffusionPipeline(folder, cuda_graphs=cuda_graphs)
        for _ in range(2):  # with graphs, the second run replays them
            got = pipe([PROMPT], steps=50, seed=3)
            assert got.calls == {"text_encoder": 1, "unet_encoder": 9, "unet_decoder": 9, "vae_decoder": 1}
            assert np.abs(got.latents - want.latents).max() <= tolerance * np.abs(want.latents).max()
        pipe.close()


@pytest.mark.tensorrt
@needs_gpu
def test_tensorrt_folder_from_another_version_is_refused_before_loading(trt_build, tmp_path):
    _, folder, _ = trt_build
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend_info"]["tensorrt_version"] = "9.9.9"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FdError, match="TensorRT 9.9.9.*rebuild with `fd-build --model tiny --backend tensorrt"):
        FasterDiffusionPipeline(copy)
