"""fd-build's output: each ONNX graph equals its PyTorch module under ONNX Runtime, the decoder graph
batches timesteps correctly, and the manifest says what was built."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from fd.builder import export
from fd.builder.specs import names
from fd.builder.families import FAMILIES
from fd.runtime.families import FAMILIES as RUNTIME_FAMILIES

COMPONENTS = RUNTIME_FAMILIES["sd"].graphs


@pytest.fixture(scope="module")
def manifest(tiny_engine):
    return json.loads((tiny_engine / "manifest.json").read_text())


@pytest.mark.parametrize("component", COMPONENTS)
def test_onnx_graph_equals_pytorch(tiny_engine, manifest, tiny_components, component):
    spec = manifest["components"][component]
    module = FAMILIES["sd"].graph_modules(tiny_components, "fp32")[component]
    feeds = export.random_inputs(spec, 3, np.random.default_rng(123), tiny_components.text_encoder.config.vocab_size)
    session = ort.InferenceSession(str(tiny_engine / spec["file"]), providers=["CPUExecutionProvider"])
    got = session.run(names(spec["outputs"]), feeds)
    want = export.run_torch(module, spec, feeds)
    assert len(got) == len(want) == len(spec["outputs"])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())


def test_onnx_decoder_batch_of_timesteps_equals_separate_calls(tiny_engine, manifest):
    spec = manifest["components"]["denoiser_decoder"]
    session = ort.InferenceSession(str(tiny_engine / spec["file"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    one = export.random_inputs(spec, 2, rng, 10)
    timesteps = np.array([961.0, 481.0, 1.0], np.float32)
    batched = {n: np.concatenate([v] * 3) for n, v in one.items()}
    batched["timestep"] = np.repeat(timesteps, 2)
    (got,) = session.run(["noise_pred"], batched)
    separate = [session.run(["noise_pred"], dict(one, timestep=np.full(2, t, np.float32)))[0] for t in timesteps]
    np.testing.assert_allclose(got, np.concatenate(separate), atol=1e-5, rtol=0)
    assert np.abs(separate[0] - separate[2]).max() > 1e-3


def test_manifest_records_the_build(tiny_engine, manifest):
    assert manifest["manifest_version"] == 3 and manifest["family"] == "sd"
    assert manifest["backend"] == "onnxruntime" and manifest["precision"] == "fp32"
    assert manifest["source"]["model"] == "tiny" and len(manifest["source"]["weights_sha256"]) == 64
    assert (manifest["height"], manifest["width"], manifest["vae_scale_factor"]) == (128, 128, 8)
    assert (manifest["latent_height"], manifest["latent_width"]) == (16, 16)
    assert manifest["limits"] == {"max_batch_size": 1, "max_window": 15}
    assert manifest["components"]["denoiser_decoder"]["batch"] == {"min": 2, "opt": 10, "max": 30}
    assert manifest["cache"][:2] == ["mid", "skip_00"] and len(manifest["cache"]) == 13
    assert manifest["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= set(manifest["versions"])
    for component in COMPONENTS:
        # The build raises when a check is over tolerance, so only what was recorded can be wrong here.
        assert manifest["components"][component]["check"]["tolerance"] == export.CHECK_TOLERANCE["fp32"]
        assert (tiny_engine / manifest["components"][component]["file"]).is_file()
    assert manifest["tokenizers"] == [{"file": "tokenizer/tokenizer.json", "max_length": 77, "pad_token_id": 553}]
    assert (tiny_engine / "tokenizer" / "tokenizer.json").is_file()
    sample = manifest["components"]["denoiser_encoder"]["inputs"][0]
    assert sample == {"name": "sample", "dtype": "float32", "shape": ["batch", 4, 16, 16],
                      "axes": ["batch", None, "height", "width"]}
    assert not list(tiny_engine.parent.glob(".*building*"))  # the staging folder is gone


def test_build_from_local_folder_matches_tiny(tiny_folder, tmp_path, manifest):
    from fd.builder.build import BuildOptions, build
    out = build(BuildOptions(model=str(tiny_folder), out=str(tmp_path / "local")), log=lambda *_: None)
    local = json.loads((out / "manifest.json").read_text())
    assert local["source"]["kind"] == "local"
    assert local["source"]["weights_sha256"] == manifest["source"]["weights_sha256"]  # same weights, same hash


def test_fp16_build_checks_against_pytorch(tmp_path, manifest):
    from fd.builder.build import BuildOptions, build
    out = build(BuildOptions(model="tiny", precision="fp16", out=str(tmp_path / "fp16")), log=lambda *_: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp16"
    decoder = m["components"]["denoiser_decoder"]
    assert {t["name"]: t["dtype"] for t in decoder["inputs"]}["mid"] == "float16"
    assert {t["name"]: t["dtype"] for t in decoder["inputs"]}["timestep"] == "float32"
    assert decoder["check"]["tolerance"] == export.CHECK_TOLERANCE["fp16"]
    # half-precision arithmetic really ran: its error is far above the fp32 build's (~1e-3 vs ~1e-6)
    assert decoder["check"]["max_rel_error"] > 100 * manifest["components"]["denoiser_decoder"]["check"]["max_rel_error"]
