"""Image sizes: a folder built with --dynamic-shape runs at any size in its range that the model's
downsampling divides (and equals diffusers there); a folder built for one size refuses others."""
import json

import numpy as np
import pytest

from fd.builder.build import BuildOptions, build
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy
from tests.test_pipeline import PROMPT, diffusers_run


@pytest.fixture(scope="module")
def dynamic_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-dynamic"
    return build(BuildOptions(model="tiny", out=str(out), backend_options={"dynamic_shape": "64:256"}),
                 log=lambda *_: None)


@pytest.fixture(scope="module")
def dynamic_pipe(dynamic_engine):
    return FasterDiffusionPipeline(dynamic_engine)


def test_manifest_records_the_range(dynamic_engine):
    manifest = json.loads((dynamic_engine / "manifest.json").read_text())
    assert manifest["dynamic_shape"] == {"min": 64, "max": 256}
    assert (manifest["height"], manifest["width"]) == (128, 128)  # the size TensorRT would tune for
    # the build checked each image-like graph at the built size and at the range's smallest side
    for name in ("denoiser_encoder", "denoiser_decoder", "vae_decoder"):
        assert manifest["components"][name]["check"]["sizes"] == [[128, 128], [64, 64]]


def test_baseline_at_another_size_equals_diffusers(dynamic_pipe, tiny_components):
    """192x128 is not the built 128x128: the graphs' spatial axes must really be dynamic."""
    steps, latents = 10, np.random.default_rng(5).standard_normal((1, 4, 24, 16), dtype=np.float32)
    ours = dynamic_pipe([PROMPT], steps=steps, latents=latents, height=192, width=128,
                        policy=FasterDiffusionPolicy.baseline(steps))
    options = {"height": 192, "width": 128}
    want_latents = diffusers_run(tiny_components, "ddim", steps, latents, "latent", **options).numpy()
    want_pixels = (diffusers_run(tiny_components, "ddim", steps, latents, "np", **options)[0] * 255).round()
    assert np.abs(ours.latents - want_latents).max() <= 1e-4 * np.abs(want_latents).max()
    got_pixels = np.asarray(ours.images[0]).astype(np.int16)
    assert got_pixels.shape == want_pixels.shape == (192, 128, 3)
    assert np.abs(got_pixels - want_pixels.astype(np.int16)).max() <= 2


@pytest.mark.parametrize("height,width", [(64, 256), (256, 64)])
def test_fd_runs_at_the_range_ends(dynamic_pipe, height, width):
    result = dynamic_pipe([PROMPT], steps=20, seed=1, height=height, width=width)
    assert result.images[0].size == (width, height) and result.latents.shape == (1, 4, height // 8, width // 8)
    assert np.isfinite(result.latents).all() and result.calls["denoiser_encoder"] == 7


@pytest.mark.parametrize("height,width,fragment", [
    (320, 128, "height 320 is outside"),  # past the range
    (128, 96, "width 96 is outside"),  # inside it, but the UNet cannot halve 12 latent rows three times
])
def test_sizes_the_graphs_cannot_take_are_refused(dynamic_pipe, height, width, fragment):
    with pytest.raises(FdError, match=fragment) as info:
        dynamic_pipe([PROMPT], steps=2, height=height, width=width)
    assert "multiples of 64 from 64 to 256" in str(info.value)


def test_static_folder_refuses_another_size_with_the_rebuild_command(tiny_engine):
    with pytest.raises(FdError) as info:
        FasterDiffusionPipeline(tiny_engine)([PROMPT], steps=2, height=256, width=128)
    message = str(info.value)
    assert "built for 128x128 only, not 256x128" in message
    assert "fd-build --model tiny --backend onnxruntime --precision fp32 --height 256 --width 128" in message


def test_latents_of_another_size_point_at_height_and_width(dynamic_pipe):
    latents = np.zeros((1, 4, 24, 16), np.float32)
    with pytest.raises(FdError, match=r"a 128x128 image needs \(1, 4, 16, 16\).*give --height/--width"):
        dynamic_pipe([PROMPT], steps=2, latents=latents)
    assert dynamic_pipe([PROMPT], steps=2, latents=latents, height=192, width=128).images[0].size == (128, 192)


def test_rebuild_command_keeps_controlnets_and_img2img():
    from fd.runtime.sizes import rebuild_command
    manifest = {"source": {"model": "tiny"}, "backend": "onnxruntime", "precision": "fp32", "height": 128,
                "width": 128, "limits": {"max_batch_size": 1, "max_window": 15},
                "controlnets": [{"source": {"model": "tiny-controlnet"}}, {"source": {"path": "/m/canny"}}],
                "components": {"vae_encoder": {}}}
    command = rebuild_command(manifest, "engines/x", 192, 128)
    assert command.endswith("--controlnet tiny-controlnet --controlnet /m/canny --img2img --out engines/x --force")
    assert "--height 192 --width 128" in command
