"""The FasterDiffusion loop on ONNX Runtime: the baseline equals diffusers' StableDiffusionPipeline,
FD calls the encoder once per key step and the decoder once per window, and noise injection fires
exactly where t < τ."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, NoiseInjection

PROMPT = "a photo of an astronaut riding a horse on the moon"


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return FasterDiffusionPipeline(tiny_engine)


def initial_latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)


def diffusers_run(components, scheduler, steps, latents, output_type, **call_options):
    import diffusers
    import torch
    cls = {"ddim": diffusers.DDIMScheduler, "dpmpp-2m": diffusers.DPMSolverMultistepScheduler}[scheduler]
    pipe = diffusers.StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=cls.from_config(components.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents),
               output_type=output_type, **call_options)
    return out.images


@pytest.mark.parametrize("scheduler,steps", [("ddim", 20), ("dpmpp-2m", 15)])
def test_baseline_equals_diffusers_pipeline(pipe, tiny_components, scheduler, steps):
    latents = initial_latents()
    ours = pipe([PROMPT], steps=steps, scheduler=scheduler, latents=latents,
                policy=FasterDiffusionPolicy.baseline(steps))
    want_latents = diffusers_run(tiny_components, scheduler, steps, latents, "latent").numpy()
    want_image = diffusers_run(tiny_components, scheduler, steps, latents, "np")[0]
    scale = np.abs(want_latents).max()
    assert np.abs(ours.latents - want_latents).max() <= 1e-4 * scale
    want_pixels = (want_image * 255).round().astype(np.int16)
    got_pixels = np.asarray(ours.images[0]).astype(np.int16)
    assert got_pixels.shape == want_pixels.shape == (128, 128, 3)
    assert np.abs(got_pixels - want_pixels).max() <= 2
    assert 20 < want_pixels.std()  # a real image, not a saturated one that any code would match
    assert ours.calls == {"text_encoder": 1, "denoiser_encoder": steps, "denoiser_decoder": steps, "vae_decoder": 1}


def count_backend_calls(pipe, monkeypatch):
    """Count executions where the backend runs a graph (below the pipeline's own bookkeeping)."""
    counts = {}
    original = pipe.runner._execute

    def spy(component, feeds):
        counts.setdefault(component, []).append(pipe.runner.rows_of(feeds["timestep"]) if "timestep" in feeds else None)
        return original(component, feeds)
    monkeypatch.setattr(pipe.runner, "_execute", spy)
    return counts


def test_fd_calls_encoder_once_per_key_step_and_decoder_once_per_window(pipe, monkeypatch):
    counts = count_backend_calls(pipe, monkeypatch)
    result = pipe([PROMPT], steps=50, seed=3)
    assert len(counts["denoiser_encoder"]) == 9
    # windows of the paper's key steps: 1,1,1,2,5,5,10,10,15 steps, two rows (CFG) per step
    assert counts["denoiser_decoder"] == [2 * n for n in (1, 1, 1, 2, 5, 5, 10, 10, 15)]
    assert result.policy["key_steps"] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert np.isfinite(result.latents).all()


def test_long_windows_split_into_several_calls_sharing_one_cache(pipe, monkeypatch):
    counts = count_backend_calls(pipe, monkeypatch)
    pipe([PROMPT], steps=20, seed=3, policy=FasterDiffusionPolicy((0, 10), max_window=4))
    assert len(counts["denoiser_encoder"]) == 2
    assert counts["denoiser_decoder"] == [8, 8, 4, 8, 8, 4]  # 10 steps as 4+4+2, twice


def test_fd_is_deterministic_for_a_seed(pipe):
    a = pipe([PROMPT], steps=20, scheduler="dpmpp-2m", seed=5)
    b = pipe([PROMPT], steps=20, scheduler="dpmpp-2m", seed=5)
    c = pipe([PROMPT], steps=20, scheduler="dpmpp-2m", seed=6)
    assert np.isfinite(a.latents).all()
    assert np.array_equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(a.latents, c.latents)


def test_fd_with_every_step_a_key_step_equals_baseline_without_injection(pipe):
    policy = FasterDiffusionPolicy(tuple(range(10)), max_window=15, noise_injection=None)
    fd = pipe([PROMPT], steps=10, seed=1, policy=policy)
    base = pipe([PROMPT], steps=10, seed=1, policy=FasterDiffusionPolicy.baseline(10))
    assert np.array_equal(fd.latents, base.latents)


def test_noise_injection_touches_exactly_the_steps_below_tau(pipe, monkeypatch):
    import fd.runtime.pipeline as pipeline_module
    seen = []  # (timestep, sample given to the scheduler, sample it returned)
    make = pipeline_module.make_scheduler

    def recording_scheduler(name, config):
        sampler = make(name, config)
        step = sampler.step

        def recorded(prediction, t, sample):
            out = step(prediction, t, sample)
            seen.append((int(t), sample.copy(), out.copy()))
            return out
        sampler.step = recorded
        return sampler
    monkeypatch.setattr(pipeline_module, "make_scheduler", recording_scheduler)
    latents = initial_latents(9)
    pipe([PROMPT], steps=50, latents=latents)
    injected = []
    for i in range(1, len(seen)):
        added = seen[i][1] - seen[i - 1][2]
        if np.abs(added).max() > 0:
            np.testing.assert_allclose(added, NoiseInjection().alpha * latents, rtol=1e-3, atol=1e-6)
            injected.append(seen[i][0])
    expected = [t for t, _, _ in seen if t < 500]
    assert injected == expected and len(expected) == 25  # DDIM-50: i = 25 … 49 (t = 481 … 1)
    assert np.array_equal(seen[0][1], latents)  # step 0 (t = 981) untouched


def test_generation_does_not_import_torch_or_diffusers(tiny_engine, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from fd.runtime.cli import main
        code = main(["--engine-dir", r"{tiny_engine}", "--prompt", "a cat", "--steps", "4",
                     "--out", r"{tmp_path / 'x.png'}"])
        assert code == 0, code
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not leaked, leaked
        print("clean")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "clean" in done.stdout and (tmp_path / "x.png").is_file()


@pytest.fixture(scope="module")
def batch2_pipe(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = build(BuildOptions(model="tiny", max_batch_size=2, max_window=4,
                             out=str(tmp_path_factory.mktemp("b2") / "tiny-b2")), log=lambda *_: None)
    return FasterDiffusionPipeline(out)


def test_two_prompts_in_one_batch_equal_two_separate_generations(batch2_pipe):
    """Checks the row layout of guidance halves, images and window steps in the batched decoder."""
    prompts = ["a photo of a cat", "a painting of a dog on the moon"]
    latents = np.random.default_rng(11).standard_normal((2, 4, 16, 16), dtype=np.float32)
    together = batch2_pipe(prompts, steps=20, scheduler="dpmpp-2m", latents=latents)
    assert together.calls["denoiser_decoder"] == 10  # windows 1,1,1,2,5,5,5; max window 4 splits each 5 into 4+1
    for row, prompt in enumerate(prompts):
        alone = batch2_pipe([prompt], steps=20, scheduler="dpmpp-2m", latents=latents[row:row + 1])
        np.testing.assert_allclose(together.latents[row], alone.latents[0], rtol=0,
                                   atol=1e-4 * np.abs(alone.latents).max())
    assert np.abs(together.latents[0] - together.latents[1]).max() > 1e-2


def test_two_prompts_baseline_equals_diffusers(batch2_pipe, tiny_components):
    import diffusers
    import torch
    prompts = ["a photo of a cat", "a painting of a dog on the moon"]
    latents = np.random.default_rng(12).standard_normal((2, 4, 16, 16), dtype=np.float32)
    ours = batch2_pipe(prompts, steps=10, negative_prompt="a horse", latents=latents,
                       policy=FasterDiffusionPolicy.baseline(10))
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_components.vae, text_encoder=tiny_components.text_encoder, tokenizer=tiny_components.tokenizer,
        unet=tiny_components.unet, scheduler=diffusers.DDIMScheduler.from_config(tiny_components.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompts, negative_prompt=["a horse"] * 2, num_inference_steps=10, guidance_scale=7.5,
                latents=torch.from_numpy(latents), output_type="latent").images.numpy()
    assert np.abs(ours.latents - want).max() <= 1e-4 * np.abs(want).max()
