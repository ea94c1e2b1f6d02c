"""ControlNets at key steps only, on `tiny` with two ControlNets (tiny-controlnet, and a local folder holding
another seed's random ControlNet) and the VAE encoder, on ONNX Runtime:

- the baseline (every step a key step) equals diffusers' StableDiffusionControlNetPipeline with both
  ControlNets (MultiControlNet), their images and scales (latents within 1e-3 relative, pixels within 2/255);
- FasterDiffusion equals the independent reference (tests/fd_reference.py) that runs the ControlNets at
  key steps only and adds their residuals to the cached skips and mid output, also with an init image;
  each ControlNet runs exactly once per key step; another control image changes the result;
- the manifest records each ControlNet; bad inputs are one line.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fd.builder.controlnet import check_fits, graph_names, make_tiny_controlnet, weights_sha256
from fd.runtime.control import prepare_control
from fd.runtime.errors import FdError
from fd.runtime.img2img import sample_noise
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from tests import fd_reference
from tests.compare import assert_equals_diffusers, relative_error
from tests.conftest import run_fd
from tests.test_cli_errors import assert_one_line_error
from tests.test_fd_reference import TOLERANCE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a painting of a cat"]
SIZE = 128  # tiny's image side
SCALES = [1.0, 0.6]
SECOND_SEED = 2




@pytest.fixture(scope="module")
def controlnets(tiny_components):
    """The two ControlNets the folder is built from: tiny-controlnet (seeded) and another seed's."""
    return [make_tiny_controlnet(tiny_components.unet), make_tiny_controlnet(tiny_components.unet, seed=SECOND_SEED)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, controlnets):
    from fd.builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("controlnet")
    controlnets[1].save_pretrained(root / "second-controlnet")  # a local ControlNet folder, as users pass one
    return build(BuildOptions(model="tiny", controlnets=("tiny-controlnet", str(root / "second-controlnet")),
                              img2img=True, max_batch_size=2, max_window=6, out=str(root / "engines")),
                 log=lambda *_: None)


@pytest.fixture(scope="module")
def pipe(folder):
    return FasterDiffusionPipeline(folder, threads=1)


def random_image(seed: int, size=(SIZE, SIZE), mode="RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.fixture(scope="module")
def images():
    # another size and an alpha channel: both are resized and converted exactly as diffusers does
    return [random_image(1, (96, 160), "RGBA"), random_image(2)]


def unit_noise(seed=0):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def controls(controlnets, images, scales=SCALES, rows=2 * len(PROMPTS)):
    return [fd_reference.Control(model, fd_reference.control_image(image, SIZE, SIZE, rows), scale)
            for model, image, scale in zip(controlnets, images, scales)]


def test_baseline_equals_the_diffusers_controlnet_pipeline(pipe, tiny_components, controlnets, images):
    import diffusers
    steps, latents = 8, unit_noise()
    ours = pipe(PROMPTS, steps=steps, latents=latents, policy=FasterDiffusionPolicy.baseline(steps),
                control_images=images, controlnet_scales=SCALES)
    comps = tiny_components
    oracle = diffusers.StableDiffusionControlNetPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        controlnet=list(controlnets), scheduler=diffusers.DDIMScheduler.from_config(comps.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    oracle.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs
    with torch.no_grad():
        out = oracle(PROMPTS, image=images, controlnet_conditioning_scale=SCALES, height=SIZE, width=SIZE,
                     num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents),
                     output_type="np", callback_on_step_end=keep)
    want = final["latents"].numpy()
    assert_equals_diffusers(ours, want, (out.images * 255).round().astype(np.int16))
    assert ours.calls["controlnet_0"] == ours.calls["controlnet_1"] == steps  # every step, as diffusers


def test_fasterdiffusion_runs_the_controlnets_at_key_steps_only(pipe, tiny_components, controlnets, images):
    steps, latents = 20, unit_noise(1)
    ours = pipe(PROMPTS, steps=steps, scheduler="dpmpp-2m", latents=latents, control_images=images,
                controlnet_scales=SCALES)
    keys = default_key_steps(steps)
    assert ours.policy["key_steps"] == list(keys) and len(keys) < steps
    assert ours.calls["controlnet_0"] == ours.calls["controlnet_1"] == ours.calls["denoiser_encoder"] == len(keys)
    want = fd_reference.reference_fd_sample(tiny_components, PROMPTS, None, latents, "dpmpp-2m", steps, 7.5, keys,
                                            noise_injection=(0.003, 500), controls=controls(controlnets, images))
    assert relative_error(ours.latents, want) <= TOLERANCE
    # the comparison is sharp: without the ControlNets, or with them at every step, the result is far off
    plain = fd_reference.reference_fd_sample(tiny_components, PROMPTS, None, latents, "dpmpp-2m", steps, 7.5, keys,
                                             noise_injection=(0.003, 500))
    every = fd_reference.reference_fd_sample(tiny_components, PROMPTS, None, latents, "dpmpp-2m", steps, 7.5,
                                             range(steps), noise_injection=(0.003, 500),
                                             controls=controls(controlnets, images))
    assert relative_error(plain, want) > 10 * TOLERANCE and relative_error(every, want) > 10 * TOLERANCE


def test_control_image_and_scale_change_the_result(pipe, tiny_components, images):
    latents = unit_noise(2)
    first = pipe(PROMPTS[:1], steps=12, latents=latents[:1], control_images=images, controlnet_scales=SCALES)
    swapped = pipe(PROMPTS[:1], steps=12, latents=latents[:1], control_images=images[::-1], controlnet_scales=SCALES)
    assert relative_error(swapped.latents, first.latents) > 1e-3
    # scale 0 leaves the UNet alone: the reference without ControlNets
    off = pipe(PROMPTS[:1], steps=12, latents=latents[:1], control_images=images, controlnet_scales=[0.0])
    want = fd_reference.reference_fd_sample(tiny_components, PROMPTS[:1], None, latents[:1], "ddim", 12, 7.5,
                                            default_key_steps(12), noise_injection=(0.003, 500))
    assert relative_error(off.latents, want) <= TOLERANCE
    assert relative_error(first.latents, want) > 1e-3


def test_controlnets_with_an_init_image_equal_the_reference(pipe, tiny_components, controlnets, images):
    """Image to image and ControlNets together: key steps index the 25 steps that run of 50."""
    steps, strength, latents, init = 50, 0.5, unit_noise(3), random_image(3)
    ours = pipe(PROMPTS, steps=steps, latents=latents, seed=5, control_images=images, controlnet_scales=SCALES,
                init_image=init, strength=strength)
    keys = default_key_steps(25)
    assert ours.policy["key_steps"] == list(keys) and len(ours.timesteps) == 25
    assert ours.calls["controlnet_0"] == len(keys) and ours.calls["vae_encoder"] == 1
    want = fd_reference.reference_fd_sample(tiny_components, PROMPTS, None, latents, "ddim", steps, 7.5, keys,
                                            noise_injection=(0.003, 500), controls=controls(controlnets, images),
                                            init_latents=fd_reference.init_latents(
                                                tiny_components.vae, init, sample_noise(5, (1, 4, 16, 16)),
                                                len(PROMPTS)),
                                            strength=strength)
    assert relative_error(ours.latents, want) <= TOLERANCE


def test_manifest_records_each_controlnet(folder, controlnets):
    manifest = json.loads((folder / "manifest.json").read_text())
    records = manifest["controlnets"]
    assert [r["graph"] for r in records] == ["controlnet_0", "controlnet_1"] == graph_names(2)
    assert graph_names(1) == ["controlnet"]
    assert [r["source"]["kind"] for r in records] == ["generated", "local"]
    assert [r["source"]["weights_sha256"] for r in records] == [weights_sha256(c) for c in controlnets]
    assert all(r["conditioning_channels"] == 3 and r["conditioning_size"] == [SIZE, SIZE] for r in records)
    spec = manifest["components"]["controlnet_1"]
    inputs = [t["name"] for t in spec["inputs"]]
    assert inputs[:5] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert inputs[5:] == manifest["cache"]
    assert [t["name"] for t in spec["outputs"]] == ["controlled_" + name for name in manifest["cache"]]
    assert spec["check"]["max_rel_error"] <= spec["check"]["tolerance"]
    assert "vae_encoder" in manifest["components"]


# --- bad input: one line each ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    ({}, "built with 2 ControlNets (tiny-controlnet, "),
    ({"control_images": ["only-one.png"]}, "1 --control-image given, but this engine folder has 2 ControlNets"),
    ({"control_images": ["a.png", "b.png"], "controlnet_scales": [1.0, 1.0, 1.0]}, "3 --controlnet-scale values"),
    ({"control_images": ["a.png", "b.png"], "controlnet_scales": [float("nan")]}, "--controlnet-scale nan"),
    ({"control_images": ["missing.png", "b.png"]}, "--control-image missing.png: no such file"),
    ({"control_images": ["not-an-image.png", "b.png"]}, "is not a PNG, JPEG or WEBP image"),
])
def test_bad_control_inputs_are_one_line(pipe, tmp_path, monkeypatch, kwargs, fragment):
    monkeypatch.chdir(tmp_path)
    random_image(0).save("a.png")
    random_image(1).save("b.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(FdError) as error:
        pipe(PROMPTS[:1], steps=4, **kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_folder_without_controlnet_refuses_control_images():
    manifest = {"components": {}}  # what prepare_control reads: no "controlnets" record
    with pytest.raises(FdError, match="has no ControlNet: drop it, or rebuild with fd-build --controlnet"):
        prepare_control(manifest, ["a.png"], None, SIZE, SIZE)
    with pytest.raises(FdError, match="--controlnet-scale given, but this engine folder has no ControlNet"):
        prepare_control(manifest, None, [0.5], SIZE, SIZE)
    assert prepare_control(manifest, None, None, SIZE, SIZE) is None


def test_a_controlnet_for_another_unet_is_refused(tiny_components):
    from fd.builder.families.sd import make_tiny_v_components
    other = make_tiny_controlnet(make_tiny_v_components().unet)
    with pytest.raises(FdError, match="does not fit this model: its block_out_channels is"):
        check_fits(other, tiny_components.unet, "other")


def test_cli_generates_with_control_images_and_refuses_bad_ones(folder, tmp_path):
    random_image(0).save(tmp_path / "a.png")
    random_image(1).save(tmp_path / "b.png")
    common = ["--engine-dir", str(folder), "--prompt", "a cat", "--steps", "6", "--out", str(tmp_path / "o.png")]
    done = run_fd("fd.runtime.cli", *common, "--control-image", str(tmp_path / "a.png"), "--control-image",
                  str(tmp_path / "b.png"), "--controlnet-scale", "0.8", "--timings")
    assert done.returncode == 0, done.stderr
    assert "controlnet 0 " in done.stdout and (tmp_path / "o.png").is_file()
    done = run_fd("fd.runtime.cli", *common, "--control-image", str(tmp_path / "missing.png"))
    assert_one_line_error(done, "--control-image", "missing.png: no such file")
    done = run_fd("fd.builder.cli", "--model", "tiny", "--controlnet", str(tmp_path / "no-such-controlnet"),
                  "--out", str(tmp_path / "engines"))
    assert_one_line_error(done, "--controlnet", "no such folder")


def test_a_folder_whose_controlnet_records_disagree_is_refused(folder, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["controlnets"] = manifest["controlnets"][:1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FdError, match="controlnets names graphs \\['controlnet_0'\\], components holds ControlNet "
                                      "graphs \\['controlnet_0', 'controlnet_1'\\]"):
        FasterDiffusionPipeline(copy)


# --- SDXL: the ControlNet reads SDXL's added conditions too ---------------------------------------------

@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    from fd.builder.families.sdxl import make_tiny_xl_components
    comps = make_tiny_xl_components()
    out = build(BuildOptions(model="tiny-xl", controlnets=("tiny-controlnet",),
                             out=str(tmp_path_factory.mktemp("xl") / "engines")), log=lambda *_: None)
    return comps, make_tiny_controlnet(comps.unet), FasterDiffusionPipeline(out, threads=1)


def test_sdxl_controlnet_equals_diffusers_and_the_reference(xl, images):
    import diffusers
    comps, controlnet, pipe = xl
    steps, latents, image, scale = 8, unit_noise(4)[:1], images[0], 0.7
    assert pipe.manifest["controlnets"][0]["graph"] == "controlnet"  # one ControlNet: one graph of that name
    ours = pipe(PROMPTS[:1], steps=steps, latents=latents, policy=FasterDiffusionPolicy.baseline(steps),
                control_images=[image], controlnet_scales=[scale])
    oracle = diffusers.StableDiffusionXLControlNetPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet, controlnet=controlnet,
        scheduler=diffusers.DDIMScheduler.from_config(comps.scheduler_config), add_watermarker=False)
    oracle.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs
    with torch.no_grad():
        out = oracle(PROMPTS[:1], image=image, controlnet_conditioning_scale=scale, height=SIZE, width=SIZE,
                     num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents),
                     output_type="np", callback_on_step_end=keep)
    assert relative_error(ours.latents, final["latents"].numpy()) <= 1e-3
    want_pixels = (out.images * 255).round().astype(np.int16)
    assert np.abs(np.asarray(ours.images[0]).astype(np.int16) - want_pixels[0]).max() <= 2 and want_pixels.std() > 20
    # FasterDiffusion: the ControlNet at key steps only, as the reference
    steps = 20
    ours = pipe(PROMPTS[:1], steps=steps, latents=latents, control_images=[image], controlnet_scales=[scale])
    keys = default_key_steps(steps)
    assert ours.calls["controlnet"] == len(keys)
    want = fd_reference.reference_fd_sample_sdxl(comps, PROMPTS[:1], None, latents, "ddim", steps, 7.5, keys,
                                                 noise_injection=(0.003, 500),
                                                 controls=controls([controlnet], [image], [scale], rows=2))
    assert relative_error(ours.latents, want) <= TOLERANCE
