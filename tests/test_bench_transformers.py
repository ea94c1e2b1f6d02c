"""fd-bench on the transformer families: tiny-dit (class labels, DiTPipeline) and tiny-pixart (T5 prompts,
PixArtAlphaPipeline).

- with --compare diffusers, the diffusers arm equals fd's baseline (the bench's own fidelity check: PSNR inf or
  over 40 dB, final latents within 1e-3), with each family's guidance scale and noise-injection tau in the JSON;
- the DiT call leaves DiTPipeline's noise draw and its VAE as they were;
- --prompt on a DiT folder and --class-label on a text folder (and unknown class labels) are one line, before
  any engine loads;
- the build's FLOP count feeds every input in its own dtype.
No test asserts a speed.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fd.benchmarks import bench, cli
from fd.builder.families import FAMILIES, family_generating
from fd.runtime.errors import FdError
from tests.test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

STEPS = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("bench-transformers")
    return {model: build(BuildOptions(model=model, max_batch_size=1, max_window=6, out=str(root / model)),
                         log=lambda *_: None)
            for model in ("tiny-dit", "tiny-pixart")}


def bench_json(folder, tmp_path, *extra) -> dict:
    out = tmp_path / "r.json"
    code = cli.main(["--engine-dir", str(folder), "--steps", str(STEPS), "--runs", "1", "--warmup", "0",
                     "--json", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text())


def assert_diffusers_equals_baseline(r: dict) -> None:
    same = r["fidelity"]["diffusers_vs_baseline"]  # the same sampler on the same weights, inputs and latents
    assert same["psnr_db"] == "inf" or same["psnr_db"] > 40
    assert same["max_abs_latent_diff"] < 1e-3
    differs = r["fidelity"]["fasterdiffusion_vs_baseline"]  # noise injection: the check can tell arms apart
    assert differs["max_abs_latent_diff"] > 1e-3


@pytest.mark.parametrize("model, pipeline, guidance, tau, prompt, label", [
    ("tiny-dit", "DiTPipeline", 4.0, 300, None, "207"),
    ("tiny-pixart", "PixArtAlphaPipeline", 4.5, 300, bench.DEFAULT_PROMPT, None)])
def test_compare_diffusers_equals_the_baseline_with_the_family_defaults(folders, tmp_path, model, pipeline,
                                                                        guidance, tau, prompt, label):
    r = bench_json(folders[model], tmp_path, "--compare", "diffusers")
    s = r["settings"]
    assert (s["guidance_scale"], s["noise_injection"]["tau"]) == (guidance, tau)
    assert (s["prompt"], s["class_label"]) == (prompt, label)
    assert r["arms"]["fasterdiffusion"]["policy"]["noise_injection"]["tau"] == tau
    assert r["engine"]["split_block"] == 4
    arm = r["arms"]["diffusers"]
    assert arm["pipeline"] == pipeline and arm["calls"] == {"transformer": STEPS}
    assert r["arms"]["baseline"]["calls"]["denoiser_encoder"] == STEPS
    assert_diffusers_equals_baseline(r)


def test_dit_labels_and_guidance_given(folders, tmp_path):
    """A name from id2label in another case, and guidance off (1: DiTPipeline's unguided branch too)."""
    r = bench_json(folders["tiny-dit"], tmp_path, "--class-label", "Tabby Cat", "--guidance-scale", "1",
                   "--compare", "diffusers", "--markdown", str(tmp_path / "r.md"))
    assert r["settings"]["class_label"] == "Tabby Cat" and r["settings"]["guidance_scale"] == 1.0
    assert r["arms"]["baseline"]["rows"]["denoiser_decoder"] == STEPS  # one row per step: unguided
    assert_diffusers_equals_baseline(r)
    table = (tmp_path / "r.md").read_text()
    assert "transformer encoder" in table and "UNet" not in table


def test_pixart_prompt_given(folders, tmp_path):
    r = bench_json(folders["tiny-pixart"], tmp_path, "--prompt", "A Cat painting", "--compare", "diffusers")
    assert r["settings"]["prompt"] == "A Cat painting"
    assert_diffusers_equals_baseline(r)


def dit_pipeline():
    from diffusers import DDIMScheduler
    comps = family_generating("tiny-dit")()
    config = {k: v for k, v in comps.scheduler_config.items() if not k.startswith("_")}
    pipe = FAMILIES["dit"].diffusers_pipeline(comps, DDIMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_call_feeds_our_noise_and_leaves_the_pipeline_as_it_was():
    from diffusers.pipelines.dit import pipeline_dit
    from diffusers.utils.torch_utils import randn_tensor
    pipe, family = dit_pipeline(), FAMILIES["dit"]
    latents = [torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32))
               for seed in (0, 1)]
    with torch.no_grad():
        runs = [family.diffusers_call(pipe, ["207"], z, steps=3, guidance_scale=4.0, height=64, width=64)
                for z in (latents[0], latents[0], latents[1])]
    assert np.array_equal(runs[0][0], runs[1][0])  # our noise, not a fresh draw
    assert np.abs(runs[0][1] - runs[2][1]).max() > 1e-2  # and other noise gives other latents
    assert pipeline_dit.randn_tensor is randn_tensor and "decode" not in vars(pipe.vae)
    with pytest.raises(FdError, match="unknown class label"), torch.no_grad():
        family.diffusers_call(pipe, ["zebra"], latents[0], steps=3, guidance_scale=4.0, height=64, width=64)
    assert pipeline_dit.randn_tensor is randn_tensor and "decode" not in vars(pipe.vae)  # after an error too


def test_dit_compare_at_another_size_is_refused():
    with pytest.raises(FdError, match="DiTPipeline generates only at .* 64x64, not 128x128"):
        FAMILIES["dit"].check_diffusers_call(dit_pipeline(), 128, 128)


@pytest.mark.parametrize("model, args, fragment", [
    ("tiny-dit", ["--prompt", "a cat"], "class-conditional dit model: give --class-label"),
    ("tiny-pixart", ["--class-label", "207"], "--class-label is for class-conditional models"),
    ("tiny-dit", ["--class-label", "zebra"], "unknown class label 'zebra'"),
    ("tiny-dit", ["--class-label", "1000"], "class label 1000 is out of range"),
    ("tiny-dit", ["--guidance-scale", "nan"], "--guidance-scale nan is not allowed")])
def test_wrong_inputs_are_one_line_before_any_engine_loads(folders, model, args, fragment, monkeypatch, capsys):
    def no_loading(*_a, **_k):
        raise AssertionError("the engine folder was loaded before the inputs were checked")
    monkeypatch.setattr("fd.runtime.pipeline.FasterDiffusionPipeline", no_loading)
    code = cli.main(["--engine-dir", str(folders[model]), "--steps", "2", "--runs", "1", "--warmup", "0", *args])
    assert_one_line_error(SimpleNamespace(returncode=code, stderr=capsys.readouterr().err), fragment)
    assert code == 2


def test_flop_count_feeds_each_input_in_its_dtype(folders):
    """DiT's class labels and PixArt's token mask are int64 in the specs: the counter feeds them as integers."""
    from torch import nn
    from fd.builder.flops import unet_flops
    seen = {}

    class Recorder(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, *feeds):
            seen[self.name] = {feed.dtype for feed in feeds[2:]} if self.name == "denoiser_encoder" else None
            return feeds[0] * 2
    for model, folder in folders.items():
        specs = json.loads((folder / "manifest.json").read_text())["components"]
        unet_flops({name: Recorder(name) for name in ("denoiser_encoder", "denoiser_decoder")}, specs)
        want = {torch.int64} if model == "tiny-dit" else {torch.float32, torch.int64}
        assert seen["denoiser_encoder"] == want, model


@pytest.mark.parametrize("model", ["tiny-dit", "tiny-pixart"])
def test_flop_split_counts_the_transformer_halves_as_fd_build(folders, model, tmp_path):
    """benchmarks/flop_split on the meta device counts the same halves fd-build counted on CPU tensors."""
    from fd.benchmarks import flop_split
    code = flop_split.main(["--model", model, "--json", str(tmp_path / "s.json")])
    assert code == 0
    row = json.loads((tmp_path / "s.json").read_text())["sizes"][0]
    assert row["unet"] is None  # no whole-UNet count for a transformer
    manifest = json.loads((folders[model] / "manifest.json").read_text())
    assert row["latent"] == [4, manifest["latent_height"], manifest["latent_width"]]
    for name in ("denoiser_encoder", "denoiser_decoder"):  # fd-build counts CPU attention with its own formula
        assert manifest["flops_per_sample"][name] == row[name]["flops"], name


def test_flop_split_of_a_transformer_at_another_size_is_one_line(capsys):
    from fd.benchmarks import flop_split
    code = flop_split.main(["--model", "tiny-dit", "--size", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "native size, 64x64" in err[0]
