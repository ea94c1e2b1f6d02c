"""DiT (class-conditional diffusion transformer) end to end on tiny-dit, CPU, ONNX Runtime:

- the split: encoder → decoder equals diffusers' full forward (fp32, 1e-5), one decoder call over k timesteps
  equals k calls;
- the baseline (--no-fd) equals diffusers' DiTPipeline on the same components, scheduler (DDIM, DPM++ 2M),
  guidance (on and off) and initial noise (latents within 1e-3 relative, pixels within 2/255);
- FasterDiffusion equals the independent reference loop below, which runs diffusers' own DiT modules (no fd
  split, no fd runtime) with the same key steps, noise injection (tau 300) and guidance, and the
  reference's deliberately wrong variants are far off;
- bad input is one line.
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES, family_generating
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from fd.runtime.request import Request
from tests import fd_reference
from tests.compare import assert_equals_diffusers, relative_error
from tests.conftest import run_fd
from tests.test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

LABELS = [3, "golden retriever"]  # an id and an id2label name (207)
CLASS_IDS = [3, 207]
STEPS = {"ddim": 12, "dpmpp-2m": 10}
# FD against the reference, relative to the largest latent: measured ~7e-7 (ONNX Runtime vs torch, fp32); the
# nearest wrong variant (noise injection at tau 500, SD's) is off by 1e-4
TOLERANCE = 5e-6


@pytest.fixture(scope="module")
def comps():
    return family_generating("tiny-dit")()  # the same seeded weights the build uses


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("dit") / "tiny-dit"
    return build(BuildOptions(model="tiny-dit", max_batch_size=2, max_window=6, out=str(out)), log=lambda *_: None)


@pytest.fixture(scope="module")
def pipe(folder):
    return FasterDiffusionPipeline(folder, threads=1)


def initial_latents(pipe, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *pipe.latent_shape_at(None, None)), dtype=np.float32)


# --- the split ---------------------------------------------------------------------------------------

def _halves(comps, split=None):
    import dataclasses
    family, comps = FAMILIES["dit"], dataclasses.replace(comps, options=dict(comps.options))  # the fixture's stay
    family.set_split_block(comps, split)
    return family.denoiser_halves(comps, torch.float32)


@pytest.mark.parametrize("split", [None, 1, 5])
def test_split_equals_the_full_forward(comps, split):
    encoder, decoder = _halves(comps, split)
    sample, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1.0, 300, 640, 999])
    labels = torch.tensor([0, 207, 999, 1000])  # 1000: the null class
    with torch.no_grad():
        full = comps.transformer(sample, timestep=t, class_labels=labels).sample
        (tokens,) = encoder(sample, t, labels)
        ours = decoder(t, labels, tokens)
    assert ours.shape == (4, 4, 8, 8) and full.shape == (4, 8, 8, 8)  # learned sigma: epsilon channels only
    assert (ours - full[:, :4]).abs().max() <= 1e-5 * full[:, :4].abs().max()


def test_one_decoder_call_over_k_timesteps_equals_k_calls(comps):
    encoder, decoder = _halves(comps)
    sample, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1000, 3])
    timesteps = [901.0, 801.0, 701.0]
    with torch.no_grad():
        (tokens,) = encoder(sample, torch.full((2,), 901.0), labels)
        batched = decoder(torch.tensor(timesteps).repeat_interleave(2), labels.repeat(3), tokens.repeat(3, 1, 1))
        single = [decoder(torch.full((2,), t), labels, tokens) for t in timesteps]
    for k, one in enumerate(single):
        assert (batched[2 * k:2 * k + 2] - one).abs().max() <= 1e-5 * one.abs().max()
    assert (single[0] - single[2]).abs().max() > 1e-2 * single[0].abs().max()  # each row's own timestep matters


def test_folder_records_the_dit_family(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["family"] == "dit" and manifest["tokenizers"] == []
    assert manifest["family_options"]["split_block"] == 4 and manifest["family_options"]["num_classes"] == 1000
    assert manifest["family_options"]["id2label"]["207"] == "golden retriever"
    assert set(manifest["components"]) == {"denoiser_encoder", "denoiser_decoder", "vae_decoder"}
    decoder = manifest["components"]["denoiser_decoder"]
    assert [t["name"] for t in decoder["inputs"]] == ["timestep", "class_labels", "tokens"]
    assert decoder["inputs"][1]["range"] == [0, 1000] and decoder["inputs"][2]["shape"] == ["batch", 16, 32]
    flops = manifest["flops_per_sample"]
    assert flops["denoiser_encoder"] > flops["denoiser_decoder"] > 0  # 4 blocks + patch embed vs 2 + final layer


def test_export_draws_integers_from_the_record_range():
    from fd.builder.export import random_inputs
    spec = {"inputs": [{"name": "class_labels", "dtype": "int64", "shape": ["batch"], "axes": ["batch"],
                        "range": [0, 3]}]}
    drawn = random_inputs(spec, 400, np.random.default_rng(0), vocab_size=None)["class_labels"]
    assert set(drawn.tolist()) == {0, 1, 2, 3}  # inclusive: the null class is drawn too


# --- baseline against diffusers' DiTPipeline ---------------------------------------------------------

@contextmanager
def dit_pipeline_noise(latents: np.ndarray):
    """DiTPipeline draws its own noise (no `latents` argument): hand it ours."""
    from diffusers.pipelines.dit import pipeline_dit
    original = pipeline_dit.randn_tensor
    pipeline_dit.randn_tensor = lambda shape, **_: torch.from_numpy(latents.copy()).reshape(shape)
    try:
        yield
    finally:
        pipeline_dit.randn_tensor = original


def diffusers_generate(comps, scheduler: str, steps: int, latents, guidance_scale: float):
    """diffusers' DiTPipeline: the final latents (what its VAE decodes) and its uint8 image."""
    pipe = FAMILIES["dit"].diffusers_pipeline(comps, fd_reference.make_scheduler(scheduler, comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    decoded = {}
    decode = pipe.vae.decode

    def keep(latent, *args, **kwargs):
        decoded["latents"] = latent * pipe.vae.config.scaling_factor
        return decode(latent, *args, **kwargs)
    pipe.vae.decode = keep
    try:
        with torch.no_grad(), dit_pipeline_noise(latents):
            out = pipe(pipe.get_label_ids(["tiger shark", "golden retriever"]), guidance_scale=guidance_scale,
                       num_inference_steps=steps, output_type="np")
    finally:
        del pipe.vae.decode
    return decoded["latents"].numpy(), (out.images * 255).round().astype(np.int16)


@pytest.mark.parametrize("guidance", [4.0, 1.0])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_baseline_equals_the_diffusers_pipeline(pipe, comps, scheduler, guidance):
    steps, latents = STEPS[scheduler], initial_latents(pipe)
    ours = pipe(LABELS, steps=steps, scheduler=scheduler, guidance_scale=guidance, latents=latents,
                policy=FasterDiffusionPolicy.baseline(steps))
    want_latents, want_pixels = diffusers_generate(comps, scheduler, steps, latents, guidance)
    assert_equals_diffusers(ours, want_latents, want_pixels)
    assert not np.allclose(ours.latents[0], ours.latents[1])  # two classes, two images


def test_defaults_are_ditpipelines(pipe):
    """No guidance scale given: DiTPipeline's 4.0; the default policy injects noise below tau 300."""
    latents = initial_latents(pipe, batch=1)
    default = pipe(LABELS[:1], steps=6, latents=latents, policy=FasterDiffusionPolicy.baseline(6))
    explicit = pipe(LABELS[:1], steps=6, latents=latents, guidance_scale=4.0, policy=FasterDiffusionPolicy.baseline(6))
    other = pipe(LABELS[:1], steps=6, latents=latents, guidance_scale=7.5, policy=FasterDiffusionPolicy.baseline(6))
    np.testing.assert_array_equal(default.latents, explicit.latents)
    assert np.abs(default.latents - other.latents).max() > 1e-3
    assert pipe.prepare(Request(class_labels=[3], steps=50)).policy.noise_injection.tau == 300


# --- FasterDiffusion against an independent reference ------------------------------------------------

def reference_encode(transformer, sample, t, labels, cache_block: int):
    """The tokens after block `cache_block` of diffusers' own full forward (a hook reads them)."""
    caught = {}
    hook = transformer.transformer_blocks[cache_block].register_forward_hook(
        lambda _m, _i, out: caught.setdefault("tokens", out))
    try:
        transformer(sample, timestep=t, class_labels=labels)
    finally:
        hook.remove()
    return caught["tokens"]


def reference_decode(transformer, tokens, t, labels, split: int, latent_shape):
    """diffusers' own forward with block split-1's output replaced by the cached tokens (a hook returns them):
    blocks split…L-1, its final layer, its unpatchify, at timesteps `t`; the epsilon channels, which DiTPipeline
    steps on. The blocks before the split run on a blank latent and are thrown away."""
    hook = transformer.transformer_blocks[split - 1].register_forward_hook(lambda _m, _i, _out: tokens)
    try:
        out = transformer(torch.zeros(len(tokens), *latent_shape), timestep=t, class_labels=labels).sample
    finally:
        hook.remove()
    return out[:, :latent_shape[0]]


def reference_dit_fd(comps, class_ids, latents, scheduler_name, steps, guidance_scale, key_steps, split,
                     noise_injection=None, decode_with_key_timestep=False, cache_block_offset=0):
    """FasterDiffusion on a DiT, one decoder call per step (no batching), diffusers' scheduler and modules.

    Wrong variants for the tests: `decode_with_key_timestep` decodes every step of a window with its key step's
    timestep; `cache_block_offset` takes the cache one block off the split."""
    transformer, scheduler = comps.transformer, fd_reference.make_scheduler(scheduler_name, comps.scheduler_config)
    guided, null = guidance_scale > 1.0, transformer.config.num_embeds_ada_norm
    labels = torch.tensor(([null] * len(class_ids) if guided else []) + list(class_ids))
    noise = torch.from_numpy(np.asarray(latents, np.float32))
    z = noise * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if i in set(key_steps) | {0}:
                t_key = t
                sample = scheduler.scale_model_input(torch.cat([z, z]) if guided else z, t)
                tokens = reference_encode(transformer, sample, torch.full((len(labels),), float(t)), labels,
                                          split - 1 + cache_block_offset)
            t_decode = t_key if decode_with_key_timestep else t
            eps = reference_decode(transformer, tokens, torch.full((len(labels),), float(t_decode)), labels, split,
                                   tuple(z.shape[1:]))
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            if noise_injection is not None and t < noise_injection[1]:
                z = z + noise_injection[0] * noise
            z = scheduler.step(eps, t, z, return_dict=False)[0]
    return z.numpy()


@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("dpmpp-2m", 20)])
def test_fasterdiffusion_equals_the_reference(pipe, comps, scheduler, steps):
    latents = initial_latents(pipe)
    ours = pipe(LABELS, steps=steps, scheduler=scheduler, latents=latents)
    keys = default_key_steps(steps)
    assert ours.policy["key_steps"] == list(keys) and ours.policy["noise_injection"]["tau"] == 300
    split = pipe.manifest["family_options"]["split_block"]
    want = reference_dit_fd(comps, CLASS_IDS, latents, scheduler, steps, 4.0, keys, split, noise_injection=(0.003, 300))
    assert relative_error(ours.latents, want) <= TOLERANCE
    # the FD path differs from plain sampling, and each wrong variant from the right one, by far more
    plain = reference_dit_fd(comps, CLASS_IDS, latents, scheduler, steps, 4.0, range(steps), split)
    assert relative_error(plain, want) > 10 * TOLERANCE
    for wrong in ({"decode_with_key_timestep": True}, {"cache_block_offset": -1}, {"cache_block_offset": 1},
                  {"noise_injection": (0.003, 500)}):
        variant = reference_dit_fd(comps, CLASS_IDS, latents, scheduler, steps, 4.0, keys, split,
                                   **{"noise_injection": (0.003, 300), **wrong})
        assert relative_error(ours.latents, variant) > 10 * TOLERANCE, wrong


def test_fasterdiffusion_without_guidance_equals_the_reference(pipe, comps):
    latents = initial_latents(pipe)
    ours = pipe(LABELS, steps=20, guidance_scale=1.0, latents=latents)
    split = pipe.manifest["family_options"]["split_block"]
    want = reference_dit_fd(comps, CLASS_IDS, latents, "ddim", 20, 1.0, default_key_steps(20), split,
                            noise_injection=(0.003, 300))
    assert relative_error(ours.latents, want) <= TOLERANCE
    assert ours.calls["denoiser_encoder"] == len(default_key_steps(20))


# --- schedulers with a learned-sigma config ----------------------------------------------------------

def test_dpm_solver_steps_on_the_noise_of_a_learned_variance_config(comps):
    """variance_type learned_range (a learned-sigma model's config) changes nothing: fd's decoder returns only
    the noise, which is what diffusers' solver keeps of a learned-variance output."""
    import diffusers
    from fd.runtime.schedulers import make_scheduler
    config = {**comps.scheduler_config, "variance_type": "learned_range"}
    ours = make_scheduler("dpmpp-2m", config)
    want = diffusers.DPMSolverMultistepScheduler.from_config(comps.scheduler_config)  # variance_type None
    ours.set_timesteps(10), want.set_timesteps(10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    y = torch.from_numpy(x)
    for t in want.timesteps:
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        x = ours.step(eps, int(t), x)
        y = want.step(torch.from_numpy(eps), t, y, return_dict=False)[0]
    assert np.abs(x - y.numpy()).max() <= 1e-5 * np.abs(y.numpy()).max()


def test_ddpm_refuses_a_learned_variance_in_one_line(comps):
    """DiT's decoder returns the noise alone, so the DiT family refuses a DDPM that steps with the predicted
    variance (IF's decoder returns it, and its family accepts it: tests/test_if.py)."""
    from fd.runtime.errors import FdError
    from fd.runtime.families import FAMILIES as RUNTIME_FAMILIES
    from fd.runtime.schedulers import make_scheduler
    sampler = make_scheduler("ddpm", {**comps.scheduler_config, "variance_type": "learned_range"})
    with pytest.raises(FdError, match="predicted variance, which fd's denoiser") as caught:
        RUNTIME_FAMILIES["dit"].check_scheduler(sampler)
    assert "\n" not in str(caught.value)


# --- local folders -----------------------------------------------------------------------------------

def test_a_saved_dit_folder_builds_like_tiny_dit(comps, folder, tmp_path):
    """A DiTPipeline folder (model_index.json with its id2label) is found, loaded and built as tiny-dit."""
    from fd.builder.build import BuildOptions, build
    from fd.builder.families import save_pipeline_folder
    save_pipeline_folder(comps, str(tmp_path / "model"))
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["id2label"]["207"] == "golden retriever"
    out = build(BuildOptions(model=str(tmp_path / "model"), out=str(tmp_path / "engine")), log=lambda *_: None)
    local = json.loads((out / "manifest.json").read_text())
    generated = json.loads((folder / "manifest.json").read_text())
    assert local["family"] == "dit" and local["source"]["kind"] == "local"
    assert local["source"]["weights_sha256"] == generated["source"]["weights_sha256"]
    assert local["family_options"] == generated["family_options"]
    assert local["scheduler_config"]["_class_name"] == "DDIMScheduler"


# --- bad input: one line each ------------------------------------------------------------------------

def test_class_labels_resolve_as_ditpipeline_names_them(pipe):
    from fd.runtime.families.dit import class_id
    options = pipe.manifest["family_options"]
    assert [class_id(label, options) for label in (3, "3", "tabby", "Tabby Cat", "white shark", "volcano")] == \
        [3, 3, 281, 281, 2, 980]


@pytest.mark.parametrize("args,fragment", [
    (["--class-label", "zebra"], "unknown class label 'zebra': give a class id 0 to 999 or a name from the model's id2label"),
    (["--class-label", "1000"], "class label 1000 is out of range: this model has classes 0 to 999"),
    (["--class-label", "3", "--negative-prompt", "blurry"], "takes no negative prompt"),
    (["--prompt", "a cat"], "class-conditional dit model: give --class-label"),
    (["--prompt", "a cat", "--class-label", "3"], "not both"),
])
def test_bad_dit_runs_are_one_line(folder, tmp_path, args, fragment):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folder), "--steps", "2", "--out", str(tmp_path / "x.png"), *args)
    assert_one_line_error(done, fragment)
    assert not (tmp_path / "x.png").exists()


def test_class_label_on_a_text_folder_is_one_line(tiny_engine, tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine), "--class-label", "3", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(done, "--class-label is for class-conditional models (DiT)", "give --prompt")


@pytest.mark.parametrize("split", ["6", "0"])
def test_split_block_out_of_range_is_one_line(tmp_path, split):
    done = run_fd("fd.builder.cli", "--model", "tiny-dit", "--split-block", split, "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, f"--split-block {split}")
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


def test_python_api_refuses_a_negative_prompt_on_dit(pipe):
    from fd.runtime.errors import FdError
    with pytest.raises(FdError, match="class-conditional and takes no negative prompt"):
        pipe([3], steps=2, negative_prompt="blurry")
