"""benchmarks/gpu.sh --dry-run: the GPU measurement script, run on the CPU with the tiny models, so it cannot rot
before a GPU machine is lent (where it has one try of ten minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.sh"


def run_script(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    done = run_script("--dry-run", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_dry_run_writes_only_the_three_files(dry_run):
    out, _ = dry_run
    # a lent machine returns at most 8 files: the engines and per-part files stay in the work folder
    assert sorted(p.name for p in out.iterdir()) == ["gpu.log", "results.json", "results.md"]


def test_every_part_ran_or_says_why_not(dry_run):
    _, run = dry_run
    status = {p["name"]: p["status"] for p in run["parts"]}
    assert status == {
        "environment": "ok", "build-tiny": "ok", "tiny-ddim10-graphs-off": "ok", "tiny-dpmpp8-graphs-off": "ok",
        "tiny-ddim10-graphs-on": "skipped (CUDA graphs need a GPU)",
        "tiny-dpmpp8-graphs-on": "skipped (CUDA graphs need a GPU)",
        "tiny-deepcache3-ddim10": "ok", "build-tiny-xl": "ok", "tiny-xl-ddim10-graphs-off": "ok"}
    assert run["mode"] == "dry-run" and run["environment"]["torch"]["cuda_available"] is False


def test_bench_parts_carry_fd_bench_figures(dry_run):
    _, run = dry_run
    parts = {p["name"]: p for p in run["parts"]}
    ddim = parts["tiny-ddim10-graphs-off"]["result"]
    assert set(ddim["arms"]) == {"baseline", "fasterdiffusion", "diffusers"}  # --compare diffusers
    assert ddim["settings"]["scheduler"] == "ddim" and ddim["settings"]["steps"] == 10
    assert ddim["engine"]["backend"] == "torch"
    assert parts["tiny-dpmpp8-graphs-off"]["result"]["settings"]["scheduler"] == "dpmpp-2m"
    assert parts["tiny-xl-ddim10-graphs-off"]["result"]["engine"]["family"] == "sdxl"
    deepcache = parts["tiny-deepcache3-ddim10"]["result"]
    assert set(deepcache["arms"]) == {"diffusers", "deepcache-3"} and deepcache["speedup"] > 0
    # DeepCache really skips work: its final latents differ from diffusers' (an identical result would mean
    # the helper never cached anything)
    assert deepcache["final_latent_rel_diff"] > 1e-4


def test_markdown_has_the_parts_table_and_each_bench_table(dry_run):
    out, _ = dry_run
    text = (out / "results.md").read_text()
    assert "| build-tiny | ok |" in text
    for section in ("## tiny-ddim10-graphs-off", "## tiny-dpmpp8-graphs-off", "## tiny-deepcache3-ddim10",
                    "## tiny-xl-ddim10-graphs-off", "DeepCache over diffusers"):
        assert section in text


def test_usage_error_is_one_line_and_exit_2(tmp_path):
    done = run_script()
    assert done.returncode == 2 and done.stderr.strip() == "usage: benchmarks/gpu.sh [--dry-run] OUTDIR"


def test_exhausted_budget_skips_parts_and_still_reports(tmp_path):
    done = run_script("--dry-run", str(tmp_path), FD_GPU_BUDGET="30")
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((tmp_path / "results.json").read_text())
    assert {p["status"] for p in run["parts"]} == {"skipped (budget)"}
    assert {p["name"] for p in run["parts"]} == {"environment", "build-tiny", "build-tiny-xl"}


@pytest.mark.parametrize("backend, message", [
    ("onnxruntime", "--device cuda is for --backend torch"),
    ("torch", "--device cuda, but this PyTorch sees no CUDA GPU"),
])
def test_build_device_refusals_are_one_line(tmp_path, backend, message):
    torch = pytest.importorskip("torch")
    if backend == "torch" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    from fd.builder.build import BuildOptions, build
    from fd.runtime.errors import FdError
    with pytest.raises(FdError, match=message):
        build(BuildOptions(model="tiny", backend=backend, device="cuda", out=str(tmp_path / "x")), log=lambda *_: None)
    assert not (tmp_path / "x").exists()
