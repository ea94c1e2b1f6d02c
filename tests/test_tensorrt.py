"""TensorRT: profiles and compatibility rules (CPU), the runner's buffer logic on a CPU stand-in for
tensorrt + cuda-python, clear errors where TensorRT is missing, and real engines where it is not."""
from __future__ import annotations

import copy
import ctypes
import enum
import functools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from fd.runtime import sizes
from fd.runtime.backends import trt_plan
from fd.runtime.batch import Limits, batch_range
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy
from tests.conftest import run_fd

PROMPT = "a photo of an astronaut riding a horse on the moon"


def tensorrt_absent() -> str | None:
    """Why the real-TensorRT tests cannot run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # a broken install raises OSError, not ImportError
        return "TensorRT is not installed"
    try:
        from fd.runtime.backends.cuda_memory import cuda_device
        cuda_device()
    except Exception as exc:
        return f"no CUDA GPU ({exc})"
    return None


TENSORRT_IMPORTABLE = tensorrt_absent() != "TensorRT is not installed"
GPU_SKIP = tensorrt_absent()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")


@pytest.fixture(scope="module")
def specs_at(tiny_components):
    """specs_at(max_batch, max_window, hw): the tiny model's graph specs, as the SD family writes them
    into a manifest (fp32: one encoder pass on the CPU tells the cache shapes)."""
    from fd.builder.families import FAMILIES
    family = FAMILIES["sd"]
    modules = family.graph_modules(tiny_components, "fp32")

    @functools.cache
    def at_size(hw):
        geometry = {"height": hw[0], "width": hw[1], "latent_channels": 4, "latent_height": hw[0] // 8,
                    "latent_width": hw[1] // 8}
        return family.specs(tiny_components, modules, geometry, "fp32", Limits(1, 15))

    def specs(max_batch=1, max_window=15, hw=(128, 128)):
        result = copy.deepcopy(at_size(hw))
        for graph, spec in result.items():
            spec["batch"] = batch_range(graph, Limits(max_batch, max_window))
        return result
    return specs


@pytest.fixture
def tiny_manifest(specs_at):
    def manifest(dynamic=None, hw=(128, 128), trt_version="10.7.0.23", capability="9.0"):
        return {"backend": "tensorrt", "precision": "fp16", "height": hw[0], "width": hw[1],
                "dynamic_shape": dynamic, "limits": {"max_batch_size": 1, "max_window": 15},
                "source": {"model": "tiny"}, "components": specs_at(hw=hw),
                "backend_info": trt_plan.backend_info(
                    tensorrt_version=trt_version, gpu_name="NVIDIA H200", compute_capability=capability,
                    profiles={}, build_seconds={}, optimization_level=None, strongly_typed=True, precision="fp16",
                    timing_cache=None)}
    return manifest


# --- profiles ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,window", [(1, 15), (2, 3), (4, 1)])
def test_static_profiles_follow_the_batch_ranges(specs_at, batch, window):
    specs, geometry = specs_at(batch, window), {"height": 128, "width": 128, "dynamic_shape": None}
    decoder = trt_plan.profile_shapes(specs["denoiser_decoder"], geometry)
    assert decoder["timestep"] == ((2,), (2 * min(5, window),), (2 * batch * window,))
    assert decoder["skip_00"] == ((2, 32, 16, 16), (2 * min(5, window), 32, 16, 16), (2 * batch * window, 32, 16, 16))
    assert set(decoder) == {"timestep", "encoder_hidden_states", "mid", *(f"skip_{i:02d}" for i in range(12))}
    text = trt_plan.profile_shapes(specs["text_encoder"], geometry)
    assert text == {"input_ids": ((1, 77), (2, 77), (2 * batch, 77))}
    assert trt_plan.max_shapes(specs["vae_decoder"], geometry) == {"latent": (batch, 4, 16, 16),
                                                                    "image": (batch, 3, 128, 128)}


def test_dynamic_profiles_scale_the_height_and_width_axes(specs_at):
    specs = specs_at(hw=(128, 192))
    geometry = {"height": 128, "width": 192, "dynamic_shape": {"min": 64, "max": 256}}
    encoder = trt_plan.profile_shapes(specs["denoiser_encoder"], geometry)
    assert encoder["sample"] == ((1, 4, 8, 8), (2, 4, 16, 24), (2, 4, 32, 32))
    assert encoder["timestep"] == ((1,), (2,), (2,))
    assert encoder["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (2, 77, 32))  # "sequence" stays
    decoder = trt_plan.profile_shapes(specs["denoiser_decoder"], geometry)
    assert decoder["mid"] == ((2, 64, 1, 1), (10, 64, 2, 3), (30, 64, 4, 4))
    assert trt_plan.max_shapes(specs["vae_decoder"], geometry)["image"] == (1, 3, 256, 256)
    record = trt_plan.profile_record({"mid": decoder["mid"]})
    assert record == {"mid": {"min": [2, 64, 1, 1], "opt": [10, 64, 2, 3], "max": [30, 64, 4, 4]}}
    assert json.loads(json.dumps(record)) == record


def test_sides_the_downsampling_does_not_divide_are_refused(specs_at):
    geometry = {"height": 128, "width": 128, "dynamic_shape": {"min": 96, "max": 256}}
    with pytest.raises(ValueError, match="not whole"):
        trt_plan.profile_shapes(specs_at()["denoiser_decoder"], geometry)  # mid: 2 x 96 / 128


def test_side_step_is_vae_times_unet_downsampling(specs_at):
    geometry = {"height": 128, "width": 128}
    assert sizes.side_step(specs_at(), geometry, "height") == sizes.side_step(specs_at(), geometry, "width") == 64


def test_names_and_versions():
    assert trt_plan.engine_filename("denoiser_decoder") == "denoiser_decoder.plan"
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


def test_same_machine_and_version_is_compatible(tiny_manifest):
    trt_plan.check_compatible(tiny_manifest(), "10.7.0.30", "NVIDIA H200", "9.0", 128, 128)  # another build number
    trt_plan.check_compatible(tiny_manifest(), "10.7.0.23", "NVIDIA H100 80GB HBM3", "9.0", 128, 128)  # same SM


def test_other_tensorrt_version_is_refused_with_the_rebuild_command(tiny_manifest):
    message = refused(tiny_manifest(), trt_version="10.8.0.43")
    assert "10.7.0.23" in message and "10.8.0.43" in message
    assert "fd-build --model tiny --backend tensorrt --precision fp16" in message
    assert message.endswith("--out engines/x --force`")


def test_other_compute_capability_is_refused(tiny_manifest):
    message = refused(tiny_manifest(capability="8.0"), gpu_name="NVIDIA H200")
    assert "sm_80" in message and "sm_90" in message and "fd-build" in message


def test_sizes_outside_the_engines_are_refused(tiny_manifest):
    assert "built for 128x128 only" in refused(tiny_manifest(), height=256)
    dynamic = tiny_manifest(dynamic={"min": 64, "max": 256})
    trt_plan.check_compatible(dynamic, "10.7.0.23", "NVIDIA H200", "9.0", 192, 64)
    assert "multiples of 64 from 64 to 256" in refused(dynamic, height=320)
    assert "width 160" in refused(dynamic, width=160)  # inside the range, not a multiple of 64


def test_batch_rows_outside_the_profile_are_refused(tiny_manifest):
    assert "--max-window" in refused(tiny_manifest(), batch_rows={"denoiser_decoder": 32})


def test_folder_without_a_build_record_is_refused(tiny_manifest):
    manifest = tiny_manifest()
    manifest["backend_info"] = {}
    assert "does not record" in refused(manifest)


# --- without TensorRT: one clear line -------------------------------------------------------------------
@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is installed here")
def test_require_tensorrt_says_how_to_get_it():
    from fd.builder.tensorrt_build import require_tensorrt
    with pytest.raises(FdError) as info:
        require_tensorrt()
    assert str(info.value).startswith("TensorRT is not installed") and "\n" not in str(info.value)
    assert "--backend onnxruntime" in str(info.value)


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is installed here")
def test_fd_build_for_tensorrt_fails_early_and_leaves_nothing(tmp_path):
    done = run_fd("fd.builder.cli", "--model", "tiny", "--backend", "tensorrt", "--out", str(tmp_path / "engines" / "x"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed"), done.stderr
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


@pytest.mark.skipif(TENSORRT_IMPORTABLE, reason="TensorRT is installed here")
def test_loading_a_tensorrt_folder_without_tensorrt_says_so(fake_trt_folder):
    with pytest.raises(FdError, match="TensorRT is not installed"):
        FasterDiffusionPipeline(fake_trt_folder)


# --- the runner's logic on a CPU stand-in -----------------------------------------------------------------
class FakeCuda:
    """cuda-python's runtime calls over host memory (device pointers are real host addresses)."""
    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2,
                                                  "cudaErrorInsufficientDriver": 35})
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
                                                     "cudaMemcpyDeviceToDevice": 3})
    cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeGlobal": 0})
    TOTAL = 1 << 40

    def __init__(self):
        self.ok = self.cudaError_t.cudaSuccess
        self.blocks, self.capture, self.launches = {}, None, 0
        self.taken_by_tensorrt = 0  # what the fake TensorRT "allocates" itself, seen only in cudaMemGetInfo

    def cudaMalloc(self, nbytes):
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cudaFree(self, ptr):
        del self.blocks[ptr]
        return (self.ok,)

    def cudaMemGetInfo(self):
        used = sum(block.nbytes for block in self.blocks.values()) + self.taken_by_tensorrt
        return self.ok, self.TOTAL - used, self.TOTAL

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert self.capture is None, "copies must stay outside captured graphs"
        ctypes.memmove(dst, src, nbytes)
        return (self.ok,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert self.capture is None and kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        assert width <= dpitch and width <= spitch
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (self.ok,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        assert self.capture is None
        ctypes.memset(ptr, value, nbytes)
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
    """The slice of tensorrt the runner uses; an engine "plan" is an ONNX graph that ONNX Runtime runs."""
    __version__ = "10.7.0.23"
    ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=2)
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(int64)": np.dtype(np.int64)}
    ENGINE_BYTES = 1 << 20  # device memory each fake engine takes, as weights would

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
        cuda.taken_by_tensorrt += FakeTensorRT.ENGINE_BYTES

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


def dressed_as_tensorrt(source, folder):
    """An ONNX Runtime folder copied and dressed as a TensorRT one (plans are the ONNX graphs)."""
    shutil.copytree(source, folder)
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
def fake_trt_folder(tiny_engine, tmp_path):
    return dressed_as_tensorrt(tiny_engine, tmp_path / "tiny-fake-tensorrt")


@pytest.fixture(scope="module")
def tiny_xl_engine(tmp_path_factory):
    """tiny-xl (two text encoders, text_embeds and time_ids) built for ONNX Runtime."""
    from fd.builder.build import BuildOptions, build
    return build(BuildOptions(model="tiny-xl", out=str(tmp_path_factory.mktemp("xl") / "tiny-xl")),
                 log=lambda *_: None)


@pytest.fixture
def fake_cuda(monkeypatch):
    import fd.runtime.backends.cuda_memory as cuda_memory
    import fd.runtime.backends.tensorrt as runner_module
    cuda = FakeCuda()
    monkeypatch.setattr(cuda_memory, "cudart", lambda: cuda)
    monkeypatch.setattr(runner_module, "cudart", lambda: cuda)
    monkeypatch.setattr(runner_module, "import_tensorrt", lambda fix: FakeTensorRT(cuda))
    return cuda


@pytest.fixture
def runner(fake_trt_folder, fake_cuda):
    from fd.runtime.backends import load_runner
    from fd.runtime.manifest import load_manifest
    loaded = load_runner(fake_trt_folder, load_manifest(fake_trt_folder))
    yield loaded
    loaded.close()


def rng_array(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_driver_older_than_cuda_python_says_which_to_install(fake_cuda, monkeypatch):
    from fd.runtime.backends.cuda_memory import cuda_device
    monkeypatch.setattr(fake_cuda, "cudaGetDeviceCount", lambda: (fake_cuda.cudaError_t.cudaErrorInsufficientDriver, 0))
    with pytest.raises(FdError, match="driver is older than this cuda-python.*cuda-python>=12.6,<13"):
        cuda_device()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runner_logic_reproduces_onnxruntime(fake_trt_folder, fake_cuda, tiny_engine, cuda_graphs):
    reference = FasterDiffusionPipeline(tiny_engine)
    pipe = FasterDiffusionPipeline(fake_trt_folder, cuda_graphs=cuda_graphs)
    assert type(pipe.runner).__name__ == "TensorRTRunner"
    for seed in (3, 4):  # the second run replays every graph the first one captured
        want, got = reference([PROMPT], steps=20, seed=seed), pipe([PROMPT], steps=20, seed=seed)
        np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
        # the paper's keys for 20 steps: windows of 1, 1, 1, 2, 5, 5, 5 steps
        assert got.calls == want.calls == {"text_encoder": 1, "denoiser_encoder": 7, "denoiser_decoder": 7, "vae_decoder": 1}
    if cuda_graphs:
        # encoder: one key; decoder: windows of 1 read the encoder's buffers, of 2 and 5 their own rows
        assert len(pipe.runner.graphs) == 1 + 1 + 3 + 1
        assert fake_cuda.launches == 2 * 16 - len(pipe.runner.graphs)
    baseline = pipe([PROMPT], steps=6, seed=1, policy=FasterDiffusionPolicy.baseline(6))
    want = reference([PROMPT], steps=6, seed=1, policy=FasterDiffusionPolicy.baseline(6))
    np.testing.assert_allclose(baseline.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
    pipe.close()
    assert not fake_cuda.blocks  # every buffer freed


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_sdxl_graphs_and_concats_reproduce_onnxruntime(tiny_xl_engine, tmp_path, fake_cuda, cuda_graphs):
    """tiny-xl: graphs from the manifest (text_encoder_2), hidden states joined on the last axis, zero
    unconditional rows, time_ids shared by both UNet halves, all on the device."""
    folder = dressed_as_tensorrt(tiny_xl_engine, tmp_path / "tiny-xl-fake-tensorrt")
    reference, pipe = FasterDiffusionPipeline(tiny_xl_engine), FasterDiffusionPipeline(folder, cuda_graphs=cuda_graphs)
    assert set(pipe.runner.engines) == {"text_encoder", "text_encoder_2", "denoiser_encoder", "denoiser_decoder",
                                        "vae_decoder"}
    captured = None
    for negative in (None, None, "blurry"):  # no negative prompt: zero rows; then a negative prompt's text
        want = reference([PROMPT], steps=8, seed=5, negative_prompt=negative)
        got = pipe([PROMPT], steps=8, seed=5, negative_prompt=negative)
        np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
        assert got.calls == want.calls and got.calls["text_encoder_2"] == 1
        if cuda_graphs and captured is None:
            captured = len(pipe.runner.graphs)
        elif cuda_graphs and negative is None:  # same call again: same addresses, every graph replayed
            assert len(pipe.runner.graphs) == captured
    pipe.close()
    assert not fake_cuda.blocks


def test_host_arrays_go_into_the_graphs_own_input_buffers(runner):
    ids = np.arange(2 * 77).reshape(2, 77) % 100
    outputs = runner.run("text_encoder", {"input_ids": ids})
    context = runner.contexts["text_encoder"]
    assert context.addresses["input_ids"] == runner.buffers["text_encoder"]["input_ids"].ptr
    assert outputs["text_embeddings"].buffer is runner.buffers["text_encoder"]["text_embeddings"]
    assert outputs["text_embeddings"].shape == (2, 77, 32) and runner.calls["text_encoder"] == 1
    shared = runner.upload_input("denoiser_encoder", "timestep", np.array([3.0, 4.0]))
    assert shared.buffer is runner.buffers["denoiser_encoder"]["timestep"] and shared.dtype == np.float32
    np.testing.assert_array_equal(runner.download(shared), [3.0, 4.0])
    with pytest.raises(FdError, match="larger than this engine folder's profiles allow"):
        runner.run("text_encoder", {"input_ids": np.zeros((3, 77), np.int64)})  # 2 rows at most


def test_inputs_of_another_dtype_are_refused(runner):
    wrong = runner.upload(np.zeros((2, 77, 32)), "float16")
    with pytest.raises(FdError, match="denoiser_encoder.encoder_hidden_states is given float16.*rebuild"):
        runner.run("denoiser_encoder", {"sample": np.zeros((2, 4, 16, 16)), "timestep": np.zeros(2),
                                    "encoder_hidden_states": wrong})


def test_upload_and_download_round_trip(runner):
    array = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    view = runner.upload(array, "float32")
    assert view.dtype == np.float32 and np.array_equal(runner.download(view), array.astype(np.float32))


def test_concat_along_rows_lands_in_the_decoders_input_buffer(runner):
    rows = rng_array(2, 64, 2, 2)
    mid = runner.upload(rows, "float32")
    out = runner.concat([mid] * 3, key="denoiser_decoder.mid")
    assert out.buffer is runner.buffers["denoiser_decoder"]["mid"]
    np.testing.assert_array_equal(runner.download(out), np.concatenate([rows] * 3))
    np.testing.assert_array_equal(runner.download(mid), rows)  # the source is intact
    with pytest.raises(FdError, match="larger than this engine folder's profiles allow"):
        runner.concat([mid] * 16, key="denoiser_decoder.mid")  # 32 rows; the decoder takes at most 2 x 1 x 15


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_concat_along_inner_axes_copies_every_row(runner, axis):
    a, b = rng_array(2, 3, 4, 5, seed=1), rng_array(2, 3, 4, 5, seed=2)
    b = np.concatenate([b, b], axis=axis)  # parts of different widths along the axis
    out = runner.concat([runner.upload(a, "float32"), runner.upload(b, "float32")], axis=axis)
    np.testing.assert_array_equal(runner.download(out), np.concatenate([a, b], axis=axis))
    with pytest.raises(ValueError, match="cannot concatenate"):
        runner.concat([runner.upload(a, "float32"), runner.upload(a[:1], "float32")], axis=axis)


def test_concat_never_writes_where_an_input_lies(runner):
    x, y = rng_array(2, 64, 2, 2, seed=1), rng_array(2, 64, 2, 2, seed=2)
    key, target = "denoiser_decoder.mid", runner.buffers["denoiser_decoder"]["mid"]
    first = runner.concat([runner.upload(x, "float32")] * 2, key=key)  # in the decoder's buffer
    grown = runner.concat([first, runner.upload(y, "float32")], key=key)  # first part already in place
    assert grown.buffer is target
    np.testing.assert_array_equal(runner.download(grown), np.concatenate([x, x, y]))
    second = runner.upload(y, "float32")
    after = runner.concat([second, grown], key=key)  # the target holds a later part: a scratch buffer instead
    assert after.buffer is not target
    np.testing.assert_array_equal(runner.download(after), np.concatenate([y, x, x, y]))
    np.testing.assert_array_equal(runner.download(grown), np.concatenate([x, x, y]))  # untouched
    side = runner.concat([grown, grown], axis=-1, key=key)  # an inner axis is never "in place"
    assert side.buffer is not target and side.buffer is not after.buffer
    np.testing.assert_array_equal(runner.download(side), np.concatenate([runner.download(grown)] * 2, axis=-1))


def test_scratch_buffers_keep_their_addresses(runner):
    def parts(seed, rows=2):
        return [runner.upload(rng_array(rows, 77, 8, seed=seed + k), "float32") for k in range(2)]
    first = runner.concat(parts(0), axis=-1)
    again_parts = parts(10)
    again = runner.concat(again_parts, axis=-1)  # same shapes, no key: the same buffer
    assert again.ptr == first.ptr
    other = runner.concat(parts(20, rows=1), axis=-1)  # other shapes: another buffer, the first one intact
    assert other.ptr != first.ptr
    np.testing.assert_array_equal(runner.download(again), np.concatenate([runner.download(v) for v in again_parts], -1))
    small = runner.concat(parts(30, rows=1), key="conditions")
    big = runner.concat(parts(40, rows=4), key="conditions")  # grown once...
    smaller = runner.concat(parts(50, rows=1), key="conditions")  # ...then kept
    assert big.ptr == smaller.ptr and small.shape == (2, 77, 8) and big.shape == (8, 77, 8)
    parts_in_scratch = [smaller, *parts(60, rows=1)]
    expected = np.concatenate([runner.download(v) for v in parts_in_scratch])
    moved = runner.concat(parts_in_scratch, key="conditions")  # an input lies in that key's buffer
    assert moved.ptr != smaller.ptr
    np.testing.assert_array_equal(runner.download(moved), expected)
    assert runner.concat(parts(70, rows=1), key="conditions").ptr == big.ptr  # the first one is free again


def test_zeros_like_gives_zeros_at_a_stable_address(runner):
    value = runner.upload(rng_array(2, 77, 32), "float32")
    zeros = runner.zeros_like(value)
    assert zeros.shape == value.shape and zeros.dtype == value.dtype and zeros.buffer is not value.buffer
    assert not runner.download(zeros).any()
    ctypes.memset(zeros.ptr, 1, zeros.nbytes)  # even if something wrote there, the next call is zeros again
    again = runner.zeros_like(value)
    assert again.ptr == zeros.ptr and not runner.download(again).any()


def test_take_rows_is_a_view_where_aligned_and_a_stable_copy_where_not(runner, fake_cuda):
    from fd.runtime.backends.tensorrt import RowsView
    rows = rng_array(4, 64, 2, 2)  # 1 KiB rows: every row starts 256-byte aligned
    mid = runner.upload(rows, "float32")
    blocks = len(fake_cuda.blocks)
    half = runner.take_rows(mid, 2, 4)
    assert isinstance(half, RowsView) and half.buffer is mid.buffer and half.ptr == mid.ptr + 2 * 1024
    assert len(fake_cuda.blocks) == blocks  # nothing allocated, nothing copied
    np.testing.assert_array_equal(runner.download(half), rows[2:])
    one = runner.take_rows(half, 1, 2)  # rows of rows
    assert one.ptr == mid.ptr + 3 * 1024 and len(one) == 1
    np.testing.assert_array_equal(runner.download(one), rows[3:])
    ids = rng_array(4, 6, seed=1)  # SDXL's time_ids: 24-byte rows, row 1 would start unaligned
    time_ids = runner.upload(ids, "float32")
    copied = runner.take_rows(time_ids, 1, 3)
    assert copied.buffer is not time_ids.buffer
    np.testing.assert_array_equal(runner.download(copied), ids[1:3])
    assert runner.take_rows(time_ids, 1, 3).ptr == copied.ptr  # same source rows: same scratch (CUDA graphs)
    with pytest.raises(ValueError):
        runner.take_rows(mid, 3, 5)


def test_concat_moves_off_the_target_when_an_offset_part_lies_in_it(runner):
    x, y = rng_array(4, 64, 2, 2, seed=1), rng_array(2, 64, 2, 2, seed=2)
    key, target = "denoiser_decoder.mid", runner.buffers["denoiser_decoder"]["mid"]
    first = runner.concat([runner.upload(x, "float32")], key=key)
    assert first.buffer is target
    inner = runner.take_rows(first, 1, 3)  # in the target, 1 KiB in: copying it to the start would overlap
    joined = runner.concat([inner, runner.upload(y, "float32")], key=key)
    assert joined.buffer is not target
    np.testing.assert_array_equal(runner.download(joined), np.concatenate([x[1:3], y]))


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_guidance_interval_on_the_stand_in_reproduces_onnxruntime(fake_trt_folder, fake_cuda, tiny_engine,
                                                                   monkeypatch, cuda_graphs):
    """Conditional rows taken on the device (views of the cache, copies of unaligned conditions) and a
    one-row decoder call padded to the profile's 2 rows give ONNX Runtime's latents."""
    policy = FasterDiffusionPolicy((0, 1, 2, 3, 5, 10, 15), 15, guidance_interval=(0.28, 5.42))
    reference = FasterDiffusionPipeline(tiny_engine)
    pipe = FasterDiffusionPipeline(fake_trt_folder, cuda_graphs=cuda_graphs)
    decoder_rows = []
    execute = pipe.runner._execute
    monkeypatch.setattr(pipe.runner, "_execute", lambda graph, feeds: (
        decoder_rows.append(feeds["timestep"].shape[0]) if graph == "denoiser_decoder" else None,
        execute(graph, feeds))[1])
    for seed in (3, 4):  # with CUDA graphs the second run replays
        want = reference([PROMPT], steps=20, scheduler="dpmpp-2m", seed=seed, negative_prompt="a horse", policy=policy)
        got = pipe([PROMPT], steps=20, scheduler="dpmpp-2m", seed=seed, negative_prompt="a horse", policy=policy)
        np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
    # steps 0..3 and 19 conditional only; windows [0] [1] [2] padded from 1 row to the profile's 2
    assert decoder_rows[:7] == [2, 2, 2, 1 + 2, 10, 10, 4 * 2 + 1]
    assert got.rows["denoiser_encoder"] == 3 * 1 + 4 * 2 and want.rows["denoiser_decoder"] == 35
    pipe.close()
    assert not fake_cuda.blocks


def test_guidance_interval_sdxl_on_the_stand_in_reproduces_onnxruntime(tiny_xl_engine, tmp_path, fake_cuda):
    """tiny-xl: zero negative rows, text_embeds and time_ids (24-byte rows: copied, not viewed) cut to
    the conditional half on the device."""
    folder = dressed_as_tensorrt(tiny_xl_engine, tmp_path / "tiny-xl-fake-tensorrt")
    reference, pipe = FasterDiffusionPipeline(tiny_xl_engine), FasterDiffusionPipeline(folder)
    policy = FasterDiffusionPolicy((0, 1, 2, 3, 5), 15, guidance_interval=(0.28, 5.42))
    want = reference([PROMPT], steps=8, seed=5, policy=policy)
    got = pipe([PROMPT], steps=8, seed=5, policy=policy)
    np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
    # DDIM-8 σ: 7.37 (step 0) and 0.041 (step 7) fall outside: window [0] conditional only (its one-row
    # decoder call padded to the profile's 2), [5..7] straddles
    assert got.rows["denoiser_decoder"] == 2 * 8 - 2 + 1 and got.rows["denoiser_encoder"] == 1 + 4 * 2
    pipe.close()


def test_peak_memory_counts_the_engines_and_each_runs_own_buffers(runner, fake_cuda):
    assert runner.capabilities.peak_memory and runner.capabilities.on_gpu
    assert runner.tensorrt_bytes == len(runner.engines) * FakeTensorRT.ENGINE_BYTES
    held = sum(block.nbytes for block in fake_cuda.blocks.values())  # every buffer allocated at load
    assert runner.peak_memory_bytes() == runner.tensorrt_bytes + held
    upload = runner.upload(np.zeros(1000, np.float32), "float32")
    del upload  # freed: still part of this run's peak
    assert runner.peak_memory_bytes() == runner.tensorrt_bytes + held + 4000
    runner.reset_peak_memory()  # the next run starts from what is held now
    assert runner.peak_memory_bytes() == runner.tensorrt_bytes + held


def test_close_frees_every_buffer_even_uploads_still_referenced(fake_trt_folder, fake_cuda):
    pipe = FasterDiffusionPipeline(fake_trt_folder)
    runner = pipe.runner
    kept = [runner.upload(np.ones(8), "float32"), runner.concat([runner.upload(np.ones(8), "float32")] * 2),
            runner.zeros_like(runner.upload(np.ones(8), "float32"))]
    pipe.close()
    assert not fake_cuda.blocks and len(kept) == 3
    pipe.close()  # twice is harmless


def test_load_refuses_engines_from_another_tensorrt(fake_trt_folder, fake_cuda):
    manifest = json.loads((fake_trt_folder / "manifest.json").read_text())
    manifest["backend_info"]["tensorrt_version"] = "10.3.0.26"
    (fake_trt_folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FdError, match="built for Fake GPU .sm_90. with TensorRT 10.3.0.26.*fd-build"):
        FasterDiffusionPipeline(fake_trt_folder)
    assert not fake_cuda.blocks  # refused before anything was allocated


def test_load_refuses_an_engine_whose_tensors_differ_from_the_manifest(fake_trt_folder, fake_cuda):
    manifest = json.loads((fake_trt_folder / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["outputs"][0]["dtype"] = "float16"
    (fake_trt_folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FdError, match="vae_decoder.plan does not match its manifest.*rebuild with `fd-build"):
        FasterDiffusionPipeline(fake_trt_folder)


def test_timing_cache_is_written_whole(tmp_path):
    from fd.builder.tensorrt_build import save_timing_cache
    cache = tmp_path / "caches" / "timing.cache"
    save_timing_cache(SimpleNamespace(get_timing_cache=lambda: SimpleNamespace(serialize=lambda: b"tactics")), cache)
    save_timing_cache(SimpleNamespace(get_timing_cache=lambda: None), cache)  # no cache attached: the file stays
    assert cache.read_bytes() == b"tactics" and [p.name for p in cache.parent.iterdir()] == ["timing.cache"]


def test_timing_cache_of_earlier_builds_is_merged(tmp_path):
    from fd.builder.tensorrt_build import reuse_timing_cache
    merged = []
    current = SimpleNamespace(combine=lambda old, ignore_mismatch: merged.append((old, ignore_mismatch)) or True)
    config = SimpleNamespace(create_timing_cache=lambda data: ("cache of", data), get_timing_cache=lambda: current)
    reuse_timing_cache(config, tmp_path / "timing.cache")  # no file yet: nothing to merge
    assert merged == []
    (tmp_path / "timing.cache").write_bytes(b"tactics")
    reuse_timing_cache(config, tmp_path / "timing.cache")
    assert merged == [(("cache of", b"tactics"), False)]  # never mixed with another device's timings


def test_progress_monitor_never_cancels_a_build():
    from fd.builder.tensorrt_build import progress_monitor
    monitor = progress_monitor(SimpleNamespace(IProgressMonitor=object), "denoiser_decoder")
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
    from fd.builder.build import BuildOptions, build
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
            assert got.calls == {"text_encoder": 1, "denoiser_encoder": 9, "denoiser_decoder": 9, "vae_decoder": 1}
            assert np.abs(got.latents - want.latents).max() <= tolerance * np.abs(want.latents).max()
        assert pipe.runner.peak_memory_bytes() >= pipe.runner.meter.held > 0
        pipe.close()


@pytest.mark.tensorrt
@needs_gpu
def test_tensorrt_sdxl_matches_onnxruntime(tiny_xl_engine, tmp_path):
    from fd.builder.build import BuildOptions, build
    folder = build(BuildOptions(model="tiny-xl", backend="tensorrt", precision="fp32", out=str(tmp_path / "xl")),
                   log=lambda *_: None)
    want = FasterDiffusionPipeline(tiny_xl_engine)([PROMPT], steps=20, seed=3)
    for cuda_graphs in (False, True):
        pipe = FasterDiffusionPipeline(folder, cuda_graphs=cuda_graphs)
        for _ in range(2):
            got = pipe([PROMPT], steps=20, seed=3)
            assert got.calls == want.calls
            assert np.abs(got.latents - want.latents).max() <= 1e-3 * np.abs(want.latents).max()
        pipe.close()


@pytest.mark.tensorrt
@needs_gpu
def test_tensorrt_folder_from_another_version_is_refused_before_loading(trt_build, tmp_path):
    _, folder, _ = trt_build
    copied = tmp_path / "copy"
    shutil.copytree(folder, copied)
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["backend_info"]["tensorrt_version"] = "9.9.9"
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FdError, match="TensorRT 9.9.9.*rebuild with `fd-build --model tiny --backend tensorrt"):
        FasterDiffusionPipeline(copied)
