"""FLUX.1 end to end on ONNX Runtime: the split, diffusers' FluxPipeline, and an independent reference.

`tiny-flux` has FLUX.1-dev's structure (2 double-stream + 4 single-stream blocks, guidance embedding, rotary
embeddings, 16 latent channels packed 2x2, dynamically shifted flow Euler); `tiny-flux-schnell` has no guidance
embedding and an unshifted schedule.

- the split (fp32), at the default block (inside the single-stream blocks) and at the double/single boundary:
  encoder → decoder equals FluxTransformer2DModel's forward within 1e-5; one decoder call over k timesteps
  equals k calls;
- --no-fd equals FluxPipeline (same components, scheduler, guidance 3.5, latents packed as the pipeline takes
  them): latents within 1e-3 relative, pixels within 2/255;
- FasterDiffusion equals `reference_fd`, written here on diffusers' own transformer forward with hooks at block S
  in execution order, and wrong variants of the method miss it by far more than the tolerance.
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
GUIDANCE = 3.5  # FluxPipeline's default (embedded guidance), and fd's for this family
SPLIT = 4  # 18/28 of 6 blocks: double 0-1, single 0-1 in the encoder
INJECTION = (0.003, 500)  # fd's flow-frame injection (runtime/families/flow.py)
# fd (ONNX Runtime, fp32) against the torch reference, max |Δ| relative to the largest value. Measured: 1.7e-7
# (dev, 28 steps) and 1.1e-7 (schnell); the wrong variants below move it by 3.7e-3 or more (the least: the split
# two blocks earlier, at the double/single boundary).
TOLERANCE = 1e-5
MODELS = ("tiny-flux", "tiny-flux-schnell")


@pytest.fixture(scope="module")
def components():
    return {model: family_generating(model)() for model in MODELS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("flux")
    return {model: build(BuildOptions(model=model, out=str(root / model), max_batch_size=2, max_window=10),
                         log=lambda *_: None) for model in MODELS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {model: FasterDiffusionPipeline(folder, threads=1) for model, folder in folders.items()}


def initial_latents(pipe, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *pipe.latent_shape_at(None, None)), dtype=np.float32)


def diffusers_pipe(comps):
    pipe = FAMILIES["flux"].diffusers_pipeline(comps, diffusers_scheduler("flow-euler", comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forward_kwargs(comps, prompts, height, width):
    """FluxPipeline's transformer arguments besides the latents and the timestep."""
    pipe = diffusers_pipe(comps)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(list(prompts), None, device="cpu",
                                                      max_sequence_length=comps.tokenizer_2.model_max_length)
    kwargs = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
              "img_ids": pipe._prepare_latent_image_ids(len(prompts), height // 16, width // 16, "cpu", torch.float32)}
    if comps.transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.full([len(prompts)], GUIDANCE, dtype=torch.float32)
    return kwargs


# --- the split -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [SPLIT, 2])  # inside the single-stream blocks; at the double/single boundary
@pytest.mark.parametrize("model", MODELS)
def test_split_equals_the_transformer_forward(components, model, split):
    comps = components[model]
    family = FAMILIES["flux"]
    family.set_split_block(comps, split)
    encoder, decoder = family.denoiser_halves(comps, torch.float32)
    for half in (encoder, decoder):
        half.set_grid(comps.transformer, comps.tokenizer_2.model_max_length, (8, 4))  # a 16 x 8 latent
    pipe = diffusers_pipe(comps)
    sample = torch.randn(2, 16, 16, 8, generator=torch.Generator().manual_seed(1))  # not square
    timesteps = torch.tensor([1000.0, 3.0])
    kwargs = forward_kwargs(comps, PROMPTS, 16 * 8, 8 * 8)
    guidance = [kwargs["guidance"]] if "guidance" in kwargs else []
    with torch.no_grad():
        tokens, context = encoder(sample, timesteps, *guidance, kwargs["encoder_hidden_states"],
                                  kwargs["pooled_projections"])
        split_out = decoder(timesteps, *guidance, kwargs["pooled_projections"], tokens, context)
        full = comps.transformer(pipe._pack_latents(sample, 2, 16, 16, 8), timestep=timesteps / 1000, **kwargs,
                                 return_dict=False)[0]
    assert tokens.shape[1:3] == (8, 4)
    assert relative_error(split_out.numpy(), pipe._unpack_latents(full, 128, 64, 8).numpy()) <= 1e-5
    family.set_split_block(comps, None)


def test_one_decoder_call_over_k_timesteps_equals_k_calls(pipes):
    from fd.runtime import stages
    from fd.runtime.families import PromptRequest
    pipe = pipes["tiny-flux"]
    height, width = pipe.image_size(None, None)
    conds = pipe.family.encode_prompt(pipe.runner, pipe.tokenizers,
                                      PromptRequest(PROMPTS[:1], None, False, height, width, guidance_scale=GUIDANCE), {})
    cache = stages.encode_denoiser(pipe.runner, initial_latents(pipe, batch=1), 1000.0, conds)
    timesteps = np.float32([947.5, 882.8, 800.8, 693.8])
    assert_one_decoder_call_equals_k_calls(pipe.runner, cache, timesteps, conds)


def test_manifest_records_the_split_both_streams_and_guidance(folders):
    dev, schnell = (json.loads((folders[m] / "manifest.json").read_text()) for m in MODELS)
    assert dev["family"] == "flux" and dev["family_options"] == {"split_block": SPLIT}
    assert dev["cache"] == ["tokens", "context"] and dev["latent_channels"] == 16
    assert [t["max_length"] for t in dev["tokenizers"]] == [77, 32]
    inputs = [t["name"] for t in dev["components"]["denoiser_decoder"]["inputs"]]
    assert inputs == ["timestep", "guidance", "pooled_projections", "tokens", "context"]
    assert dev["components"]["denoiser_encoder"]["inputs"][0]["shape"] == ["batch", 16, 16, 16]  # unpacked
    assert [t["name"] for t in schnell["components"]["denoiser_decoder"]["inputs"]] == [
        "timestep", "pooled_projections", "tokens", "context"]


# --- against diffusers' FluxPipeline ---------------------------------------------------------------

def diffusers_generate(comps, steps, latents, guidance=GUIDANCE):
    """FluxPipeline's final latents (unpacked to fd's layout) and uint8 image."""
    pipe = diffusers_pipe(comps)
    with torch.no_grad():
        images, final = FAMILIES["flux"].diffusers_call(pipe, PROMPTS, torch.from_numpy(latents), steps=steps,
                                                        guidance_scale=guidance, height=128, width=128)
    return final.numpy(), (images * 255).round().astype(np.int16)


@pytest.mark.parametrize("model,guidance", [("tiny-flux", None), ("tiny-flux", 6.0), ("tiny-flux-schnell", None)])
def test_baseline_equals_the_diffusers_pipeline(pipes, components, model, guidance):
    pipe = pipes[model]
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, steps=6, latents=latents, guidance_scale=guidance, policy=FasterDiffusionPolicy.baseline(6))
    want_latents, want_pixels = diffusers_generate(components[model], 6, latents,
                                                   GUIDANCE if guidance is None else guidance)
    assert_equals_diffusers(ours, want_latents, want_pixels)
    assert ours.rows["denoiser_decoder"] == 2 * 6  # no classifier-free guidance rows
    assert not np.allclose(ours.latents[0], ours.latents[1])


def test_the_guidance_embedding_acts(pipes):
    """FLUX.1-dev's guidance scale reaches the transformer (a runtime that dropped it would still run)."""
    pipe = pipes["tiny-flux"]
    latents = initial_latents(pipe, batch=1)
    low, high = (pipe(PROMPTS[:1], steps=3, latents=latents, guidance_scale=g).latents for g in (1.0, 6.0))
    assert relative_error(low, high) > 1e-3


# --- FasterDiffusion against an independent reference ------------------------------------------------

def execution_order(transformer):
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def reference_fd(comps, latents, steps, key_steps, split=SPLIT, noise_injection=INJECTION,
                 decode_with_key_timestep=False):
    """FasterDiffusion in its plainest form on diffusers' FLUX transformer and flow scheduler, in the pipeline's
    own packed layout: both streams captured leaving block split-1 at key steps; every step runs the forward with
    block `split`'s inputs replaced by them (the blocks before run on zeros, discarded) and its own timestep;
    z ← z + α·ε·sqrt((1−s)² + s²) before each step whose timestep is below τ; then the scheduler's step."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    pipe = diffusers_pipe(comps)
    scheduler, transformer = pipe.scheduler, comps.transformer
    rows = len(latents)
    kwargs = forward_kwargs(comps, PROMPTS, 128, 128)
    noise = pipe._pack_latents(torch.from_numpy(latents), rows, 16, 16, 16)
    config = scheduler.config
    mu = calculate_shift(noise.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    blocks, keys, cache = execution_order(transformer), set(key_steps) | {0}, {}
    z = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if i in keys:
                t_key = t
                hook = blocks[split - 1].register_forward_hook(
                    lambda module, args, output: cache.update(context=output[0], tokens=output[1]))
                try:
                    transformer(z, timestep=t.repeat(rows) / 1000, **kwargs, return_dict=False)
                finally:
                    hook.remove()
            t_decode = t_key if decode_with_key_timestep else t
            hook = blocks[split].register_forward_pre_hook(
                lambda module, args, module_kwargs: (args, dict(module_kwargs, hidden_states=cache["tokens"],
                                                                encoder_hidden_states=cache["context"])),
                with_kwargs=True)
            try:
                prediction = transformer(torch.zeros_like(z), timestep=t_decode.repeat(rows) / 1000, **kwargs,
                                         return_dict=False)[0]
            finally:
                hook.remove()
            if noise_injection is not None and t < noise_injection[1]:
                s = float(scheduler.sigmas[i])
                z = z + noise_injection[0] * float(np.hypot(1 - s, s)) * noise
            z = scheduler.step(prediction, t, z, return_dict=False)[0]
    return pipe._unpack_latents(z, 128, 128, 8).numpy()


_references = {}


def reference(comps, model, latents, steps, **variant):
    options = dict(key_steps=default_key_steps(steps))
    options.update(variant)
    key = (model, latents.tobytes(), steps, repr(sorted(options.items())))
    if key not in _references:
        _references[key] = reference_fd(comps, latents, steps, **options)
    return _references[key]


def test_reference_with_every_step_a_key_step_equals_diffusers(pipes, components):
    latents = initial_latents(pipes["tiny-flux"])
    ref = reference(components["tiny-flux"], "tiny-flux", latents, 6, key_steps=range(6), noise_injection=None)
    want, _ = diffusers_generate(components["tiny-flux"], 6, latents)
    assert relative_error(ref, want) <= 1e-5


@pytest.mark.parametrize("model", MODELS)
def test_fasterdiffusion_equals_the_reference(pipes, components, model):
    latents = initial_latents(pipes[model])
    ours = pipes[model](PROMPTS, steps=28, latents=latents)
    assert ours.policy["key_steps"] == list(default_key_steps(28))
    assert ours.policy["noise_injection"] == {"alpha": INJECTION[0], "tau": INJECTION[1]}
    assert relative_error(ours.latents, reference(components[model], model, latents, 28)) <= TOLERANCE


def test_wrong_fd_variants_are_far_outside_the_tolerance(pipes, components):
    comps = components["tiny-flux"]
    latents = initial_latents(pipes["tiny-flux"])
    right = reference(comps, "tiny-flux", latents, 28)
    wrong = {
        "key steps shifted by one": dict(key_steps=tuple(k + 1 if k else k for k in default_key_steps(28))),
        "decoder given the key step's timestep": dict(decode_with_key_timestep=True),
        "no noise injection": dict(noise_injection=None),
        "every step a key step": dict(key_steps=tuple(range(28))),
        "split one block earlier (double/single boundary)": dict(split=SPLIT - 2),
    }
    for mistake, variant in wrong.items():
        error = relative_error(reference(comps, "tiny-flux", latents, 28, **variant), right)
        assert error > 10 * TOLERANCE, (mistake, error)


# --- bad input -------------------------------------------------------------------------------------

def test_a_negative_prompt_is_refused_in_one_line(pipes):
    with pytest.raises(FdError, match="FLUX.1 takes no negative prompt"):
        pipes["tiny-flux"](PROMPTS[:1], negative_prompt="blurry", steps=2)


def test_cli_runs_and_refuses_in_one_line(folders, tmp_path):
    from tests.conftest import run_fd
    from tests.test_cli_errors import assert_one_line_error
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folders["tiny-flux"]), "--prompt", "a cat", "--steps", "4",
                  "--out", str(tmp_path / "cat.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cat.png").is_file()
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folders["tiny-flux"]), "--prompt", "a cat", "--steps", "4",
                  "--scheduler", "euler", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(done, "--scheduler euler cannot run a flow-matching model")
    assert not (tmp_path / "x.png").exists()
