"""Every bad input: exactly one `error: ...` line on stderr, a non-zero exit, no traceback, no file written.

One row per case: the command, its arguments and a fragment of the expected line. In the arguments,
{tmp} is the test's scratch folder (which holds the bad inputs made by `make_inputs`) and {engine} the
tiny engine folder. Output checks run before the engines load, so several rows need no engine at all.
"""
import shutil

import numpy as np
import pytest

from tests.conftest import run_fd

RUN, BENCH, BUILD = "fd.runtime.cli", "fd.benchmarks.cli", "fd.builder.cli"
GEN = ["--engine-dir", "{engine}", "--prompt", "a cat", "--steps", "2"]
BENCH_ARGS = ["--engine-dir", "{engine}", "--steps", "2", "--runs", "1", "--warmup", "0"]
OUT = ["--out", "{tmp}/out/img.png"]

CASES = [
    # fd-run: generation settings
    pytest.param(RUN, [*GEN, *OUT, "--seed", "-1"], "--seed -1 is not allowed", id="run-seed-negative"),
    pytest.param(RUN, [*GEN, *OUT, "--latents", "{tmp}/z.npz"], "an .npz archive, not a .npy", id="run-latents-npz"),
    pytest.param(RUN, [*GEN, *OUT, "--latents", "{tmp}/nan-inf.npy"], "nan-inf.npy contains NaN or infinite",
                 id="run-latents-nan-inf"),
    pytest.param(RUN, [*GEN, *OUT, "--guidance-scale", "nan"], "--guidance-scale nan is not allowed: give a finite",
                 id="run-guidance-nan"),
    pytest.param(RUN, [*GEN, *OUT, "--guidance-scale", "inf"], "--guidance-scale inf is not allowed: give a finite",
                 id="run-guidance-inf"),
    pytest.param(RUN, [*GEN, *OUT, "--key-steps", ""], "--key-steps '' names no steps", id="run-key-steps-empty"),
    pytest.param(RUN, ["--engine-dir", "{tmp}/file.txt", "--prompt", "a", *OUT],
                 "--engine-dir {tmp}/file.txt is a file, not a folder", id="run-engine-dir-file"),
    # fd-run: outputs, refused before the engines load (the engine folder here does not even exist)
    pytest.param(RUN, ["--engine-dir", "{tmp}/no-engine", "--prompt", "a", "--out", "{tmp}/file.txt/x.png"],
                 "{tmp}/file.txt is a file, not a folder", id="run-out-under-file-before-engine"),
    pytest.param(RUN, [*GEN, "--out", "/proc/fd-test.png"], "--out /proc/fd-test.png cannot be written: /proc",
                 id="run-out-unwritable"),
    pytest.param(RUN, [*GEN, "--out", "{tmp}/folder.png"], "--out {tmp}/folder.png is a folder", id="run-out-folder"),
    pytest.param(RUN, [*GEN, *OUT, "--save-latents", "{tmp}/file.txt/z.npy"], "{tmp}/file.txt is a file, not a folder",
                 id="run-save-latents-under-file"),
    pytest.param(RUN, [*GEN, *OUT, "--save-latents", "/proc/fd-test.npy"], "--save-latents /proc/fd-test.npy cannot",
                 id="run-save-latents-unwritable"),
    pytest.param(RUN, [*GEN, *OUT, "--save-latents", "{tmp}/folder.png"], "--save-latents {tmp}/folder.png is a folder",
                 id="run-save-latents-folder"),
    # fd-bench
    pytest.param(BENCH, [*BENCH_ARGS, "--seed", "-1"], "--seed -1 is not allowed", id="bench-seed-negative"),
    pytest.param(BENCH, [*BENCH_ARGS, "--guidance-scale", "nan"], "--guidance-scale nan is not allowed",
                 id="bench-guidance-nan"),
    pytest.param(BENCH, [*BENCH_ARGS, "--key-steps", ""], "--key-steps '' names no steps", id="bench-key-steps-empty"),
    pytest.param(BENCH, [*BENCH_ARGS, "--batch-size", "0"], "--batch-size 0 is not allowed: give 1 or more",
                 id="bench-batch-size-0"),
    pytest.param(BENCH, ["--engine-dir", "{tmp}/file.txt"], "is a file, not a folder", id="bench-engine-dir-file"),
    pytest.param(BENCH, [*BENCH_ARGS, "--json", "{tmp}/file.txt/r.json"], "{tmp}/file.txt is a file, not a folder",
                 id="bench-json-under-file"),
    pytest.param(BENCH, [*BENCH_ARGS, "--json", "/proc/fd-test.json"], "--json /proc/fd-test.json cannot be written",
                 id="bench-json-unwritable"),
    pytest.param(BENCH, [*BENCH_ARGS, "--json", "{tmp}/folder.png"], "--json {tmp}/folder.png is a folder",
                 id="bench-json-folder"),
    # fd-build: loading a local model folder (copies of the tiny one, broken in `make_inputs`)
    pytest.param(BUILD, ["--model", "{tmp}/no-scheduler", "--out", "{tmp}/engines/x"],
                 "has no scheduler/scheduler_config.json", id="build-scheduler-config-missing"),
    pytest.param(BUILD, ["--model", "{tmp}/bad-scheduler", "--out", "{tmp}/engines/x"],
                 "bad-scheduler/scheduler/scheduler_config.json is not readable JSON", id="build-scheduler-config-bad"),
    pytest.param(BUILD, ["--model", "{tmp}/truncated", "--out", "{tmp}/engines/x"],
                 "truncated/text_encoder/model.safetensors is damaged or incomplete", id="build-truncated-weights"),
    pytest.param(BUILD, ["--model", "models/mysd", "--out", "{tmp}/engines/x"], "--model models/mysd: no such folder",
                 id="build-relative-path-missing"),
    # fd-build: options a family does not take
    pytest.param(BUILD, ["--model", "tiny", "--split-block", "3", "--out", "{tmp}/engines/x"],
                 "--split-block applies to transformer families", id="build-split-block-unet"),
    pytest.param(BUILD, ["--model", "tiny-dit", "--controlnet", "tiny-controlnet", "--out", "{tmp}/engines/x"],
                 "--controlnet is for UNet families (sd, sdxl); the dit family", id="build-controlnet-dit"),
    pytest.param(BUILD, ["--model", "tiny-pixart", "--img2img", "--out", "{tmp}/engines/x"],
                 "--img2img is for UNet families (sd, sdxl); the pixart family", id="build-img2img-pixart"),
]


def make_inputs(tmp, tiny_folder, needs_models: bool) -> None:
    (tmp / "file.txt").write_text("a plain file\n")
    (tmp / "folder.png").mkdir()
    (tmp / "models").mkdir()  # so that models/mysd starts with a folder that exists here
    np.savez(tmp / "z.npz", latents=np.zeros((1, 4, 16, 16), np.float32))
    latents = np.zeros((1, 4, 16, 16), np.float32)
    latents[0, 0, 0, :2] = np.nan, np.inf
    np.save(tmp / "nan-inf.npy", latents)
    if not needs_models:
        return
    for name in ("no-scheduler", "bad-scheduler", "truncated"):
        shutil.copytree(tiny_folder, tmp / name)
    (tmp / "no-scheduler" / "scheduler" / "scheduler_config.json").unlink()
    (tmp / "bad-scheduler" / "scheduler" / "scheduler_config.json").write_text('{"beta_start": ')
    weights = tmp / "truncated" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def snapshot(folder) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("module,args,fragment", CASES)
def test_bad_input_gives_one_line(module, args, fragment, tmp_path, tiny_engine, tiny_folder):
    make_inputs(tmp_path, tiny_folder, needs_models=module == BUILD)
    before = snapshot(tmp_path)
    fill = {"tmp": str(tmp_path), "engine": str(tiny_engine)}
    done = run_fd(module, *[a.format(**fill) for a in args], cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert fragment.format(**fill) in lines[0], lines[0]
    new = snapshot(tmp_path) - before
    assert not [p for p in new if (tmp_path / p).is_file()], new  # no image, latents, report or engine file
    if module != BUILD:  # fd-run and fd-bench refuse before making even a folder (fd-build makes its --out's parent)
        assert not new, new


def test_check_writable_creates_nothing(tmp_path):
    from fd.runtime.atomic import check_writable
    check_writable(tmp_path / "new" / "deeper" / "img.png", "--out")  # missing folders: write_atomic makes them
    check_writable(tmp_path / "img.png", "--out")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_failure_is_one_fd_error(tmp_path):
    from fd.runtime.atomic import write_atomic
    from fd.runtime.errors import FdError
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FdError, match="cannot write"):
        write_atomic(tmp_path / "file.txt" / "x.png", lambda f: f.write(b"png"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(FdError, match="cannot write"):
        write_atomic(tmp_path / "folder", lambda f: f.write(b"png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder"]  # no temporary file left


@pytest.mark.parametrize("model,is_path", [
    ("org/name", False), ("sd15", False), ("./mysd", True), ("../mysd", True), ("/abs/mysd", True),
    ("~/mysd", True), ("a/b/c", True), ("models/mysd", True),  # models/ exists in the test's folder
])
def test_model_path_or_hub_id(model, is_path, tmp_path, monkeypatch):
    from fd.builder.models import looks_like_path
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(model) is is_path


@pytest.mark.parametrize("kwargs,fragment", [
    ({"seed": -1}, "--seed -1"),
    ({"guidance_scale": float("nan")}, "--guidance-scale nan"),
    ({"latents": np.full((1, 4, 16, 16), np.inf, np.float32)}, "NaN or infinite"),
])
def test_pipeline_checks_the_same_inputs(tiny_engine, kwargs, fragment):
    """Library callers get the same refusals as the CLI, before any graph runs."""
    from fd.runtime.errors import FdError
    from fd.runtime.pipeline import FasterDiffusionPipeline
    pipe = FasterDiffusionPipeline(tiny_engine)
    with pytest.raises(FdError, match=fragment):
        pipe(["a cat"], steps=2, **kwargs)
    assert sum(pipe.runner.calls.values()) == 0
    pipe.close()
