"""SD3 / SD3.5 end to end on ONNX Runtime: the split, diffusers' StableDiffusion3Pipeline, and an independent reference.

`tiny-sd3` has SD3.5's structure (CLIP-L, CLIP-G and T5; RMS qk-norm; a dual-attention block; a 16-channel VAE
with a shift factor; flow-matching Euler with shift 3):

- the split (fp32): encoder → decoder equals SD3Transformer2DModel's forward within 1e-5 (a non-square latent);
  one decoder call over k timesteps equals k calls;
- --no-fd equals StableDiffusion3Pipeline (same components, scheduler, guidance 7.0, latents): latents within
  1e-3 relative, pixels within 2/255;
- FasterDiffusion equals `reference_fd`, written here on diffusers' own transformer forward with hooks at block S
  (not fd's halves nor its runtime), including prior noise injection in the flow frame, and wrong variants of
  the method miss it by far more than the tolerance.
"""
import json

import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES, family_generating
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from fd.runtime.schedulers import diffusers_scheduler
from tests.compare import assert_equals_diffusers, assert_one_decoder_call_equals_k_calls, relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a painting of a cat"]
GUIDANCE = 7.0  # StableDiffusion3Pipeline's default, and fd's for this family
SPLIT = 4  # 18/28 of 6 blocks
# fd's flow-frame injection (runtime/families/flow.py): α = 0.003 at flow timesteps s·1000 < 500, scaled by
# sqrt((1 − s)² + s²) = 1 / (a + b)
INJECTION = (0.003, 500)
# fd (ONNX Runtime, fp32) against the torch reference, max |Δ| relative to the largest value. Measured: 6e-7
# (28 steps); the wrong variants below move it by 3e-3 or more (the least: injection without the flow scale).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def comps():
    return family_generating("tiny-sd3")()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    return build(BuildOptions(model="tiny-sd3", out=str(out), max_batch_size=2, max_window=10), log=lambda *_: None)


@pytest.fixture(scope="module")
def pipe(folder):
    return FasterDiffusionPipeline(folder, threads=1)


def initial_latents(pipe, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *pipe.latent_shape_at(None, None)), dtype=np.float32)


# --- the split -----------------------------------------------------------------------------------------

def test_split_equals_the_transformer_forward(comps):
    family = FAMILIES["sd3"]
    family.set_split_block(comps, None)
    encoder, decoder = family.denoiser_halves(comps, torch.float32)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(3, 16, 16, 8, generator=generator)  # not square
    timesteps = torch.tensor([1000.0, 500.0, 3.0])
    text = torch.randn(3, 77 + 256, comps.transformer.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(3, comps.transformer.config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        tokens, context = encoder(sample, timesteps, text, pooled)
        split = decoder(timesteps, pooled, tokens, context)
        full = comps.transformer(sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=timesteps,
                                 return_dict=False)[0]
    assert tokens.shape[1:3] == (8, 4) and context.shape[1] == 77 + 256
    assert relative_error(split.numpy(), full.numpy()) <= 1e-5
    # each half really matters: another timestep in the decoder alone changes the output
    with torch.no_grad():
        other = decoder(timesteps.flip(0), pooled, tokens, context)
    assert relative_error(other.numpy(), full.numpy()) > 1e-2


def test_one_decoder_call_over_k_timesteps_equals_k_calls(pipe):
    """The engine's decoder, as the runtime lays out a window (step-major), against one call per step."""
    from fd.runtime import stages
    from fd.runtime.families import PromptRequest
    height, width = pipe.image_size(None, None)
    conds = pipe.family.encode_prompt(pipe.runner, pipe.tokenizers, PromptRequest(PROMPTS[:1], None, True, height,
                                                                                  width), {})
    latents = np.concatenate([initial_latents(pipe, batch=1)] * 2)
    cache = stages.encode_denoiser(pipe.runner, latents, 1000.0, conds)
    timesteps = np.float32([947.5, 882.8, 800.8, 693.8])
    assert_one_decoder_call_equals_k_calls(pipe.runner, cache, timesteps, conds)


def test_manifest_records_the_split_and_both_streams(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["family"] == "sd3" and manifest["family_options"] == {"split_block": SPLIT}
    assert manifest["cache"] == ["tokens", "context"] and manifest["latent_channels"] == 16
    assert [t["max_length"] for t in manifest["tokenizers"]] == [77, 77, 256]
    specs = manifest["components"]
    assert [t["name"] for t in specs["denoiser_decoder"]["inputs"]] == [
        "timestep", "pooled_projections", "tokens", "context"]  # not the text embeddings: the context is cached
    assert specs["denoiser_decoder"]["inputs"][-2]["shape"] == ["batch", 8, 8, 32]
    assert specs["denoiser_decoder"]["inputs"][-1]["shape"] == ["batch", 77 + 256, 32]


# --- against diffusers' StableDiffusion3Pipeline -------------------------------------------------------

def diffusers_generate(comps, steps, latents, negative, prompts=PROMPTS, guidance=GUIDANCE):
    """StableDiffusion3Pipeline's final latents and uint8 image."""
    pipe = FAMILIES["sd3"].diffusers_pipeline(comps, diffusers_scheduler("flow-euler", comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs
    with torch.no_grad():
        out = pipe(prompts, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps,
                   latents=torch.from_numpy(latents), output_type="np", callback_on_step_end=keep)
    return final["latents"].numpy(), (out.images * 255).round().astype(np.int16)


@pytest.mark.parametrize("negative,guidance", [(None, None), ("blurry, low quality", None), (None, 1.0)],
                         ids=["default", "negative", "unguided"])
def test_baseline_equals_the_diffusers_pipeline(pipe, comps, negative, guidance):
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, negative_prompt=negative, steps=6, latents=latents, guidance_scale=guidance,
                policy=FasterDiffusionPolicy.baseline(6))  # scheduler: fd's default, which means flow-euler here
    want_latents, want_pixels = diffusers_generate(comps, 6, latents, negative,
                                                   guidance=GUIDANCE if guidance is None else guidance)
    assert_equals_diffusers(ours, want_latents, want_pixels)
    assert ours.rows["text_encoder_3"] == (2 if guidance == 1.0 else 4)
    assert not np.allclose(ours.latents[0], ours.latents[1])  # two prompts, two images


# --- FasterDiffusion against an independent reference ------------------------------------------------

def forward_capturing(transformer, split, sample, timesteps, kwargs):
    """diffusers' own forward, keeping both streams leaving block split-1 (the encoder half's cache)."""
    captured = {}
    hook = transformer.transformer_blocks[split - 1].register_forward_hook(
        lambda module, args, output: captured.update(context=output[0], tokens=output[1]))
    try:
        transformer(sample, timestep=timesteps, **kwargs, return_dict=False)
    finally:
        hook.remove()
    return captured


def forward_from_cache(transformer, split, cache, sample_shape, timesteps, kwargs):
    """diffusers' own forward with block `split`'s two inputs replaced by the cached streams (the decoder half):
    the blocks before it run on zeros and are discarded, so nothing of the current latent is read."""
    def replace(module, args, module_kwargs):
        return args, dict(module_kwargs, hidden_states=cache["tokens"], encoder_hidden_states=cache["context"])
    hook = transformer.transformer_blocks[split].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        return transformer(torch.zeros(sample_shape), timestep=timesteps, **kwargs, return_dict=False)[0]
    finally:
        hook.remove()


def flow_injection_scale(s: float) -> float:
    """1 / (a + b) for the VP coefficients a, b (a² + b² = 1) of flow level s = b / (a + b): METHOD.md's
    α·ε_T·sqrt((1−s)² + s²), derived again here from a and b."""
    norm = np.hypot(1 - s, s)
    a, b = (1 - s) / norm, s / norm
    return 1.0 / (a + b)


def reference_fd(comps, prompts, negative, latents, steps, key_steps, split=SPLIT, noise_injection=INJECTION,
                 decode_with_key_timestep=False, flow_scale=True, guidance_interval=None):
    """FasterDiffusion in its plainest form on diffusers' SD3 transformer and flow scheduler: the encoder half at
    key steps, every step decoded from the latest cache with its own timestep (one call per step), guidance, then
    z ← z + α·ε/(a+b) before each step whose timestep is below τ, then the scheduler's step."""
    scheduler = diffusers_scheduler("flow-euler", comps.scheduler_config)
    pipe = FAMILIES["sd3"].diffusers_pipeline(comps, scheduler)
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            list(prompts), None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative)
    kwargs = {"encoder_hidden_states": torch.cat([negative_embeds, embeds]),
              "pooled_projections": torch.cat([negative_pooled, pooled])}
    transformer = comps.transformer
    noise = torch.from_numpy(latents)
    z = noise.clone()
    scheduler.set_timesteps(steps)
    keys = set(key_steps) | {0}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([z, z])
            if i in keys:
                t_key = t
                cache = forward_capturing(transformer, split, rows, t.repeat(len(rows)), kwargs)
            t_decode = t_key if decode_with_key_timestep else t
            prediction = forward_from_cache(transformer, split, cache, rows.shape, t_decode.repeat(len(rows)), kwargs)
            uncond, cond = prediction.chunk(2)
            s = float(scheduler.sigmas[i])
            vp_sigma = s / (1 - s) if s < 1 else float("inf")  # b / a
            guided = guidance_interval is None or guidance_interval[0] < vp_sigma <= guidance_interval[1]
            prediction = uncond + GUIDANCE * (cond - uncond) if guided else cond
            if noise_injection is not None and t < noise_injection[1]:
                scale = flow_injection_scale(float(scheduler.sigmas[i])) if flow_scale else 1.0
                z = z + noise_injection[0] * scale * noise
            z = scheduler.step(prediction, t, z, return_dict=False)[0]
    return z.numpy()


_references = {}


def reference(comps, latents, steps, **variant):
    options = dict(key_steps=default_key_steps(steps))
    options.update(variant)
    key = (latents.tobytes(), steps, repr(sorted(options.items())))
    if key not in _references:
        _references[key] = reference_fd(comps, PROMPTS, None, latents, steps, **options)
    return _references[key]


def test_reference_with_every_step_a_key_step_equals_diffusers(pipe, comps):
    """The reference itself: every step a key step and no injection is plain sampling, i.e. the pipeline."""
    latents = initial_latents(pipe)
    ref = reference(comps, latents, 6, key_steps=range(6), noise_injection=None)
    want, _ = diffusers_generate(comps, 6, latents, None)
    assert relative_error(ref, want) <= 1e-5


def test_fasterdiffusion_equals_the_reference(pipe, comps):
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, steps=28, latents=latents)  # SD3's 28 steps, the paper's key steps below 28
    assert ours.policy["key_steps"] == list(default_key_steps(28)) == [0, 1, 2, 3, 5, 10, 15, 25]
    assert ours.policy["noise_injection"] == {"alpha": INJECTION[0], "tau": INJECTION[1]}
    assert ours.calls["denoiser_encoder"] == 8
    assert relative_error(ours.latents, reference(comps, latents, 28)) <= TOLERANCE


def test_guidance_interval_is_in_the_vp_frames_sigma(pipe, comps):
    """--guidance-interval on a flow model: guidance at the steps whose s / (1 − s) lies in (low, high], the
    conditional prediction alone elsewhere, as the reference; (0.5, 3] leaves both ends of 10 steps unguided."""
    latents = initial_latents(pipe)
    interval = (0.5, 3.0)
    ours = pipe(PROMPTS, steps=10, latents=latents, policy=FasterDiffusionPolicy.baseline(10, interval))
    want = reference_fd(comps, PROMPTS, None, latents, 10, range(10), noise_injection=None, guidance_interval=interval)
    assert relative_error(ours.latents, want) <= TOLERANCE
    assert ours.rows["denoiser_decoder"] < 2 * 2 * 10  # some steps decoded the conditional rows alone
    everywhere = reference_fd(comps, PROMPTS, None, latents, 10, range(10), noise_injection=None)
    assert relative_error(everywhere, want) > 10 * TOLERANCE


def test_injection_fires_where_the_flow_timestep_is_below_tau(pipe):
    """The steps counted as t < τ: the shifted flow timestep s·1000 below 500, the last ones (here 7 of 28)."""
    from fd.runtime.schedulers import make_scheduler
    sampler = make_scheduler("flow-euler", pipe.manifest["scheduler_config"])
    sampler.set_timesteps(28)
    fired = [i for i, t in enumerate(sampler.timesteps) if t < INJECTION[1]]
    assert fired == list(range(21, 28))
    assert all(sampler.sigmas[i] < 0.5 for i in fired) and sampler.sigmas[20] >= 0.5


def test_wrong_fd_variants_are_far_outside_the_tolerance(pipe, comps):
    """Each mistake a runtime could make moves the result by more than 10x the tolerance."""
    latents = initial_latents(pipe)
    right = reference(comps, latents, 28)
    shifted = tuple(k + 1 if k else k for k in default_key_steps(28))
    wrong = {
        "key steps shifted by one": dict(key_steps=shifted),
        "decoder given the key step's timestep": dict(decode_with_key_timestep=True),
        "no noise injection": dict(noise_injection=None),
        "injection without the flow frame's scale": dict(flow_scale=False),
        "injection at every step (tau 1001)": dict(noise_injection=(INJECTION[0], 1001)),
        "every step a key step": dict(key_steps=tuple(range(28))),
        "split one block later": dict(split=SPLIT + 1),
    }
    for mistake, variant in wrong.items():
        error = relative_error(reference(comps, latents, 28, **variant), right)
        assert error > 10 * TOLERANCE, (mistake, error)


# --- schedulers, CLI and bad input ------------------------------------------------------------------

def test_a_diffusion_scheduler_is_refused_in_one_line(pipe):
    with pytest.raises(FdError, match="--scheduler dpmpp-2m cannot run a flow-matching model"):
        pipe(PROMPTS[:1], steps=2, scheduler="dpmpp-2m")


def test_cli_runs_and_refuses_in_one_line(folder, tmp_path):
    from tests.conftest import run_fd
    from tests.test_cli_errors import assert_one_line_error
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folder), "--prompt", "a cat", "--steps", "4",
                  "--out", str(tmp_path / "cat.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cat.png").is_file()
    done = run_fd("fd.builder.cli", "--model", "tiny-sd3", "--split-block", "6", "--out", str(tmp_path / "x"))
    assert_one_line_error(done, "--split-block 6 does not fit this 6-block transformer: use 1 to 5")
    assert not (tmp_path / "x").exists()


def test_default_split_is_the_measured_flop_split():
    """The default S gives the decoder the FLOP share closest to DiT-XL/2's at the paper's block (35.7%): on
    SD3.5-medium's real config, whose first 13 blocks (dual attention) cost 1.5x the others, that is block 13
    (decoder 36.2%), not the block count's 15 (29.6%); counted on the meta device, no weights."""
    from fd.builder.families.flow import block_flops
    from fd.builder.families.transformer import default_split_block
    with torch.device("meta"):
        comps = family_generating("sd3.5-medium-random")()
    family = FAMILIES["sd3"]
    before, blocks, after = block_flops(family, comps)
    assert len(blocks) == 24 and blocks[0] > 1.4 * blocks[13]
    split = family.default_split(comps)
    share = (sum(blocks[split:]) + after) / (before + sum(blocks) + after)
    assert split == 13 and default_split_block(24) == 15 and abs(share - 0.357) < 0.01
