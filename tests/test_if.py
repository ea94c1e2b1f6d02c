"""DeepFloyd IF stage I end to end on ONNX Runtime: the split, diffusers' IFPipeline, an independent reference.

`tiny-if` (generated: IF's UNet at toy width with encoder_hid_proj, the pooled-text term, added-KV attention,
scale-shift ResNets, GELU time activation and 6 output channels; a 2-layer T5; IF's DDPM config with learned_range
variance and dynamic thresholding; 16x16 pixels).

- the split (fp32): prompt terms → encoder → decoder equals the UNet's forward (stage I, and stage II's UNet with
  its noise-level embedding) within 1e-5, all six channels; one decoder call over k timesteps equals k calls;
- --no-fd equals IFPipeline (same components, guidance 7, two prompts, the same noise: IFPipeline takes no
  latents, so its seeded generator's draws are handed to fd as the initial noise and, for the DDPM, as each
  step's noise through Request.step_noise): DDIM (variance_type fixed_small), IF's own DDPM with the learned
  variance and DPM++ 2M, every one with dynamic thresholding;
- FasterDiffusion equals `reference_fd` (tests/if_oracle.py, written for the tests, not fd's code), on diffusers'
  own UNet forward (its cache read and replaced through hooks; the prompt terms recomputed by diffusers at every
  call) and diffusers' schedulers; wrong variants miss it by far more than the tolerance; stage II likewise;
- stage II equals IFSuperResolutionPipeline on stage I's embeddings; the cascade CLI, fd-bench's diffusers arm
  and fd-serve's engine service on IF folders;
- one-line refusals.
"""
import json

import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES, family_generating
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from tests.compare import assert_one_decoder_call_equals_k_calls, relative_error
from tests.if_oracle import (GUIDANCE, INJECTION, diffusers_scheduler, forward_capturing, forward_from_cache,
                             if_pipeline, reference_fd, seeded_noise, sr_noise)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

# Capitals and outer spaces: IFPipeline lower-cases and strips (the tiny tokenizer has no capitals).
PROMPTS = ["A photo of an astronaut riding a horse on the moon ", "a painting of a cat"]
STEPS = {"ddim": 12, "ddpm": 12, "dpmpp-2m": 10}
# fd (ONNX Runtime, fp32) against the torch reference, max |Δ| relative to the largest value, per scheduler.
# Measured: DDPM-50 1.0e-6, DPM++-20 1.2e-6, DDIM-50 5.8e-5 (DDIM's x0 estimate divides by sqrt(ᾱ), 0.03 at
# t = 980 on cosine betas, and IF's thresholding keeps the eps term as it was, so rounding grows; the wrong
# variants move DDIM-50 by 0.07 or more). The wrong variants (on DDPM-50) miss by 4.3e-4 to 0.17.
TOLERANCE = {"ddim": 2e-4, "dpmpp-2m": 1e-5, "ddpm": 1e-5}


@pytest.fixture(scope="module")
def comps():
    return family_generating("tiny-if")()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("if") / "tiny-if"
    return build(BuildOptions(model="tiny-if", max_batch_size=2, max_window=6, out=str(out)), log=lambda *_: None)


@pytest.fixture(scope="module")
def pipe(folder):
    return FasterDiffusionPipeline(folder, threads=1)


# --- the schedulers, step by step ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp-2m"])
def test_schedulers_with_thresholding_equal_diffusers_step_by_step(name):
    """IF's config (dynamic thresholding at the 0.95 quantile, sample_max_value 1.5; DDPM with the learned
    variance in channels 3-5) on samples large enough that the threshold s lands inside (1, 1.5) and at 1.5."""
    from fd.builder.families.deepfloyd_if import IF_SCHEDULER_CONFIG
    from fd.runtime.schedulers import make_scheduler
    from fd.runtime.schedulers.common import GivenNoise
    config = {**IF_SCHEDULER_CONFIG, "variance_type": "fixed_small"} if name == "ddim" else IF_SCHEDULER_CONFIG
    ours, theirs = make_scheduler(name, config), diffusers_scheduler(name, IF_SCHEDULER_CONFIG)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8), dtype=np.float32)
    y = torch.from_numpy(x)
    channels = 6 if name != "ddim" else 3
    noises = [rng.standard_normal((2, 3, 8, 8), dtype=np.float32) for _ in range(10)]
    generator = GivenNoise(noises)
    for i, t in enumerate(ours.timesteps):
        output = rng.standard_normal((2, channels, 8, 8), dtype=np.float32) * np.float32(1.5)
        x = ours.step(output, t, x, generator=generator)
        if name == "ddpm":  # diffusers draws its noise inside: hand it the same draw
            import diffusers.schedulers.scheduling_ddpm as ddpm_module
            original = ddpm_module.randn_tensor
            ddpm_module.randn_tensor = lambda shape, **kw: torch.from_numpy(noises[i])
            try:
                y = theirs.step(torch.from_numpy(output), int(t), y, return_dict=False)[0]
            finally:
                ddpm_module.randn_tensor = original
        else:
            y = theirs.step(torch.from_numpy(output), int(t), y, return_dict=False)[0]
        assert relative_error(x, y.numpy()) <= 2e-6, i


def test_dynamic_thresholding_clips_and_rescales():
    from fd.runtime.schedulers.thresholding import dynamic_threshold
    x0 = np.stack([np.linspace(-3, 3, 100), np.linspace(-0.5, 0.5, 100)]).astype(np.float32).reshape(2, 1, 10, 10)
    out = dynamic_threshold(x0, 0.95, 1.5)
    assert np.isclose(np.abs(out[0]).max(), 1.0) and np.abs(out[0]).max() <= 1.0  # s = 1.5 (clamped): clip, divide
    np.testing.assert_array_equal(out[1], x0[1])  # s = 1 (quantile below 1): plain clipping, nothing to clip


# --- the split ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage_two", [False, True])
def test_split_equals_the_unet_forward(comps, stage_two):
    from fd.builder.families.deepfloyd_if import tiny_if_unet
    from fd.builder.if_split import IFDecoder, IFEncoder, IFPromptTerms
    torch.manual_seed(1)
    unet = tiny_if_unet(stage_two) if stage_two else comps.unet
    generator = torch.Generator().manual_seed(2)
    side = unet.config.sample_size
    sample = torch.randn(3, unet.config.in_channels, side, side, generator=generator)
    timesteps = torch.tensor([999.0, 500.0, 3.0])
    text = torch.randn(3, 77, unet.config.encoder_hid_dim, generator=generator)
    level = torch.tensor([250.0, 100.0, 0.0]) if stage_two else None
    with torch.no_grad():
        terms = IFPromptTerms(unet)(text, *(() if level is None else (level,)))
        upscaled = (sample[:, 3:],) if stage_two else ()  # stage II: the UNet's input is sample and image
        cache = IFEncoder(unet)(sample[:, :3], timesteps, *terms, *upscaled)
        split = IFDecoder(unet)(timesteps, *terms, *cache)
        full = unet(sample, timesteps, encoder_hidden_states=text, class_labels=level).sample
    assert split.shape == full.shape == (3, 6, side, side)  # noise and learned variance
    assert relative_error(split.numpy(), full.numpy()) <= 1e-5
    # the noise level is really an input (a split that ignored it would pass the comparison at one level only)
    if stage_two:
        with torch.no_grad():
            other = IFPromptTerms(unet)(text, level + 300)[1]
        assert (other - terms[1]).abs().max() > 1e-3


def test_one_decoder_call_over_k_timesteps_equals_k_calls(pipe):
    from fd.runtime import stages
    from fd.runtime.families import PromptRequest
    conds = pipe.family.encode_prompt(pipe.runner, pipe.tokenizers, PromptRequest(PROMPTS[:1], None, True, 16, 16), {})
    sample = np.concatenate([seeded_noise(0, 1, 16, 0)[0]] * 2)
    cache = stages.encode_denoiser(pipe.runner, sample, 999.0, conds)
    timesteps = np.float32([951, 901, 851, 801])
    together = assert_one_decoder_call_equals_k_calls(pipe.runner, cache, timesteps, conds)
    assert all(batched.shape == (2, 6, 16, 16) for batched in together)


def test_manifest_has_no_vae_and_the_prompt_terms_graph(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    specs = manifest["components"]
    assert manifest["family"] == "if" and "vae_decoder" not in specs
    assert sorted(specs) == ["denoiser_conditions", "denoiser_decoder", "denoiser_encoder", "text_encoder"]
    assert manifest["vae_scale_factor"] == 1 and manifest["latent_channels"] == 3
    assert [t["name"] for t in specs["denoiser_decoder"]["inputs"]][:3] == [
        "timestep", "encoder_hidden_states", "added_embedding"]
    assert specs["denoiser_decoder"]["outputs"][0]["shape"] == ["batch", 6, 16, 16]
    assert [t["name"] for t in specs["text_encoder"]["inputs"]] == ["input_ids", "attention_mask"]


# --- against diffusers' IFPipeline -------------------------------------------------------------------------

def diffusers_generate(comps, scheduler: str, steps: int, seed: int, prompts=PROMPTS, negative=None,
                       guidance=GUIDANCE) -> np.ndarray:
    """IFPipeline's final sample (output_type "pt": the image in [-1, 1] before post-processing)."""
    pipe = if_pipeline(comps, diffusers_scheduler(scheduler, comps.scheduler_config))
    with torch.no_grad():
        out = pipe(list(prompts), negative_prompt=None if negative is None else [negative] * len(prompts), num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="pt", clean_caption=False)
    return out.images.numpy()


def fd_generate(pipe, scheduler, steps, seed, prompts=PROMPTS, negative=None, guidance=None, policy=None):
    latents, step_noise = seeded_noise(seed, len(prompts), 16, steps)
    return pipe(list(prompts), negative_prompt=negative, steps=steps, scheduler=scheduler, latents=latents,
                step_noise=step_noise if scheduler == "ddpm" else None, guidance_scale=guidance,
                policy=policy or FasterDiffusionPolicy.baseline(steps))


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmpp-2m"])
def test_baseline_equals_the_diffusers_pipeline(pipe, comps, scheduler):
    steps = STEPS[scheduler]
    ours = fd_generate(pipe, scheduler, steps, seed=3)
    want = diffusers_generate(comps, scheduler, steps, seed=3)
    assert relative_error(ours.latents, want) <= 1e-4
    pixels = np.stack([np.asarray(image) for image in ours.images]).astype(np.int16)
    want_pixels = (np.clip(want / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round()
    assert np.abs(pixels - want_pixels).max() <= 1 and want_pixels.std() > 20
    assert not np.allclose(ours.latents[0], ours.latents[1])  # two prompts, two images
    # thresholding bites here: a sampler with it off lands elsewhere (so the comparison above covers it)
    if scheduler == "ddim":
        plain = dict(comps.scheduler_config, thresholding=False)
        pipe.manifest["scheduler_config"], saved = plain, pipe.manifest["scheduler_config"]
        try:
            unthresholded = fd_generate(pipe, scheduler, steps, seed=3)
        finally:
            pipe.manifest["scheduler_config"] = saved
        assert relative_error(unthresholded.latents, want) > 100 * 1e-4


def test_ddpm_steps_with_the_conditional_variance(pipe, comps):
    """The learned variance the DDPM steps with is the conditional rows', as IFPipeline takes it: the same run
    with the unconditional rows' variance misses diffusers."""
    from fd.runtime.families.deepfloyd_if import DeepFloydIF
    want = diffusers_generate(comps, "ddpm", STEPS["ddpm"], seed=3)

    class UnconditionalVariance(DeepFloydIF):
        def guide(self, prediction, images, guidance_scale, sampler):
            guided = super().guide(prediction, images, guidance_scale, sampler)
            return np.concatenate([guided[:, :3], prediction[:images, 3:]], axis=1)

    family, pipe.family = pipe.family, UnconditionalVariance()
    try:
        wrong = fd_generate(pipe, "ddpm", STEPS["ddpm"], seed=3)
    finally:
        pipe.family = family
    assert relative_error(wrong.latents, want) > 10 * 1e-4


def test_negative_prompt_and_unguided_equal_the_diffusers_pipeline(pipe, comps):
    ours = fd_generate(pipe, "ddim", 8, seed=4, negative="blurry")
    assert relative_error(ours.latents, diffusers_generate(comps, "ddim", 8, seed=4, negative="blurry")) <= 1e-4
    ours = fd_generate(pipe, "ddim", 8, seed=4, guidance=1.0)
    assert ours.rows["text_encoder"] == 2  # one row per prompt: no negative rows
    assert relative_error(ours.latents, diffusers_generate(comps, "ddim", 8, seed=4, guidance=1.0)) <= 1e-4


def test_the_t5_mask_matters(pipe):
    """T5 reads the attention mask: the same ids with the mask all ones give other embeddings (so a runtime that
    dropped the mask would fail the diffusers comparison)."""
    (tokenizer,) = pipe.tokenizers
    ids, mask = tokenizer.with_mask(["a cat"])
    masked = pipe.runner.run("text_encoder", {"input_ids": ids, "attention_mask": mask})["text_embeddings"]
    ones = pipe.runner.run("text_encoder", {"input_ids": ids, "attention_mask": np.ones_like(mask)})["text_embeddings"]
    assert np.abs(pipe.runner.download(masked) - pipe.runner.download(ones)).max() > 1e-3


# --- FasterDiffusion against an independent reference (tests/if_oracle.py) -----------------------------------

def test_reference_with_every_step_a_key_step_equals_diffusers(comps):
    """The reference itself: every step a key step and no injection is plain sampling, i.e. the pipeline."""
    ref = reference_fd(comps, PROMPTS, "ddpm", 10, 5, key_steps=range(10), noise_injection=None)
    assert relative_error(ref, diffusers_generate(comps, "ddpm", 10, seed=5)) <= 1e-5


FD_CASES = [("ddim", 50), ("dpmpp-2m", 20), ("ddpm", 50)]


@pytest.mark.parametrize("scheduler,steps", FD_CASES)
def test_fasterdiffusion_equals_the_reference(pipe, comps, scheduler, steps):
    latents, step_noise = seeded_noise(6, 2, 16, steps)
    ours = pipe(PROMPTS, steps=steps, scheduler=scheduler, latents=latents,
                step_noise=step_noise if scheduler == "ddpm" else None)
    assert ours.policy["key_steps"] == list(default_key_steps(steps))
    assert ours.policy["noise_injection"] == {"alpha": INJECTION[0], "tau": INJECTION[1]}
    assert ours.calls["denoiser_encoder"] == len(default_key_steps(steps))
    assert ours.calls["denoiser_conditions"] == 1  # the prompt-only terms: once per generation
    ref = reference_fd(comps, PROMPTS, scheduler, steps, 6, default_key_steps(steps))
    error = relative_error(ours.latents, ref)
    assert error <= TOLERANCE[scheduler], error


WRONG_VARIANTS = {
    "decoder given the key step's timestep": dict(decode_with_key_timestep=True),
    "no noise injection": dict(noise_injection=None),
    "key steps shifted by one": dict(key_steps=tuple(k + 1 for k in default_key_steps(50))),
    "the unconditional rows' variance": dict(variance_rows="uncond"),
    "tau 300 (DiT's)": dict(noise_injection=(0.003, 300)),
}


@pytest.mark.parametrize("variant", WRONG_VARIANTS)
def test_wrong_variants_miss_the_tolerance(pipe, comps, variant):
    latents, step_noise = seeded_noise(6, 2, 16, 50)
    ours = pipe(PROMPTS, steps=50, scheduler="ddpm", latents=latents, step_noise=step_noise)
    options = {"key_steps": default_key_steps(50), **WRONG_VARIANTS[variant]}
    assert relative_error(ours.latents, reference_fd(comps, PROMPTS, "ddpm", 50, 6, **options)) > 10 * TOLERANCE["ddpm"]


# --- refusals -----------------------------------------------------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("options,needle", [
    (dict(img2img=True), "--img2img"),
    (dict(controlnets=("tiny-controlnet",)), "--controlnet"),
    (dict(backend_options={"dynamic_shape": "16:32"}), "--dynamic-shape"),
])
def test_build_refuses_what_if_has_not_in_one_line(tmp_path, options, needle):
    from fd.builder.build import BuildOptions, build
    out = tmp_path / "refused"
    with pytest.raises(FdError) as caught:
        build(BuildOptions(model="tiny-if", out=str(out), **options), log=lambda *_: None)
    assert needle in one_line(caught) and not out.exists()


def test_alias_absent_from_the_cache_is_one_line(monkeypatch, tmp_path):
    from fd.builder.models import load_components
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for alias, repo in (("if", "DeepFloyd/IF-I-XL-v1.0"), ("if-sr", "DeepFloyd/IF-II-L-v1.0")):
        with pytest.raises(FdError) as caught:
            load_components(alias)
        assert repo in one_line(caught) and "local Hugging Face cache" in str(caught.value)


def test_run_refusals_are_one_line(pipe):
    latents = seeded_noise(0, 1, 16, 0)[0]
    with pytest.raises(FdError) as caught:
        pipe(["a cat"], latents=latents[:, :2])
    assert "(1, 3, 16, 16)" in one_line(caught)
    with pytest.raises(FdError) as caught:
        pipe(["a cat"], steps=4, scheduler="ddpm", step_noise=[latents])  # too few
    assert "step_noise" in one_line(caught)
    with pytest.raises(FdError) as caught:
        pipe.prepare(pipe.as_request(["a cat"], scheduler="euler"))
    assert "dynamic thresholding" in one_line(caught)


def test_ddpm_with_learned_variance_is_refused_where_the_decoder_drops_it():
    """DiT's decoder returns the noise alone, so a learned-variance DDPM is refused there, in one line."""
    from fd.runtime.families import FAMILIES as RUNTIME
    from fd.runtime.schedulers import make_scheduler
    from fd.builder.families.deepfloyd_if import IF_SCHEDULER_CONFIG
    sampler = make_scheduler("ddpm", IF_SCHEDULER_CONFIG)
    RUNTIME["if"].check_scheduler(sampler)  # IF returns it
    with pytest.raises(FdError) as caught:
        RUNTIME["dit"].check_scheduler(sampler)
    assert "predicted variance" in one_line(caught)


# --- stage II: IFSuperResolutionPipeline -------------------------------------------------------------------

@pytest.fixture(scope="module")
def sr_comps():
    return family_generating("tiny-if-sr")()


@pytest.fixture(scope="module")
def sr_pipe(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("if") / "tiny-if-sr"
    return FasterDiffusionPipeline(build(BuildOptions(model="tiny-if-sr", max_batch_size=2, max_window=6,
                                                      out=str(out)), log=lambda *_: None), threads=1)


def sr_diffusers(sr_comps, comps, scheduler, steps, seed, image, noise_level=250, guidance=4.0):
    """IFSuperResolutionPipeline on stage I's T5 embeddings (prompt_embeds, as diffusers' cascade passes them)."""
    from fd.builder.families.deepfloyd_if import IFSuperResolutionFamily
    with torch.no_grad():
        embeds, negative = if_pipeline(comps, diffusers_scheduler("ddim", comps.scheduler_config)).encode_prompt(
            PROMPTS, True, device="cpu", clean_caption=False)
        pipe = IFSuperResolutionFamily().diffusers_pipeline(sr_comps, diffusers_scheduler(scheduler,
                                                                                          sr_comps.scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(image=torch.from_numpy(image), prompt_embeds=embeds, negative_prompt_embeds=negative,
                   num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level, output_type="pt",
                   generator=torch.Generator().manual_seed(seed))
    return out.images.numpy(), torch.cat([negative, embeds]).numpy()


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_stage_two_baseline_equals_the_diffusers_pipeline(pipe, sr_pipe, comps, sr_comps, scheduler):
    from fd.runtime.if_cascade import SuperResolutionInput
    stage_one = fd_generate(pipe, "dpmpp-2m", 8, seed=3).latents
    steps = 8
    want, text = sr_diffusers(sr_comps, comps, scheduler, steps, 9, stage_one)
    initial, upscale_noise, step_noise = sr_noise(9, steps)
    condition = SuperResolutionInput(stage_one, text, upscale_noise)
    ours = sr_pipe(PROMPTS, steps=steps, scheduler=scheduler, latents=initial, super_resolution=condition,
                   step_noise=step_noise if scheduler == "ddpm" else None, policy=FasterDiffusionPolicy.baseline(steps))
    assert ours.latents.shape == (2, 3, 32, 32)
    assert relative_error(ours.latents, want) <= 1e-4
    # the image and its noise level matter: another level lands elsewhere
    other = sr_pipe(PROMPTS, steps=steps, scheduler=scheduler, latents=initial, policy=FasterDiffusionPolicy.baseline(
        steps), step_noise=step_noise if scheduler == "ddpm" else None,
        super_resolution=SuperResolutionInput(stage_one, text, upscale_noise, noise_level=50))
    assert relative_error(other.latents, want) > 1e-2


def test_upscale_equals_torch_bilinear_with_aligned_corners():
    from fd.runtime.if_cascade import upscale
    image = np.random.default_rng(0).standard_normal((2, 3, 16, 12), dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(image), (32, 40), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(upscale(image, 32, 40), want.numpy(), rtol=0, atol=1e-6)


def test_cascade_runs_stage_two_with_its_own_key_steps(pipe, sr_pipe):
    from fd.runtime.if_cascade import stage_two_request, super_resolution_input
    from fd.runtime.request import Request
    request = Request(PROMPTS, steps=20, scheduler="dpmpp-2m", seed=1)
    first = pipe(request)
    condition = super_resolution_input(pipe, sr_pipe, request, first.latents)
    second = sr_pipe(stage_two_request(request, condition, steps=30))
    assert second.policy["key_steps"] == list(default_key_steps(30)) != first.policy["key_steps"]
    assert second.calls["denoiser_encoder"] == len(default_key_steps(30)) and "text_encoder" not in second.calls
    assert second.images[0].size == (32, 32)
    with pytest.raises(FdError) as caught:
        sr_pipe(PROMPTS)  # a stage-II folder alone
    assert "--super-resolution" in one_line(caught)


def test_fd_run_cascade_writes_the_stage_two_image(pipe, sr_pipe, tmp_path, capsys):
    from fd.runtime.cli import main
    out, latents = tmp_path / "sr.png", tmp_path / "sr.npy"
    assert main(["--engine-dir", str(pipe.engine_dir), "--prompt", "a cat", "--steps", "8", "--scheduler", "dpmpp-2m",
                 "--super-resolution", str(sr_pipe.engine_dir), "--sr-steps", "8", "--out", str(out),
                 "--save-latents", str(latents)]) == 0
    from PIL import Image
    assert Image.open(out).size == (32, 32) and np.load(latents).shape == (1, 3, 32, 32)
    assert np.abs(np.load(latents)).max() <= 1.0  # the final sample in [-1, 1] (thresholded)
    capsys.readouterr()
    for extra, needle in ((["--noise-level", "1000"], "--noise-level"), (["--sr-steps", "0"], "--sr-steps")):
        assert main(["--engine-dir", str(pipe.engine_dir), "--prompt", "a cat", "--super-resolution",
                     str(sr_pipe.engine_dir), "--out", str(tmp_path / "x.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()
    assert main(["--engine-dir", str(pipe.engine_dir), "--prompt", "a cat", "--super-resolution",
                 str(pipe.engine_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "stage-II folder" in capsys.readouterr().err


def test_bench_diffusers_arm_is_ifpipeline_on_fds_noise(pipe, comps):
    """fd-bench --compare diffusers runs the build family's diffusers_call: IFPipeline on fd's initial noise, DDIM
    made from IF's config with its variance dropped (as fd's --scheduler ddim)."""
    from fd.runtime.schedulers import diffusers_scheduler as registry_scheduler
    family = FAMILIES["if"]
    latents = seeded_noise(2, 2, 16, 0)[0]
    pipeline = family.diffusers_pipeline(comps, registry_scheduler("ddim", comps.scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images, sample = family.diffusers_call(pipeline, PROMPTS, torch.from_numpy(latents), steps=8,
                                               guidance_scale=GUIDANCE, height=16, width=16)
    ours = pipe(PROMPTS, steps=8, latents=latents, policy=FasterDiffusionPolicy.baseline(8))
    assert images.shape == (2, 16, 16, 3) and relative_error(ours.latents, sample.numpy()) <= 1e-4


def test_fd_serve_batches_if_requests_like_lone_runs(pipe, sr_pipe):
    """fd-serve's engine service (no Ray) on an IF folder: two requests batched into one generation, each image
    as the pipeline gives it alone; a stage-II folder refuses a request in fd-run's line (fd-serve: a 422)."""
    from fd.serve.api import ImageRequest
    from fd.serve.service import ImageService
    service = ImageService(str(pipe.engine_dir), pipeline=pipe)
    bodies = [{"prompt": "a cat", "seed": 1, "steps": 10}, {"prompt": "a dog on the moon", "seed": 2, "steps": 10}]
    outcomes = service.run([service.prepare(ImageRequest.model_validate(b).to_request()) for b in bodies])
    assert [o.status for o in outcomes] == [200, 200] and [o.batch_size for o in outcomes] == [2, 2]
    import io
    from PIL import Image
    for body, outcome in zip(bodies, outcomes):
        lone = pipe([body["prompt"]], seed=body["seed"], steps=10).images[0]
        served = np.asarray(Image.open(io.BytesIO(outcome.png)).convert("RGB"), dtype=np.int16)
        assert np.abs(served - np.asarray(lone, dtype=np.int16)).max() <= 2
    with pytest.raises(FdError) as caught:
        ImageService(str(sr_pipe.engine_dir), pipeline=sr_pipe).prepare(ImageRequest.model_validate(bodies[0])
                                                                        .to_request())
    assert "--super-resolution" in one_line(caught)


def test_stage_two_fasterdiffusion_equals_the_reference(pipe, sr_pipe, comps, sr_comps):
    """Stage II's FasterDiffusion (DDPM-20, the paper's key steps) against the hook-based reference on diffusers'
    own stage-II UNet, the upscaled image made by torch (interpolate) and diffusers' image-noising DDPM."""
    import diffusers
    from fd.runtime.if_cascade import SuperResolutionInput
    stage_one = fd_generate(pipe, "dpmpp-2m", 8, seed=3).latents
    steps, keys = 20, default_key_steps(20)
    initial, upscale_noise, step_noise = sr_noise(11, steps)
    _, text = sr_diffusers(sr_comps, comps, "ddim", 1, 0, stage_one)  # stage I's embeddings, [negative, positive]
    ours = sr_pipe(PROMPTS, steps=steps, scheduler="ddpm", latents=initial, step_noise=step_noise,
                   super_resolution=SuperResolutionInput(stage_one, text, upscale_noise))
    scheduler = diffusers_scheduler("ddpm", sr_comps.scheduler_config)
    noising = diffusers.DDPMScheduler.from_config(sr_comps.options["image_noising_scheduler"])
    level = torch.tensor([250, 250])
    upscaled = torch.nn.functional.interpolate(torch.from_numpy(stage_one), (32, 32), mode="bilinear",
                                               align_corners=True)
    upscaled = noising.add_noise(upscaled, torch.from_numpy(upscale_noise), level)
    unet, text = sr_comps.unet, torch.from_numpy(text)
    generator = torch.Generator().manual_seed(11)
    torch.randn((2, 3, 32, 32), generator=generator), torch.randn((2, 3, 32, 32), generator=generator)  # as sr_noise
    z, noise = torch.from_numpy(initial), torch.from_numpy(initial)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([torch.cat([z, upscaled], dim=1)] * 2)
            labels = torch.cat([level, level])
            if i in keys:
                cache = forward_capturing(unet, rows, t.repeat(4), text, class_labels=labels)
            prediction = forward_from_cache(unet, cache, rows.shape, t.repeat(4), text, class_labels=labels)
            uncond, cond = prediction.chunk(2)
            eps = torch.cat([uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
            if t < INJECTION[1]:
                z = z + INJECTION[0] * noise
            z = scheduler.step(eps, t, z, generator=generator, return_dict=False)[0]
    error = relative_error(ours.latents, z.numpy())
    assert error <= TOLERANCE["ddpm"], error


def test_saved_pipeline_folders_load_as_the_generated_models(comps, sr_comps, tmp_path):
    """IFPipeline and IFSuperResolutionPipeline folders (what save_pretrained writes, as the hub's) load with the
    same weights, family and scheduler configs; the stage-II folder's T5 is never needed."""
    from fd.builder.families import save_pipeline_folder
    from fd.builder.models import load_components, weights_fingerprint
    for generated, name in ((comps, "if"), (sr_comps, "if-sr")):
        folder = tmp_path / name
        save_pipeline_folder(generated, str(folder))
        loaded = load_components(str(folder))
        assert loaded.family == name and loaded.source["weights_sha256"] == weights_fingerprint(generated)
        assert loaded.scheduler_config["variance_type"] == "learned_range" and loaded.scheduler_config["thresholding"]
        assert (loaded.text_encoder is None) == (name == "if-sr")
    assert loaded.options["image_noising_scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
