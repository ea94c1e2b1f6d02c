"""The torch backend: fd-build --backend torch writes self-contained torch.export programs, and fd's loop on
them equals diffusers (baseline) and the ONNX Runtime backend (FasterDiffusion on)."""
import copy
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fd.builder.build import BuildOptions, build
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy
from tests.conftest import REPO, run_fd
from tests.test_pipeline import PROMPT, diffusers_run, initial_latents

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-fp32-torch"
    return build(BuildOptions(model="tiny", backend="torch", precision="fp32", out=str(out)), log=lambda *_: None)


@pytest.fixture(scope="module")
def torch_pipe(torch_engine):
    return FasterDiffusionPipeline(torch_engine, device="cpu")


def test_folder_holds_only_torch_programs(torch_engine, torch_pipe):
    manifest = json.loads((torch_engine / "manifest.json").read_text())
    assert manifest["backend"] == "torch" and manifest["backend_info"]["export"] == "torch.export"
    assert sorted(p.name for p in torch_engine.glob("*.pt2")) == sorted(
        f"{name}.pt2" for name in manifest["components"])
    assert not list(torch_engine.glob("*.onnx*"))
    for spec in manifest["components"].values():  # checked under the same key as the ONNX graphs
        assert spec["file"].endswith(".pt2") and spec["export_seconds"] > 0 and "check_torch" not in spec
        # (a check over tolerance would have failed the build: only what was recorded is tested here)
        assert spec["check"]["tolerance"] == 1e-3 and spec["check"]["batches"]
    assert manifest["flops_per_sample"]["denoiser_encoder"] > 0 and manifest["flops_per_sample"]["denoiser_decoder"] > 0
    # unused weights are dropped: the encoder holds no up block, the decoder no down block
    modules = torch_pipe.runner.modules
    encoder = [name for name, _ in modules["denoiser_encoder"].named_parameters()]
    decoder = [name for name, _ in modules["denoiser_decoder"].named_parameters()]
    assert not any("up_blocks" in key for key in encoder) and any("down_blocks" in key for key in encoder)
    assert not any("down_blocks" in key for key in decoder) and any("up_blocks" in key for key in decoder)


def test_programs_move_off_the_export_device(torch_engine):
    """The meta device stands in for CUDA on a CPU-only box: a node left on the CPU (the text encoder's
    aranges were traced there) or a weight left behind fails to run there."""
    from fd.runtime.backends.torch_archive import load_program
    module = load_program(torch_engine / "text_encoder.pt2", "meta")
    with torch.inference_mode():
        out = module(torch.zeros(2, 77, dtype=torch.int64, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 77, 32)


def test_baseline_equals_diffusers_pipeline(torch_pipe, tiny_components):
    latents = initial_latents()
    ours = torch_pipe([PROMPT], steps=20, latents=latents, policy=FasterDiffusionPolicy.baseline(20))
    want_latents = diffusers_run(tiny_components, "ddim", 20, latents, "latent").numpy()
    want_image = diffusers_run(tiny_components, "ddim", 20, latents, "np")[0]
    assert np.abs(ours.latents - want_latents).max() <= 1e-4 * np.abs(want_latents).max()
    want_pixels = (want_image * 255).round().astype(np.int16)
    assert np.abs(np.asarray(ours.images[0]).astype(np.int16) - want_pixels).max() <= 2
    assert ours.calls == {"text_encoder": 1, "denoiser_encoder": 20, "denoiser_decoder": 20, "vae_decoder": 1}


@pytest.mark.parametrize("scheduler,steps,keys", [("ddim", 50, 9), ("dpmpp-2m", 20, 7)])
def test_fd_equals_onnxruntime_backend(torch_pipe, tiny_engine, scheduler, steps, keys):
    ort_pipe = FasterDiffusionPipeline(tiny_engine)
    latents = initial_latents(4)
    got = torch_pipe([PROMPT], steps=steps, scheduler=scheduler, latents=latents)
    want = ort_pipe([PROMPT], steps=steps, scheduler=scheduler, latents=latents)
    assert np.abs(got.latents - want.latents).max() <= 1e-4 * np.abs(want.latents).max()
    assert got.calls == want.calls == {"text_encoder": 1, "denoiser_encoder": keys, "denoiser_decoder": keys,
                                       "vae_decoder": 1}


def test_cpu_backend_has_no_device_memory_or_cuda_graphs(torch_pipe):
    torch_pipe.runner.reset_peak_memory()
    assert torch_pipe.runner.peak_memory_bytes() is None
    with pytest.raises(FdError, match="needs a CUDA GPU"):
        FasterDiffusionPipeline(torch_pipe.engine_dir, device="cpu", cuda_graphs=True)
    if not torch.cuda.is_available():
        with pytest.raises(FdError, match="sees no CUDA GPU"):
            FasterDiffusionPipeline(torch_pipe.engine_dir, device="cuda")


def test_unreadable_program_is_one_error_line(torch_engine, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(torch_engine, folder)
    (folder / "text_encoder.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(FdError, match=r"cannot load text_encoder.pt2 .*rebuild the folder") as info:
        FasterDiffusionPipeline(folder, device="cpu")
    assert "\n" not in str(info.value)


def test_generation_imports_torch_but_not_diffusers(torch_engine, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from fd.runtime.cli import main
        code = main(["--engine-dir", r"{torch_engine}", "--prompt", "a cat", "--steps", "4",
                     "--out", r"{tmp_path / 'x.png'}"])
        assert code == 0, code
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers"))
        assert not leaked, leaked
        assert "torch" in sys.modules
        print("clean")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "clean" in done.stdout and (tmp_path / "x.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_graphs_flag_without_gpu_is_one_error_line(torch_engine, tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(torch_engine), "--prompt", "a cat", "--steps", "2",
                  "--out", str(tmp_path / "x.png"), "--cuda-graphs")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --cuda-graphs needs a CUDA GPU; this run is on the CPU (drop --cuda-graphs)"]
    assert not (tmp_path / "x.png").exists()


def test_program_off_its_module_fails_the_build(tmp_path, monkeypatch):
    """A reloaded program that differs from its module stops the build with one FdError line, no folder."""
    from fd.builder import export
    run_torch = export.run_torch
    monkeypatch.setattr(export, "run_torch", lambda *args: [2 * w + 1 for w in run_torch(*args)])
    with pytest.raises(FdError, match=r"text_encoder\.pt2 \(torch\.export\) differs from PyTorch") as info:
        build(BuildOptions(model="tiny", backend="torch", out=str(tmp_path / "x")), log=lambda *_: None)
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


def test_fp16_decoder_exports_and_checks_on_cpu(tiny_components, tmp_path):
    """fp16 weights with the fp32 timestep input export, reload and match their module on the CPU too.
    Built for one step (a static batch of 2) to keep it quick: the dynamic batch is the fp32 tests' job."""
    from fd.builder import torch_build
    from fd.builder.build import model_geometry
    from fd.builder.families import FAMILIES
    from fd.runtime.batch import Limits
    comps = copy.deepcopy(tiny_components)  # graph_modules casts in place; the session's copy stays fp32
    modules = FAMILIES["sd"].graph_modules(comps, "fp16")
    geometry = model_geometry(comps, BuildOptions(model="tiny", backend="torch"))
    spec = FAMILIES["sd"].specs(comps, modules, geometry, "fp16", Limits(1, 1))["denoiser_decoder"]
    rng, path, vocab = np.random.default_rng(0), tmp_path / "denoiser_decoder.pt2", comps.text_encoder.config.vocab_size
    torch_build.export_program(modules["denoiser_decoder"], spec, rng, vocab, path)
    check = torch_build.check_program(path, modules["denoiser_decoder"], spec, rng, vocab, "fp16")
    assert check["tolerance"] == 3e-2 and check["batches"] == [2]
    assert {t["name"]: t["dtype"] for t in spec["inputs"]}["mid"] == "float16"  # an fp16 program was checked


@pytest.mark.cuda
@needs_cuda
def test_cuda_graphs_equal_eager_on_gpu(torch_engine, torch_pipe, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, to compare with the CPU
    eager = FasterDiffusionPipeline(torch_engine, device="cuda")
    graphed = FasterDiffusionPipeline(torch_engine, device="cuda", cuda_graphs=True)
    latents = initial_latents(5)
    want = eager([PROMPT], steps=50, latents=latents)
    got = graphed([PROMPT], steps=50, latents=latents)
    scale = np.abs(want.latents).max()
    assert np.abs(got.latents - want.latents).max() <= 1e-4 * scale
    assert got.calls == want.calls
    # one graph per component and shape: text, UNet encoder, VAE, and the decoder at windows 1, 2, 5, 10, 15
    assert len(graphed.runner.graphs) == 8
    again = graphed([PROMPT], steps=50, latents=latents)
    assert len(graphed.runner.graphs) == 8  # replayed, not captured again
    assert np.abs(again.latents - got.latents).max() <= 1e-6 * scale
    graphed.runner.reset_peak_memory()
    graphed([PROMPT], steps=4, latents=latents)
    assert graphed.runner.peak_memory_bytes() > 0
    # exported on the CPU, moved to the GPU: the same numbers as the CPU run
    cpu = torch_pipe([PROMPT], steps=50, latents=latents)
    assert np.abs(want.latents - cpu.latents).max() <= 1e-3 * scale


@pytest.mark.cuda
@needs_cuda
def test_fp16_folder_runs_on_gpu(torch_engine, tmp_path):
    out = tmp_path / "tiny-fp16-torch"
    build(BuildOptions(model="tiny", backend="torch", precision="fp16", out=str(out)), log=lambda *_: None)
    latents = initial_latents(6)
    half = FasterDiffusionPipeline(out, cuda_graphs=True)([PROMPT], steps=20, latents=latents)
    full = FasterDiffusionPipeline(torch_engine, device="cuda")([PROMPT], steps=20, latents=latents)
    assert np.isfinite(half.latents).all()
    assert np.abs(half.latents - full.latents).max() <= 5e-2 * np.abs(full.latents).max()
