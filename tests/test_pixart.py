"""PixArt-α end to end on ONNX Runtime: the split, diffusers' PixArtAlphaPipeline, and an independent reference.

Two generated models: `tiny-pixart` (the 512 models' layout: no added conditions, patch 2, 8x VAE, square)
and a "1024-style" one saved as a diffusers folder and built from it (transformer sample_size 128, so the
resolution / aspect-ratio conditions are on; patch 8 and a one-level VAE keep it small, 3 heads as those
conditions need a width divisible by 3; built 128 x 64, so a
swapped height and width or a transposed token grid would show).

- the split (fp32): encoder → decoder equals the transformer's forward within 1e-5; one decoder call over
  k timesteps equals k calls;
- --no-fd equals PixArtAlphaPipeline (same components, scheduler, guidance 4.5, latents; clean_caption=False,
  use_resolution_binning=False): latents within 1e-3 relative, pixels within 2/255;
- FasterDiffusion equals `reference_fd`, written here on diffusers' own transformer forward (not fd's halves
  nor its runtime), and wrong variants of the method are shown to miss it by far more than the tolerance.
"""
import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES, family_generating
from fd.builder.families.pixart import make_tiny_pixart_components
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from fd.runtime.schedulers import diffusers_scheduler
from tests.compare import assert_equals_diffusers, assert_one_decoder_call_equals_k_calls, relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

# Capitals and outer spaces: the pipeline lower-cases and strips (the tiny tokenizer has no capitals).
PROMPTS = ["A photo of an astronaut riding a horse on the moon ", "a painting of a cat"]
GUIDANCE = 4.5  # PixArtAlphaPipeline's default, and fd's for this family
STEPS = {"ddim": 12, "dpmpp-2m": 10}
INJECTION = (0.003, 300)  # fd's default for PixArt (the paper's DiT setting)
# fd (ONNX Runtime, fp32) against the torch reference, max |Δ| relative to the largest value, per scheduler.
# DPM-Solver++-20: measured 1e-6; the wrong variants below move it by 1.2e-4 (no noise injection) to 9e-3.
# DDIM-50 on PixArt's linear betas: measured 7.5e-5, which is float32 itself (the torch reference in float32
# against float64 differs by 4.8e-5, every step a key step): at t = 999 ᾱ is 4e-5, and DDIM's x0 estimate
# divides by its root (x160). The wrong variants move DDIM-50 by 0.19 or more.
TOLERANCE = {"dpmpp-2m": 1e-5, "ddim": 3e-4}


def make_1024_style(seed=0):
    return make_tiny_pixart_components(seed, sample_size=128, patch_size=8, vae_levels=1, heads=3)


@pytest.fixture(scope="module")
def components():
    return {"tiny-pixart": family_generating("tiny-pixart")(), "1024-style": make_1024_style()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, components):
    from fd.builder.build import BuildOptions, build
    from fd.builder.families import save_pipeline_folder
    root = tmp_path_factory.mktemp("pixart")
    model_folder = root / "model-1024-style"
    save_pipeline_folder(components["1024-style"], str(model_folder))
    quiet = dict(max_batch_size=2, max_window=6)
    return {"tiny-pixart": build(BuildOptions(model="tiny-pixart", out=str(root / "tiny"), **quiet), log=lambda *_: None),
            "1024-style": build(BuildOptions(model=str(model_folder), height=128, width=64, out=str(root / "ms"),
                                             **quiet), log=lambda *_: None)}


@pytest.fixture(scope="module")
def pipes(folders):
    return {model: FasterDiffusionPipeline(folder, threads=1) for model, folder in folders.items()}


def initial_latents(pipe, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *pipe.latent_shape_at(None, None)), dtype=np.float32)


# --- the split -----------------------------------------------------------------------------------------

def conditions(comps, rows, seed=0):
    """Random text embeddings, masks of different lengths, and the added conditions when the model has them."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(rows, 120, comps.text_encoder.config.d_model, generator=generator)
    mask = torch.zeros(rows, 120, dtype=torch.int64)
    for row in range(rows):
        mask[row, :5 + 7 * row] = 1
    added = []
    if comps.transformer.use_additional_conditions:
        added = [torch.tensor([[128.0, 64.0]]).repeat(rows, 1), torch.full((rows, 1), 2.0)]
    return text, mask, added


@pytest.mark.parametrize("model", ["tiny-pixart", "1024-style"])
def test_split_equals_the_transformer_forward(components, model):
    comps = components[model]
    family = FAMILIES["pixart"]
    family.set_split_block(comps, None)
    encoder, decoder = family.denoiser_halves(comps, torch.float32)
    side = comps.transformer.config.sample_size
    sample = torch.randn(3, 4, side, side // 2, generator=torch.Generator().manual_seed(1))  # not square
    timesteps = torch.tensor([999.0, 500.0, 3.0])
    text, mask, added = conditions(comps, 3)
    with torch.no_grad():
        (tokens,) = encoder(sample, timesteps, text, mask, *added)
        split = decoder(timesteps, text, mask, *added, tokens)
        added_kwargs = dict(zip(("resolution", "aspect_ratio"), added)) if added else None
        full = comps.transformer(sample, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timesteps,
                                 added_cond_kwargs=added_kwargs, return_dict=False)[0]
    assert full.shape[1] == 8 and split.shape == (3, 4, *sample.shape[-2:])  # learned sigma: noise channels kept
    assert relative_error(split.numpy(), full[:, :4].numpy()) <= 1e-5
    assert tokens.shape[1:3] == (side // comps.transformer.config.patch_size, side // 2 // comps.transformer.config.patch_size)


@pytest.mark.parametrize("model", ["tiny-pixart", "1024-style"])
def test_one_decoder_call_over_k_timesteps_equals_k_calls(pipes, model):
    """The engine's decoder, as the runtime lays out a window (step-major), against one call per step."""
    from fd.runtime import stages
    pipe = pipes[model]
    request_rows = 2  # one image, guided
    latents = np.concatenate([initial_latents(pipe, batch=1)] * request_rows)
    from fd.runtime.families import PromptRequest
    height, width = pipe.image_size(None, None)
    conds = pipe.family.encode_prompt(pipe.runner, pipe.tokenizers,
                                      PromptRequest(PROMPTS[:1], None, True, height, width), {})
    cache = stages.encode_denoiser(pipe.runner, latents, 999.0, conds)
    timesteps = np.float32([951, 901, 851, 801])
    assert_one_decoder_call_equals_k_calls(pipe.runner, cache, timesteps, conds)


def test_manifest_records_the_split_and_the_token_cache(folders):
    import json
    manifest = json.loads((folders["tiny-pixart"] / "manifest.json").read_text())
    assert manifest["family"] == "pixart" and manifest["family_options"] == {"split_block": 4}  # 18/28 of 6 blocks
    assert manifest["cache"] == ["tokens"] and manifest["tokenizers"][0]["max_length"] == 120
    specs = manifest["components"]
    assert [t["name"] for t in specs["denoiser_decoder"]["inputs"]] == [
        "timestep", "encoder_hidden_states", "encoder_attention_mask", "tokens"]
    assert specs["denoiser_decoder"]["inputs"][-1]["shape"] == ["batch", 8, 8, 32]
    ms = json.loads((folders["1024-style"] / "manifest.json").read_text())["components"]["denoiser_encoder"]
    assert [t["name"] for t in ms["inputs"]][-2:] == ["resolution", "aspect_ratio"]


def test_fp16_folder_runs_close_to_fp32(pipes, tmp_path):
    """fp16 engines (T5 computes in fp32 inside and hands fp16 embeddings over) stay near the fp32 ones."""
    import json
    from fd.builder.build import BuildOptions, build
    out = build(BuildOptions(model="tiny-pixart", precision="fp16", out=str(tmp_path / "fp16")), log=lambda *_: None)
    specs = json.loads((out / "manifest.json").read_text())["components"]
    assert specs["text_encoder"]["outputs"][0]["dtype"] == "float16" == specs["denoiser_decoder"]["outputs"][0]["dtype"]
    latents = initial_latents(pipes["tiny-pixart"], batch=1)
    half = FasterDiffusionPipeline(out, threads=1)(PROMPTS[:1], steps=10, scheduler="dpmpp-2m", latents=latents)
    full = pipes["tiny-pixart"](PROMPTS[:1], steps=10, scheduler="dpmpp-2m", latents=latents)
    assert relative_error(half.latents, full.latents) <= 1e-2


# --- against diffusers' PixArtAlphaPipeline ----------------------------------------------------------

def diffusers_generate(comps, scheduler: str, steps: int, latents, negative, height, width, prompts=PROMPTS,
                       guidance=GUIDANCE):
    """PixArtAlphaPipeline's final latents and uint8 image (no caption cleaning, no resolution binning)."""
    pipe = FAMILIES["pixart"].diffusers_pipeline(comps, diffusers_scheduler(scheduler, comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    final = {}
    negative_kwargs = {} if negative is None else {"negative_prompt": negative}
    with torch.no_grad():
        out = pipe(prompts, guidance_scale=guidance, num_inference_steps=steps, latents=torch.from_numpy(latents),
                   height=height, width=width, output_type="np", clean_caption=False, use_resolution_binning=False,
                   callback=lambda i, t, z: final.update(latents=z), **negative_kwargs)
    return final["latents"].numpy(), (out.images * 255).round().astype(np.int16)


def assert_baseline_matches(pipe, comps, prompts, scheduler, steps, negative, guidance=None):
    latents = initial_latents(pipe, batch=len(prompts))
    ours = pipe(prompts, negative_prompt=negative, steps=steps, scheduler=scheduler, latents=latents,
                policy=FasterDiffusionPolicy.baseline(steps), guidance_scale=guidance)  # None: the family's, 4.5
    height, width = pipe.image_size(None, None)
    want_latents, want_pixels = diffusers_generate(comps, scheduler, steps, latents, negative, height, width, prompts,
                                                   GUIDANCE if guidance is None else guidance)
    assert_equals_diffusers(ours, want_latents, want_pixels)
    return ours


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
@pytest.mark.parametrize("model", ["tiny-pixart", "1024-style"])
def test_baseline_equals_the_diffusers_pipeline(pipes, components, model, scheduler, negative):
    ours = assert_baseline_matches(pipes[model], components[model], PROMPTS, scheduler, STEPS[scheduler], negative)
    assert not np.allclose(ours.latents[0], ours.latents[1])  # two prompts, two images


def test_empty_prompt_equals_the_diffusers_pipeline(pipes, components):
    """"" is a prompt like any other (T5 gives it one token, the end of sequence), as in the other families."""
    assert_baseline_matches(pipes["tiny-pixart"], components["tiny-pixart"], [""], "dpmpp-2m", 6, None)


def test_unguided_baseline_equals_the_diffusers_pipeline(pipes, components):
    """Guidance 1 or less: one row per prompt, no negative rows, as the pipeline."""
    ours = assert_baseline_matches(pipes["tiny-pixart"], components["tiny-pixart"], PROMPTS, "ddim", 6, None,
                                   guidance=1.0)
    assert ours.rows["text_encoder"] == 2


def test_the_mask_matters(pipes):
    """Padding is masked out: the same prompt with its mask all ones gives another image (so a runtime that
    dropped the mask would fail the diffusers comparison)."""
    from fd.runtime import stages
    from fd.runtime.families import PromptRequest
    pipe = pipes["tiny-pixart"]
    height, width = pipe.image_size(None, None)
    conds = pipe.family.encode_prompt(pipe.runner, pipe.tokenizers, PromptRequest(PROMPTS[:1], None, False,
                                                                                    height, width), {})
    latents = initial_latents(pipe, batch=1)
    masked = stages.decode_denoiser(pipe.runner, stages.encode_denoiser(pipe.runner, latents, 500.0, conds),
                                    np.float32([500, 400]), conds)[0]
    ones = dict(conds, encoder_attention_mask=pipe.runner.upload_input("denoiser_encoder", "encoder_attention_mask",
                                                                       np.ones((1, 120), np.int64)))
    unmasked = stages.decode_denoiser(pipe.runner, stages.encode_denoiser(pipe.runner, latents, 500.0, ones),
                                      np.float32([500, 400]), ones)[0]
    assert np.abs(masked - unmasked).max() > 1e-2


# --- FasterDiffusion against an independent reference ------------------------------------------------

def diffusers_conditioning(comps, prompts, negative, height, width):
    """PixArtAlphaPipeline.encode_prompt's rows [negative…, positive…] and the forward's keyword arguments."""
    pipe = FAMILIES["pixart"].diffusers_pipeline(comps, diffusers_scheduler("ddim", comps.scheduler_config))
    with torch.no_grad():
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            list(prompts), True, negative_prompt="" if negative is None else negative, device="cpu",
            clean_caption=False)
    rows = 2 * len(prompts)
    added = None
    if comps.transformer.config.sample_size == 128:  # as the pipeline: the 1024 models' size conditions
        added = {"resolution": torch.tensor([[float(height), float(width)]]).repeat(rows, 1),
                 "aspect_ratio": torch.tensor([[height / width]]).repeat(rows, 1)}
    return {"encoder_hidden_states": torch.cat([negative_embeds, embeds]),
            "encoder_attention_mask": torch.cat([negative_mask, mask]), "added_cond_kwargs": added}


def forward_capturing(transformer, split, sample, timesteps, kwargs):
    """diffusers' own forward, keeping the tokens leaving block split-1 (the encoder half's cache)."""
    captured = {}
    hook = transformer.transformer_blocks[split - 1].register_forward_hook(
        lambda module, args, output: captured.update(tokens=output))
    try:
        transformer(sample, timestep=timesteps, **kwargs, return_dict=False)
    finally:
        hook.remove()
    return captured["tokens"]


def forward_from_tokens(transformer, split, tokens, sample_shape, timesteps, kwargs):
    """diffusers' own forward with block `split`'s input replaced by cached tokens (the decoder half): the
    blocks before it run on zeros and are discarded, so nothing of the current latent is read."""
    def replace(module, args, module_kwargs):
        return (tokens, *args[1:]), module_kwargs
    hook = transformer.transformer_blocks[split].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        return transformer(torch.zeros(sample_shape), timestep=timesteps, **kwargs, return_dict=False)[0]
    finally:
        hook.remove()


def reference_fd(comps, prompts, negative, latents, scheduler_name, steps, key_steps, split, height, width,
                 noise_injection=INJECTION, decode_with_key_timestep=False):
    """FasterDiffusion in its plainest form on diffusers' PixArt transformer and scheduler: the encoder half at
    key steps on the scaled latent, every step decoded from the latest cache with its own timestep (one call
    per step), guidance on the full output then its noise channels kept (as the pipeline), z ← z + α·ε
    before each step with t < τ, then the scheduler's step. `decode_with_key_timestep` is a wrong variant."""
    scheduler = diffusers_scheduler(scheduler_name, comps.scheduler_config)
    kwargs = diffusers_conditioning(comps, prompts, negative, height, width)
    transformer, channels = comps.transformer, comps.transformer.config.in_channels
    noise = torch.from_numpy(latents)
    z = noise * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    keys = set(key_steps) | {0}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([z, z])
            if i in keys:
                t_key = t
                tokens = forward_capturing(transformer, split, scheduler.scale_model_input(rows, t),
                                           t.repeat(len(rows)), kwargs)
            t_decode = t_key if decode_with_key_timestep else t
            prediction = forward_from_tokens(transformer, split, tokens, rows.shape, t_decode.repeat(len(rows)), kwargs)
            uncond, cond = prediction.chunk(2)
            prediction = (uncond + GUIDANCE * (cond - uncond))[:, :channels]
            if noise_injection is not None and t < noise_injection[1]:
                z = z + noise_injection[0] * noise
            z = scheduler.step(prediction, t, z, return_dict=False)[0]
    return z.numpy()


_references = {}


def reference(comps, model, negative, latents, scheduler, steps, height, width, **variant):
    options = dict(key_steps=default_key_steps(steps), split=4)
    options.update(variant)
    key = (model, negative, latents.tobytes(), scheduler, steps, repr(sorted(options.items())))
    if key not in _references:
        _references[key] = reference_fd(comps, PROMPTS, negative, latents, scheduler, steps, height=height,
                                        width=width, **options)
    return _references[key]


def test_reference_with_every_step_a_key_step_equals_diffusers(pipes, components):
    """The reference itself: every step a key step and no injection is plain sampling, i.e. the pipeline."""
    comps, pipe = components["tiny-pixart"], pipes["tiny-pixart"]
    latents = initial_latents(pipe)
    ref = reference(comps, "tiny-pixart", None, latents, "dpmpp-2m", 8, 128, 128, key_steps=range(8),
                    noise_injection=None)
    want, _ = diffusers_generate(comps, "dpmpp-2m", 8, latents, None, 128, 128)
    assert relative_error(ref, want) <= 1e-5


@pytest.mark.parametrize("model,scheduler,steps,negative", [
    *(("tiny-pixart", scheduler, steps, negative) for scheduler, steps in (("ddim", 50), ("dpmpp-2m", 20))
      for negative in (None, "blurry, low quality")),
    ("1024-style", "dpmpp-2m", 20, None),  # the added conditions; the other cases would repeat tiny-pixart's
])
def test_fasterdiffusion_equals_the_reference(pipes, components, model, scheduler, steps, negative):
    pipe, comps = pipes[model], components[model]
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, negative_prompt=negative, steps=steps, scheduler=scheduler, latents=latents)
    assert ours.policy["key_steps"] == list(default_key_steps(steps))
    assert ours.policy["noise_injection"] == {"alpha": INJECTION[0], "tau": INJECTION[1]}
    height, width = pipe.image_size(None, None)
    assert relative_error(ours.latents, reference(comps, model, negative, latents, scheduler, steps, height,
                                                  width)) <= TOLERANCE[scheduler]


@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("dpmpp-2m", 20)])
def test_wrong_fd_variants_are_far_outside_the_tolerance(pipes, components, scheduler, steps):
    """Each mistake a runtime could make moves the result by more than 10x the tolerance."""
    comps, pipe = components["tiny-pixart"], pipes["tiny-pixart"]
    latents = initial_latents(pipe)
    right = reference(comps, "tiny-pixart", None, latents, scheduler, steps, 128, 128)
    shifted = tuple(k + 1 if k else k for k in default_key_steps(steps))
    wrong = {
        "key steps shifted by one": dict(key_steps=shifted),
        "decoder given the key step's timestep": dict(decode_with_key_timestep=True),
        "no noise injection": dict(noise_injection=None),
        "SD's tau 500": dict(noise_injection=(INJECTION[0], 500)),
        "every step a key step": dict(key_steps=tuple(range(steps))),
        "split one block later": dict(split=5),
    }
    for mistake, variant in wrong.items():
        error = relative_error(reference(comps, "tiny-pixart", None, latents, scheduler, steps, 128, 128, **variant),
                               right)
        assert error > 10 * TOLERANCE[scheduler], (mistake, error)


# --- prompts, tokenizer and bad input ------------------------------------------------------------------

def test_runtime_tokenizer_equals_the_transformers_one(folders, components):
    """fd's tokenizers-only tokenizer gives the ids and attention mask the pipeline's T5 tokenizer gives."""
    from fd.runtime.tokenizer import PromptTokenizer
    ours = PromptTokenizer(folders["tiny-pixart"] / "tokenizer" / "tokenizer.json", 120, 0)
    texts = ["a photo of the moon", "", "x" * 30 + " 123, dog!"]
    ids, mask = ours.with_mask(texts)
    want = components["tiny-pixart"].tokenizer(texts, padding="max_length", max_length=120, truncation=True)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    np.testing.assert_array_equal(ours(texts), ids)  # the CLIP families' call gives the same ids


def test_a_sentencepiece_tokenizer_folder_loads_and_tokenizes_alike(components, tmp_path):
    """The hub's PixArt folders keep T5's tokenizer as tokenizer/spiece.model alone: fd loads it (transformers
    converts it with sentencepiece) and the engine folder's tokenizer.json gives sentencepiece's own ids, the
    end-of-sequence token appended, and the pipeline's 120-token mask."""
    import io
    import json
    import shutil
    spm = pytest.importorskip("sentencepiece")
    from fd.builder.build import save_tokenizers
    from fd.builder.families import save_pipeline_folder
    from fd.builder.models import load_components
    from fd.runtime.tokenizer import PromptTokenizer
    folder = tmp_path / "model"
    save_pipeline_folder(components["tiny-pixart"], str(folder))
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    model = io.BytesIO()
    corpus = ["a photo of an astronaut riding a horse on the moon", "a painting of a cat", "a dog on the moon"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, model_type="unigram",
                                   vocab_size=27, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   minloglevel=2)
    (folder / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0}))  # T5's own length: 512
    comps = load_components(str(folder))
    (record,) = save_tokenizers(comps, tmp_path / "engine")
    assert record["max_length"] == 120 and record["pad_token_id"] == 0
    ours = PromptTokenizer(tmp_path / "engine" / record["file"], record["max_length"], record["pad_token_id"])
    texts = ["a cat on the moon", "a painting of a dog", ""]
    ids, mask = ours.with_mask(texts)
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer" / "spiece.model"))
    for row, text in enumerate(texts):
        want = [*processor.encode(text), 1]
        assert ids[row, :len(want)].tolist() == want and not ids[row, len(want):].any()
        assert mask[row].sum() == len(want) and mask[row, :len(want)].all()


def test_over_long_prompt_is_refused_in_one_line(pipes):
    with pytest.raises(FdError, match="tokens long; the text encoder takes at most 120"):
        pipes["tiny-pixart"](["cat " * 130], steps=2)


def test_cli_runs_and_refuses_in_one_line(folders, tmp_path):
    from tests.conftest import run_fd
    from tests.test_cli_errors import assert_one_line_error
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folders["tiny-pixart"]), "--prompt", "a cat", "--steps", "4",
                  "--out", str(tmp_path / "cat.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cat.png").is_file()
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folders["tiny-pixart"]), "--prompt", "cat " * 130,
                  "--out", str(tmp_path / "long.png"))
    assert_one_line_error(done, "tokens long", "shorten it")
    assert not (tmp_path / "long.png").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--split-block", "6"], "--split-block 6 does not fit this 6-block transformer: use 1 to 5"),
    (["--dynamic-shape", "64:256"], "--dynamic-shape is not supported for the pixart family"),
])
def test_unsupported_builds_are_one_line(tmp_path, args, fragment):
    from tests.conftest import run_fd
    from tests.test_cli_errors import assert_one_line_error
    done = run_fd("fd.builder.cli", "--model", "tiny-pixart", *args, "--out", str(tmp_path / "x"))
    assert_one_line_error(done, fragment)
    assert not (tmp_path / "x").exists()
