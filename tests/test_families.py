"""Every family end to end on ONNX Runtime, against diffusers and against the independent reference.

For `tiny` (SD 1.x), `tiny-v` (SD 2.x: v-prediction, upcast attention, linear projections) and `tiny-xl`
(SDXL: two text encoders, text_time conditions, zero negatives, size conditioning, fp32-upcast VAE):
- the baseline (--no-fd) equals the family's diffusers pipeline on the same components, scheduler,
  guidance and initial latents (latents within 1e-3 relative, pixels within 2/255), for DDIM and
  DPM-Solver++ 2M, with and without a negative prompt, two prompts in one batch;
- FasterDiffusion equals tests/fd_reference.py (not fd's code) within its tolerance.
"""
import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES, family_generating
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from tests import fd_reference
from tests.compare import assert_equals_diffusers
from tests.test_fd_reference import TOLERANCE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a painting of a cat"]
MODELS = ("tiny", "tiny-v", "tiny-xl")
STEPS = {"ddim": 12, "dpmpp-2m": 10}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("families")
    return {model: build(BuildOptions(model=model, max_batch_size=2, max_window=6, out=str(root / model)),
                         log=lambda *_: None) for model in MODELS}


@pytest.fixture(scope="module")
def components():
    return {model: family_generating(model)() for model in MODELS}  # the same seeded weights the builds used


@pytest.fixture(scope="module")
def pipes(folders):
    return {model: FasterDiffusionPipeline(folder, threads=1) for model, folder in folders.items()}




def initial_latents(pipe, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *pipe.latent_shape_at(None, None)), dtype=np.float32)


def diffusers_generate(comps, scheduler: str, steps: int, latents, negative_prompt):
    """diffusers' own pipeline: final latents and the uint8 image it returns."""
    cls = {"ddim": "DDIMScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler"}[scheduler]
    import diffusers
    pipe = FAMILIES[comps.family].diffusers_pipeline(comps, getattr(diffusers, cls).from_config(comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs
    with torch.no_grad():
        out = pipe(PROMPTS, negative_prompt=[negative_prompt] * 2 if negative_prompt else None, guidance_scale=7.5,
                   num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np",
                   callback_on_step_end=keep)
    return final["latents"].numpy(), (out.images * 255).round().astype(np.int16)


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
@pytest.mark.parametrize("model", MODELS)
def test_baseline_equals_the_diffusers_pipeline(pipes, components, model, scheduler, negative):
    pipe, steps = pipes[model], STEPS[scheduler]
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, negative_prompt=negative, steps=steps, scheduler=scheduler, latents=latents,
                policy=FasterDiffusionPolicy.baseline(steps))
    want_latents, want_pixels = diffusers_generate(components[model], scheduler, steps, latents, negative)
    assert_equals_diffusers(ours, want_latents, want_pixels)
    assert not np.allclose(ours.latents[0], ours.latents[1])  # two prompts, two images


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("dpmpp-2m", 20)])
@pytest.mark.parametrize("model", MODELS)
def test_fasterdiffusion_equals_the_reference(pipes, components, model, scheduler, steps, negative):
    pipe, comps = pipes[model], components[model]
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, negative_prompt=negative, steps=steps, scheduler=scheduler, latents=latents)
    assert ours.policy["key_steps"] == list(default_key_steps(steps))
    sample = fd_reference.reference_fd_sample_sdxl if comps.family == "sdxl" else fd_reference.reference_fd_sample
    want = sample(comps, PROMPTS, negative, latents, scheduler, steps, 7.5, default_key_steps(steps),
                  noise_injection=(0.003, 500))
    error = np.abs(ours.latents - want).max() / np.abs(want).max()
    assert error <= TOLERANCE, error
    # the FD path really differs from plain sampling here, by far more than the tolerance
    plain = sample(comps, PROMPTS, negative, latents, scheduler, steps, 7.5, range(steps))
    assert np.abs(plain - want).max() / np.abs(want).max() > 10 * TOLERANCE


def test_sdxl_size_conditioning_reaches_both_unet_halves(pipes):
    """original_size and crops_coords_top_left change the image (they feed the aug embedding)."""
    pipe = pipes["tiny-xl"]
    latents = initial_latents(pipe, batch=1)
    plain = pipe(PROMPTS[:1], steps=6, latents=latents).latents
    resized = pipe(PROMPTS[:1], steps=6, latents=latents, original_size=(512, 512)).latents
    cropped = pipe(PROMPTS[:1], steps=6, latents=latents, crops_coords_top_left=(64, 0)).latents
    assert np.abs(plain - resized).max() > 1e-3 and np.abs(plain - cropped).max() > 1e-3


def test_sdxl_folder_records_its_family_and_upcast_vae(folders):
    import json
    manifest = json.loads((folders["tiny-xl"] / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["family_options"] == {"force_zeros_for_empty_prompt": True}
    assert [t["file"] for t in manifest["tokenizers"]] == ["tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"]
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "denoiser_encoder", "denoiser_decoder",
                                           "vae_decoder"}
    encoder_inputs = [t["name"] for t in manifest["components"]["denoiser_encoder"]["inputs"]]
    decoder_inputs = [t["name"] for t in manifest["components"]["denoiser_decoder"]["inputs"]]
    assert encoder_inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert decoder_inputs[:4] == ["timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


def test_sdxl_fp16_folder_keeps_the_vae_in_fp32(tmp_path):
    from fd.builder.build import BuildOptions, build
    import json
    out = build(BuildOptions(model="tiny-xl", precision="fp16", out=str(tmp_path / "xl16")), log=lambda *_: None)
    specs = json.loads((out / "manifest.json").read_text())["components"]
    assert {t["dtype"] for t in specs["vae_decoder"]["inputs"] + specs["vae_decoder"]["outputs"]} == {"float32"}
    assert specs["denoiser_decoder"]["outputs"][0]["dtype"] == "float16"
    result = FasterDiffusionPipeline(out)(["a cat"], steps=4)
    assert np.isfinite(result.latents).all() and np.asarray(result.images[0]).std() > 0


# --- bad model folders: one line, non-zero exit, nothing left -----------------------------------------

@pytest.fixture(scope="module")
def tiny_xl_folder(tmp_path_factory, components):
    from fd.builder.families import save_pipeline_folder
    folder = tmp_path_factory.mktemp("models") / "tiny-xl"
    save_pipeline_folder(components["tiny-xl"], str(folder))
    return folder


def _without_text_encoder_2(folder):
    import shutil
    shutil.rmtree(folder / "text_encoder_2")


def _unsupported_pipeline(folder):
    import json
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))


def _class_embeddings(folder):
    import json
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))


@pytest.mark.parametrize("damage,fragment", [
    (_without_text_encoder_2, "has no 'text_encoder_2' folder"),
    (_unsupported_pipeline, "is a KandinskyV22Pipeline folder, which fd does not build"),
    (_class_embeddings, "class_embed_type='timestep'"),
])
def test_bad_sdxl_folders_are_one_line(tiny_xl_folder, tmp_path, damage, fragment):
    import shutil
    from tests.conftest import run_fd
    from tests.test_cli_errors import assert_one_line_error
    folder = tmp_path / "model"
    shutil.copytree(tiny_xl_folder, folder)
    damage(folder)
    done = run_fd("fd.builder.cli", "--model", str(folder), "--out", str(tmp_path / "engines" / "x"))
    assert_one_line_error(done, fragment)
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


def test_sdxl_folder_builds_and_runs_like_tiny_xl(tiny_xl_folder, folders, tmp_path):
    """A local SDXL folder is detected from model_index.json and gives the same engines as tiny-xl."""
    import json
    from fd.builder.build import BuildOptions, build
    out = build(BuildOptions(model=str(tiny_xl_folder), out=str(tmp_path / "xl")), log=lambda *_: None)
    local = json.loads((out / "manifest.json").read_text())
    generated = json.loads((folders["tiny-xl"] / "manifest.json").read_text())
    assert local["family"] == "sdxl" and local["source"]["kind"] == "local"
    assert local["source"]["weights_sha256"] == generated["source"]["weights_sha256"]


def test_onnxruntime_binding_path_equals_plain_session_run(folders):
    """The runner's IOBinding/OrtValue path gives exactly what onnxruntime's plain session.run gives."""
    from fd.builder import export
    runner = FasterDiffusionPipeline(folders["tiny-xl"]).runner
    rng = np.random.default_rng(0)
    for graph, spec in runner.specs.items():
        feeds = export.random_inputs(spec, 2, rng, 100)
        bound = runner.run(graph, feeds)
        plain = runner.sessions[graph].run([t["name"] for t in spec["outputs"]], feeds)
        for tensor, want in zip(spec["outputs"], plain):
            np.testing.assert_array_equal(runner.download(bound[tensor["name"]]), want)
    a, b = runner.upload(np.ones((2, 3), np.float32), "float32"), runner.upload(np.zeros((2, 1), np.float32), "float32")
    np.testing.assert_array_equal(runner.download(runner.concat([a, b], axis=-1)), [[1, 1, 1, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(runner.download(runner.zeros_like(a)), np.zeros((2, 3)))
