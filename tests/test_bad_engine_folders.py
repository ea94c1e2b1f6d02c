"""A tampered or corrupt engine folder is refused at load in one line that names the bad key or file and
says to rebuild with fd-build, never with a traceback, and nothing outside the folder is opened.

Each case tampers with a copy of the session's tiny ONNX Runtime folder. Most are checked in-process
(FdError from the pipeline's constructor); a few go through fd-run and fd-bench for the one-line,
no-traceback contract of the command line.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from tests.conftest import run_fd


def edit_manifest(change):
    """A tampering step that loads manifest.json, lets `change(manifest)` edit it, and writes it back."""
    def tamper(folder: Path, outside: Path):
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return tamper


def write(name: str, data: bytes):
    def tamper(folder: Path, outside: Path):
        (folder / name).write_bytes(data)
    return tamper


def link_out(name: str):
    """Replace `name` by a link to an identical copy outside the folder (the graph itself is fine)."""
    def tamper(folder: Path, outside: Path):
        target = outside / Path(name).name
        shutil.move(folder / name, target)
        os.symlink(target, folder / name)
    return tamper


def scramble(name: str):
    """Replace `name` by random bytes of the same size (damage the size check cannot see)."""
    def tamper(folder: Path, outside: Path):
        size = (folder / name).stat().st_size
        (folder / name).write_bytes(os.urandom(size))
    return tamper


def delete(name: str):
    return lambda folder, outside: (folder / name).unlink()


def copy_over(source: str, target: str):
    return lambda folder, outside: shutil.copyfile(folder / source, folder / target)


def set_key(*path_and_value):
    *keys, value = path_and_value

    def change(manifest):
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit_manifest(change)


def drop_key(*keys):
    def change(manifest):
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return edit_manifest(change)


def rename_last_cache_entry(manifest):
    """cache and encoder outputs agree, but the decoder takes no such input."""
    manifest["cache"][-1] = "skip_99"
    manifest["components"]["denoiser_encoder"]["outputs"][-1]["name"] = "skip_99"


CASES = [
    pytest.param(write("manifest.json", b"[1, 2]"), ["manifest.json", "the manifest is a list, expected an object"],
                 id="manifest-a-list"),
    pytest.param(write("manifest.json", b'"an engine"'), ['the manifest is "an engine", expected an object'],
                 id="manifest-a-string"),
    pytest.param(write("manifest.json", b'{"manifest_version": 1,'), ["manifest.json is unreadable"],
                 id="invalid-json"),
    pytest.param(write("manifest.json", b"\xff\xfe{}"), ["manifest.json is unreadable"], id="not-utf8"),
    pytest.param(drop_key("manifest_version"), ["has no manifest_version"], id="no-version"),
    pytest.param(drop_key("components", "denoiser_encoder"), ["components.denoiser_encoder is missing"],
                 id="missing-unet-graph"),
    pytest.param(drop_key("components", "text_encoder"),
                 ["components lists [denoiser_encoder, denoiser_decoder, vae_decoder], a sd folder has [text_encoder, "],
                 id="missing-family-graph"),
    pytest.param(set_key("family", "sd9"), ["model family 'sd9', which this fd does not know"], id="unknown-family"),
    pytest.param(set_key("family", ["sd"]), ["family is a list, expected a string"], id="family-a-list"),
    pytest.param(edit_manifest(lambda m: m["tokenizers"].append(m["tokenizers"][0])),
                 ["tokenizers lists 2, a sd folder has 1"], id="tokenizer-too-many"),
    pytest.param(set_key("tokenizers", 0, "max_length", 10),
                 ["tokenizers[0].max_length is 10, but components.text_encoder takes input_ids of shape [77]"],
                 id="tokenizer-length-not-the-graphs"),
    pytest.param(drop_key("components", "denoiser_decoder", "outputs", 0, "axes"),
                 ["components.denoiser_decoder.outputs[0].axes is missing"], id="missing-axes"),
    pytest.param(drop_key("components", "denoiser_decoder", "file"), ["components.denoiser_decoder.file is missing"],
                 id="missing-file-key"),
    pytest.param(drop_key("limits"), ["limits is missing"], id="missing-limits"),
    pytest.param(set_key("limits", "max_batch_size", "two"),
                 ['limits.max_batch_size is "two", expected a positive integer'], id="limit-a-string"),
    pytest.param(set_key("limits", "max_window", True), ["limits.max_window is true, expected a positive integer"],
                 id="limit-a-bool"),
    pytest.param(set_key("components", "denoiser_decoder", "batch", "max", "30"),
                 ['components.denoiser_decoder.batch.max is "30", expected a positive integer'], id="batch-max-a-string"),
    pytest.param(set_key("components", "vae_decoder", "inputs", 0, "dtype", "float8"),
                 ["components.vae_decoder.inputs[0].dtype is \"float8\", expected one of"], id="unknown-dtype"),
    pytest.param(set_key("tokenizers", 0, "max_length", None), ["tokenizers[0].max_length is null"], id="null-number"),
    pytest.param(set_key("components", "vae_decoder", "file", "../../etc/passwd"),
                 ["components.vae_decoder.file is '../../etc/passwd', expected a relative path inside"],
                 id="file-escapes"),
    pytest.param(set_key("components", "text_encoder", "file", "/etc/passwd"),
                 ["components.text_encoder.file is '/etc/passwd', expected a relative path inside"],
                 id="file-absolute"),
    pytest.param(set_key("components", "text_encoder", "file", ""), ["components.text_encoder.file is ''"],
                 id="file-empty"),
    pytest.param(link_out("vae_decoder.onnx"),
                 ["vae_decoder.onnx (components.vae_decoder.file) is a link that leads outside the engine folder"],
                 id="named-file-links-out"),
    pytest.param(link_out("tokenizer/tokenizer_config.json"),
                 ["tokenizer_config.json is a link that leads outside the engine folder"], id="other-file-links-out"),
    pytest.param(delete("denoiser_encoder.onnx"), ["is missing denoiser_encoder.onnx (components.denoiser_encoder.file)"],
                 id="graph-missing"),
    pytest.param(delete("tokenizer/tokenizer.json"), ["is missing tokenizer/tokenizer.json (tokenizers[0].file)"],
                 id="tokenizer-missing"),
    pytest.param(set_key("tokenizers", 0, "file", "../tokenizer.json"),
                 ["tokenizers[0].file is '../tokenizer.json', expected a relative path inside"], id="tokenizer-escapes"),
    pytest.param(write("tokenizer/tokenizer.json", b"{}"), ["cannot read the tokenizer", "tokenizer.json"],
                 id="tokenizer-garbage"),
    pytest.param(edit_manifest(lambda m: m["cache"].pop()),
                 ["cache [mid, skip_00, skip_01, skip_02, … (12 in all)] is not components.denoiser_encoder.outputs"],
                 id="cache-shorter"),
    pytest.param(edit_manifest(rename_last_cache_entry),
                 ["cache [skip_99] is not among components.denoiser_decoder.inputs"], id="cache-not-decoded"),
    # tiny_engine is opened from its stored optimized graphs (*.opt.onnx) on this machine
    pytest.param(scramble("denoiser_encoder.opt.onnx"),
                 ["cannot load", "denoiser_encoder.opt.onnx (components.denoiser_encoder.optimized.file)",
                  "Protobuf parsing failed"], id="graph-garbage"),
    pytest.param(write("vae_decoder.onnx", b""),
                 ["vae_decoder.onnx (components.vae_decoder.file) is 0 bytes, fd-build wrote"], id="graph-empty"),
    pytest.param(set_key("components", "vae_decoder", "optimized",
                         {"file": "text_encoder.opt.onnx", "data": "text_encoder.opt.onnx.data"}),
                 ["text_encoder.opt.onnx is not the graph that components.vae_decoder describes",
                  "inputs[0] 'latent' is not among the graph's inputs: input_ids"], id="graph-foreign"),
    pytest.param(set_key("components", "vae_decoder", "inputs", 0, "dtype", "float16"),
                 ["inputs[0] 'latent' is float32 in the graph, float16 in the manifest"], id="graph-dtype"),
    pytest.param(set_key("components", "vae_decoder", "outputs", 0, "shape", ["batch", 3, 64, 64]),
                 ["outputs[0] 'image' has shape ['batch', 3, 128, 128] in the graph"], id="graph-shape"),
    pytest.param(set_key("limits", "max_batch_size", 2),
                 ["limits.max_batch_size 2 and limits.max_window 15 need components.text_encoder.batch from 1 to 4, "
                  "the graph was built for 1 to 2"], id="limits-beyond-graphs"),
    pytest.param(set_key("limits", "max_window", 20), ["need components.denoiser_decoder.batch from 2 to 40"],
                 id="window-beyond-graphs"),
]


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def tampered_copy(tiny_engine, tmp_path, outside, tamper) -> Path:
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    tamper(copy, outside)
    return copy


def assert_refused(message: str, fragments):
    assert "\n" not in message and message.strip() == message and message, repr(message)
    for fragment in fragments:
        assert fragment in message, message
    assert "fd-build" in message, message


@pytest.mark.parametrize("tamper,fragments", CASES)
def test_tampered_folder_is_refused_in_one_line(tiny_engine, tmp_path, outside, tamper, fragments):
    folder = tampered_copy(tiny_engine, tmp_path, outside, tamper)
    with pytest.raises(FdError) as info:
        FasterDiffusionPipeline(folder)
    assert_refused(str(info.value), fragments)


def test_an_untouched_copy_and_links_inside_the_folder_load(tiny_engine, tmp_path, outside):
    """The checks refuse what they should and only that: a link that stays inside the folder is fine."""
    def link_inside(folder, _):
        shutil.move(folder / "vae_decoder.onnx", folder / "tokenizer" / "vae.onnx")
        os.symlink(Path("tokenizer") / "vae.onnx", folder / "vae_decoder.onnx")
    folder = tampered_copy(tiny_engine, tmp_path, outside, link_inside)
    pipe = FasterDiffusionPipeline(folder)
    assert pipe(["a cat"], steps=2).images[0].size == (128, 128)


CLI_CASES = ["manifest-a-list", "file-escapes", "graph-garbage", "graph-foreign"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_fd_run_prints_one_line_and_writes_nothing(tiny_engine, tmp_path, outside, case):
    (tamper, fragments), = [param.values for param in CASES if param.id == case]
    folder = tampered_copy(tiny_engine, tmp_path, outside, tamper)
    out = tmp_path / "x.png"
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folder), "--prompt", "a cat", "--out", str(out))
    assert_cli_refused(done, fragments)
    assert not out.exists()


def test_fd_bench_prints_the_same_line(tiny_engine, tmp_path, outside):
    (tamper, fragments), = [param.values for param in CASES if param.id == "limits-beyond-graphs"]
    folder = tampered_copy(tiny_engine, tmp_path, outside, tamper)
    done = run_fd("fd.benchmarks.cli", "--engine-dir", str(folder), "--runs", "1", "--warmup", "0")
    assert_cli_refused(done, fragments)


def assert_cli_refused(done, fragments):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert_refused(lines[0][len("error: "):], fragments)
