"""ONNX Runtime folders store each graph as ONNX Runtime optimized it for this CPU (builder/onnxruntime_build.py),
for a fast load; the runner uses them only where the record fits (CPU provider, same ONNX Runtime, same CPU
instruction sets) and otherwise opens the portable graphs, as folders built before them are opened.

Each case works on a copy of the session's tiny folder whose large files are hard links (no copying).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import fd.runtime.backends.onnxruntime as ort_runner
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from tests.conftest import run_fd

GRAPHS = ("text_encoder", "denoiser_encoder", "denoiser_decoder", "vae_decoder")


def linked_copy(folder: Path, target: Path, change=None, copied=()) -> Path:
    """`folder` in `target`: its files hard-linked (those named in `copied` copied, so they can be damaged),
    its manifest rewritten by `change(manifest)`."""
    for path in folder.rglob("*"):
        copy = target / path.relative_to(folder)
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            copy.mkdir(exist_ok=True)
        elif path.name in copied:
            copy.write_bytes(path.read_bytes())
        elif path.name != "manifest.json":
            os.link(path, copy)
    manifest = json.loads((folder / "manifest.json").read_text())
    if change:
        change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def as_built_before(manifest):
    """The manifest of a folder built before fd stored optimized graphs (same manifest version)."""
    for spec in manifest["components"].values():
        spec.pop("optimized")
    manifest["backend_info"] = {}


def test_the_build_records_the_stored_graphs_and_this_host_opens_them(tiny_engine):
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    record = manifest["backend_info"]["optimized_graphs"]
    assert record == ort_runner.stored_graphs_record(record["onnxruntime"], ort_runner.cpu_signature())
    for name in GRAPHS:
        stored = manifest["components"][name]["optimized"]
        assert stored == {"file": f"{name}.opt.onnx", "data": f"{name}.opt.onnx.data"}
        for file in (manifest["components"][name]["file"], stored["file"], stored["data"]):
            assert manifest["backend_info"]["file_bytes"][file] == (tiny_engine / file).stat().st_size
    pipe = FasterDiffusionPipeline(tiny_engine)
    assert pipe.runner.stored_graphs_problem is None
    assert pipe.runner.loaded_files == {name: f"{name}.opt.onnx" for name in GRAPHS}
    assert set(pipe.runner.load_seconds) == set(GRAPHS)


def test_stored_and_portable_graphs_give_the_same_image(tiny_engine, tmp_path):
    """A folder built before the stored graphs still loads (its portable graphs, optimized at load), and
    generates exactly what the stored graphs generate."""
    before = linked_copy(tiny_engine, tmp_path / "before", as_built_before)
    portable, stored = FasterDiffusionPipeline(before), FasterDiffusionPipeline(tiny_engine)
    assert portable.runner.loaded_files == {name: f"{name}.onnx" for name in GRAPHS}
    assert "built before" in portable.runner.stored_graphs_problem
    want = portable(["a red cube"], steps=6, seed=4).latents
    got = stored(["a red cube"], steps=6, seed=4).latents
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def other_cpu(signature=ort_runner.cpu_signature()):
    """This CPU's signature with one more extension: a CPU the stored graphs were not made on."""
    return {**signature, "isa": signature["isa"] + ["an_extension_this_cpu_lacks"]}


@pytest.mark.parametrize("case, problem", [
    ("other-cpu", "a CPU with other instruction sets"),
    ("other-onnxruntime", "made by ONNX Runtime 0.1.0"),
    ("gpu", "for CPUExecutionProvider alone"),
])
def test_stored_graphs_are_left_alone_where_the_record_does_not_fit(tiny_engine, tmp_path, monkeypatch, case,
                                                                    problem):
    folder = tiny_engine
    if case == "other-cpu":
        monkeypatch.setattr(ort_runner, "cpu_signature", other_cpu)
    elif case == "other-onnxruntime":
        folder = linked_copy(tiny_engine, tmp_path / "copy",
                             lambda m: m["backend_info"]["optimized_graphs"].update(onnxruntime="0.1.0"))
    manifest = json.loads((folder / "manifest.json").read_text())
    if case == "gpu":  # no GPU here: the check alone, with the providers a CUDA session would have
        import onnxruntime
        found = ort_runner.stored_graphs_usable(onnxruntime, manifest, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert problem in found
        return
    pipe = FasterDiffusionPipeline(folder)
    assert problem in pipe.runner.stored_graphs_problem
    assert pipe.runner.loaded_files == {name: f"{name}.onnx" for name in GRAPHS}


def redirect_optimized(name, **record):
    return lambda m: m["components"][name].update(optimized=record)


@pytest.mark.parametrize("change, tamper, fragments", [
    pytest.param(redirect_optimized("vae_decoder", file="../vae.opt.onnx"), None,
                 ["components.vae_decoder.optimized.file is '../vae.opt.onnx', expected a relative path inside"],
                 id="stored-file-escapes"),
    pytest.param(None, lambda folder: (folder / "denoiser_decoder.opt.onnx.data").unlink(),
                 ["is missing denoiser_decoder.opt.onnx.data (components.denoiser_decoder.optimized.data)"],
                 id="stored-weights-missing"),
    pytest.param(None, lambda folder: os.truncate(folder / "text_encoder.opt.onnx.data", 100),
                 ["text_encoder.opt.onnx.data (components.text_encoder.optimized.data) is 100 bytes, fd-build wrote"],
                 id="stored-weights-truncated"),
    pytest.param(None, lambda folder: os.truncate(folder / "vae_decoder.onnx", 0),
                 ["vae_decoder.onnx (components.vae_decoder.file) is 0 bytes, fd-build wrote"],
                 id="portable-graph-truncated"),
    pytest.param(redirect_optimized("vae_decoder", file="text_encoder.opt.onnx", data="text_encoder.opt.onnx.data"),
                 None, ["text_encoder.opt.onnx is not the graph that components.vae_decoder describes"],
                 id="stored-graph-foreign"),
    pytest.param(lambda m: m["backend_info"]["optimized_graphs"].update(cpu="x86_64"), None,
                 ['backend_info.optimized_graphs.cpu is "x86_64", expected an object'], id="record-malformed"),
    pytest.param(lambda m: m["backend_info"]["file_bytes"].update({"vae_decoder.onnx": -1}), None,
                 ["backend_info.file_bytes.vae_decoder.onnx is -1, expected a byte count of 0 or more"],
                 id="size-malformed"),
])
def test_a_bad_stored_graph_is_refused_in_one_line(tiny_engine, tmp_path, change, tamper, fragments):
    folder = linked_copy(tiny_engine, tmp_path / "copy", change,
                         copied=("denoiser_decoder.opt.onnx.data", "text_encoder.opt.onnx.data", "vae_decoder.onnx"))
    if tamper:
        tamper(folder)
    with pytest.raises(FdError) as caught:
        FasterDiffusionPipeline(folder)
    message = str(caught.value)
    assert "\n" not in message and "fd-build" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_fd_run_says_a_truncated_copy_in_one_line(tiny_engine, tmp_path):
    folder = linked_copy(tiny_engine, tmp_path / "copy", copied=("denoiser_encoder.opt.onnx.data",))
    os.truncate(folder / "denoiser_encoder.opt.onnx.data", 1000)  # a copy cut short
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "x.png"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "a partial copy?" in lines[0] and "Traceback" not in done.stderr
