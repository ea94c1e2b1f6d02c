"""Bad input gets one clear line on stderr, a non-zero exit, and leaves no partial engine folder."""
import json
import shutil

import pytest

from tests.conftest import run_fd


def assert_one_line_error(done, *fragments):
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_left(folder):
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def test_unknown_model(tmp_path):
    done = run_fd("fd.builder.cli", "--model", "no-such-model", "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, "unknown model 'no-such-model'", "sd15")
    assert_nothing_left(tmp_path / "engines")


def test_hub_model_missing_offline(tmp_path):
    done = run_fd("fd.builder.cli", "--model", "nobody/not-cached-model", "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, "not in the local Hugging Face cache", "local diffusers pipeline folder")
    assert_nothing_left(tmp_path / "engines")


def test_local_folder_missing_weights(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    done = run_fd("fd.builder.cli", "--model", str(broken), "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, "no weights in unet/")
    assert_nothing_left(tmp_path / "engines")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--height", "100", "multiple of 8"),
    ("--width", "96", "multiple of 64"),  # a multiple of 8 that the tiny UNet (8x8 downsampling) cannot split
    ("--max-batch-size", "0", "out of range"),
])
def test_bad_build_sizes(tmp_path, flag, value, fragment):
    done = run_fd("fd.builder.cli", "--model", "tiny", flag, value, "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, fragment)
    assert_nothing_left(tmp_path / "engines")


def test_dynamic_shape_refused_for_torch_folders(tmp_path):
    done = run_fd("fd.builder.cli", "--model", "tiny", "--backend", "torch", "--dynamic-shape", "64:256",
                  "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, "--dynamic-shape is for onnxruntime or tensorrt folders")
    assert_nothing_left(tmp_path / "engines")


def test_existing_folder_needs_force(tiny_engine):
    done = run_fd("fd.builder.cli", "--model", "tiny", "--out", str(tiny_engine))
    assert_one_line_error(done, "already exists", "--force")
    assert (tiny_engine / "manifest.json").is_file()


def test_engine_folder_missing(tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tmp_path / "nope"), "--prompt", "a cat")
    assert_one_line_error(done, "does not exist", "fd-build")


def test_engine_folder_from_newer_fd(tiny_engine, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(tiny_engine, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    done = run_fd("fd.runtime.cli", "--engine-dir", str(newer), "--prompt", "a cat")
    assert_one_line_error(done, "newer fd", "upgrade fd")


@pytest.mark.parametrize("args,fragment", [
    (["--key-steps", "0,5,60"], "key step 60 is out of range for 50 steps"),
    (["--key-steps", "0,x"], "not a comma-separated list"),
    (["--uniform", "0"], "--uniform 0"),
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--height", "192"], "built for 128x128 only, not 192x128: rebuild with `fd-build --model tiny --backend onnxruntime"),
    (["--width", "0"], "image size 128x0 is not allowed"),
])
def test_bad_generation_settings(tiny_engine, tmp_path, args, fragment):
    out = tmp_path / "out" / "img.png"
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine), "--prompt", "a cat", "--out", str(out), *args)
    assert_one_line_error(done, fragment)
    assert not out.parent.exists()


def test_empty_prompt_list(tiny_engine):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine))
    assert_one_line_error(done, "--prompt")


def test_prompt_too_long(tiny_engine, tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine), "--prompt", "cat " * 80,
                  "--out", str(tmp_path / "x.png"))
    assert_one_line_error(done, "tokens long", "shorten it")


def test_too_many_prompts_for_the_engine(tiny_engine, tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine), "--prompt", "a", "--prompt", "b",
                  "--out", str(tmp_path / "x.png"))
    assert_one_line_error(done, "--max-batch-size 2")


def test_latents_of_the_wrong_shape(tiny_engine, tmp_path):
    import numpy as np
    np.save(tmp_path / "z.npy", np.zeros((1, 4, 8, 8), np.float32))
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine), "--prompt", "a cat",
                  "--latents", str(tmp_path / "z.npy"), "--out", str(tmp_path / "x.png"))
    assert_one_line_error(done, "(1, 4, 16, 16)")
