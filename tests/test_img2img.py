"""Image to image on `tiny` and `tiny-xl` built with --img2img (the VAE encoder graph), on ONNX Runtime:

- the baseline equals diffusers' StableDiffusionImg2ImgPipeline (and StableDiffusionXLImg2ImgPipeline) at
  strengths 0.5 and 1.0, given the same noise for the latent sample and for add_noise (latents within
  1e-3 relative, pixels within 2/255), on the same truncated schedule;
- FasterDiffusion equals the independent reference, whose key steps index the steps that run;
- bad input (strength out of (0, 1] or running no step, an init image that is not an image, a folder
  without the VAE encoder, --strength without --init-image) is one line.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from fd.runtime.errors import FdError
from fd.runtime.img2img import prepare_init, sample_noise
from fd.runtime.request import Request
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from tests import fd_reference
from tests.compare import assert_equals_diffusers, relative_error
from tests.conftest import run_fd
from tests.test_cli_errors import assert_one_line_error
from tests.test_fd_reference import TOLERANCE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a painting of a cat"]
SIZE = 128
LATENT = (4, SIZE // 8, SIZE // 8)
SEED = 3  # fd draws the latent sample's noise from this seed (runtime.img2img.sample_noise)




@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("img2img")
    return {model: build(BuildOptions(model=model, img2img=True, max_batch_size=2, max_window=6,
                                      out=str(root / model)), log=lambda *_: None) for model in ("tiny", "tiny-xl")}


@pytest.fixture(scope="module")
def pipes(folders):
    return {model: FasterDiffusionPipeline(folder, threads=1) for model, folder in folders.items()}


@pytest.fixture(scope="module")
def components(tiny_components):
    from fd.builder.families.sdxl import make_tiny_xl_components
    return {"tiny": tiny_components, "tiny-xl": make_tiny_xl_components()}


def photo(seed: int) -> Image.Image:
    """A smooth RGB image (noise would make every VAE look alike)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    pixels = np.stack([np.sin(6 * x + phase[0]) * np.cos(4 * y + phase[1]), np.cos(5 * (x + y) + phase[2]),
                       x * y], axis=-1)
    return Image.fromarray(((pixels + 1) * 127.5).clip(0, 255).astype(np.uint8))


def unit_noise(seed=0, batch=len(PROMPTS)):
    return np.random.default_rng(seed).standard_normal((batch, *LATENT), dtype=np.float32)


def diffusers_img2img(comps, image, strength: float, steps: int, noise: np.ndarray, monkeypatch):
    """diffusers' img2img pipeline with its two random draws replaced by fd's: the VAE's latent sample
    (fd: sample_noise(SEED)) and the noise add_noise mixes in (fd: the unit noise)."""
    import diffusers
    import diffusers.models.autoencoders.vae as vae_module
    scheduler = diffusers.DDIMScheduler.from_config(comps.scheduler_config)
    parts = dict(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
                 scheduler=scheduler)
    if comps.family == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            **parts, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2, add_watermarker=False,
            force_zeros_for_empty_prompt=comps.options["force_zeros_for_empty_prompt"])
    else:
        from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(vae_module, "randn_tensor",
                        lambda shape, **_: torch.from_numpy(sample_noise(SEED, tuple(shape))))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise.reshape(shape)))
    seen = {"timesteps": []}

    def keep(_pipe, _i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        seen["timesteps"].append(int(t))
        return kwargs
    with torch.no_grad():
        out = pipe(PROMPTS, image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
                   output_type="np", callback_on_step_end=keep)
    return seen, (out.images * 255).round().astype(np.int16)


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_baseline_equals_the_diffusers_img2img_pipeline(pipes, components, model, strength, monkeypatch):
    steps, noise, image = 10, unit_noise(), photo(0)
    run = int(steps * strength)
    ours = pipes[model](PROMPTS, steps=steps, latents=noise, seed=SEED, init_image=image, strength=strength,
                        policy=FasterDiffusionPolicy.baseline(run))
    seen, want_pixels = diffusers_img2img(components[model], image, strength, steps, noise, monkeypatch)
    assert ours.timesteps == seen["timesteps"] and len(ours.timesteps) == run
    assert_equals_diffusers(ours, seen["latents"].numpy(), want_pixels)
    assert ours.calls["vae_encoder"] == 1 and ours.calls["denoiser_encoder"] == run


def test_fasterdiffusion_img2img_equals_the_reference(pipes, components):
    """DPM-Solver++: the truncated schedule starts mid-way (diffusers' set_begin_index), key steps index it."""
    steps, strength, noise, image = 20, 0.6, unit_noise(1), photo(1)
    ours = pipes["tiny"](PROMPTS, steps=steps, scheduler="dpmpp-2m", latents=noise, seed=SEED, init_image=image,
                         strength=strength)
    keys = default_key_steps(12)
    assert ours.policy["key_steps"] == list(keys) and ours.calls["denoiser_encoder"] == len(keys)
    comps = components["tiny"]
    clean = fd_reference.init_latents(comps.vae, image, sample_noise(SEED, (1, *LATENT)), len(PROMPTS))
    want = fd_reference.reference_fd_sample(comps, PROMPTS, None, noise, "dpmpp-2m", steps, 7.5, keys,
                                            noise_injection=(0.003, 500), init_latents=clean, strength=strength)
    assert relative_error(ours.latents, want) <= TOLERANCE
    # sharp: the key steps counted over the whole schedule (keys 0, 1, … of the 20) give another result
    shifted = fd_reference.reference_fd_sample(comps, PROMPTS, None, noise, "dpmpp-2m", steps, 7.5,
                                               [k - 8 for k in default_key_steps(20) if k >= 8],
                                               noise_injection=(0.003, 500), init_latents=clean, strength=strength)
    assert relative_error(shifted, want) > 10 * TOLERANCE


def test_the_init_image_and_strength_matter(pipes):
    pipe, noise = pipes["tiny"], unit_noise(2, batch=1)
    first = pipe(PROMPTS[:1], steps=12, latents=noise, init_image=photo(0), strength=0.5).latents
    other = pipe(PROMPTS[:1], steps=12, latents=noise, init_image=photo(5), strength=0.5).latents
    stronger = pipe(PROMPTS[:1], steps=12, latents=noise, init_image=photo(0), strength=0.9).latents
    assert relative_error(other, first) > 1e-2 and relative_error(stronger, first) > 1e-2


# --- bad input: one line each ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    ({"strength": 0.0}, "--strength 0.0 is out of range"),
    ({"strength": 1.5}, "--strength 1.5 is out of range"),
    ({"strength": float("nan")}, "--strength nan is out of range"),
    ({"strength": 0.2, "steps": 4}, "--strength 0.2 with --steps 4 runs no step"),
    ({"strength": 0.5, "steps": 20, "policy": FasterDiffusionPolicy((0, 12), 6)},
     "key step 12 is out of range: --strength 0.5 runs 10 steps"),
])
def test_bad_strength_is_one_line(pipes, kwargs, fragment):
    kwargs = {"steps": 10, **kwargs}
    with pytest.raises(FdError) as error:
        pipes["tiny"](PROMPTS[:1], init_image=photo(0), **kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_folder_without_the_vae_encoder_refuses_an_init_image():
    with pytest.raises(FdError, match="has no VAE encoder for --init-image: rebuild it with fd-build --img2img"):
        prepare_init({"components": {}}, Request(prompts=["a"], steps=10, init_image=photo(0), strength=0.5), SIZE,
                     SIZE, "engines/x")
    with pytest.raises(FdError, match="--strength is for image to image"):
        Request(prompts=["a"], steps=10, strength=0.5)


def test_cli_image_to_image_and_its_bad_inputs(folders, tmp_path):
    photo(0).save(tmp_path / "start.png")
    (tmp_path / "text.png").write_text("not an image")
    common = ["--engine-dir", str(folders["tiny"]), "--prompt", "a cat", "--steps", "10", "--out",
              str(tmp_path / "o.png")]
    done = run_fd("fd.runtime.cli", *common, "--init-image", str(tmp_path / "start.png"), "--strength", "0.5",
                  "--timings")
    assert done.returncode == 0, done.stderr
    assert "vae encoder 1" in done.stdout and "denoiser encoder 5" in done.stdout  # 5 of 10 steps run, all key steps
    assert_one_line_error(run_fd("fd.runtime.cli", *common, "--init-image", str(tmp_path / "text.png")),
                          "--init-image", "is not a PNG, JPEG or WEBP image")
    assert_one_line_error(run_fd("fd.runtime.cli", *common, "--strength", "0.5"), "--strength is for image to image")
    assert_one_line_error(run_fd("fd.runtime.cli", *common, "--init-image", str(tmp_path / "start.png"), "--strength",
                                 "2"), "--strength 2.0 is out of range")
