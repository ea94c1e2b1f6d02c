"""Text to video end to end on tiny-animatediff (UNetMotionModel) and tiny-t2v (UNet3DConditionModel), CPU, ONNX
Runtime, 3 frames per video:

- the split: encoder → decoder equals diffusers' own forward of the video UNet (fp32, 1e-5), a cache whose frames
  are out of order misses it (the temporal layers are in the graphs), one decoder call over k timesteps equals k
  calls;
- the baseline (--no-fd) equals diffusers' AnimateDiffPipeline / TextToVideoSDPipeline on the same components,
  scheduler and initial latents (latents within 1e-3 relative, frames within 2/255);
- FasterDiffusion equals the independent reference loop below, which runs diffusers' own video UNet forward (its
  encoder outputs caught and replayed through hooks; no fd split, no fd runtime), and wrong variants miss it;
- fd-run writes .gif, .mp4 (imageio-ffmpeg, where installed) and PNG-frame folders, --latents / --save-latents in
  diffusers' (1, C, F, h, w) layout; fd-serve's service answers with the clip; fd-bench reports s/video and the
  decoder's batch; the FLOP split adds up to the whole video UNet;
- saved pipeline folders and the `animatediff` alias (SD + motion adapter) load; bad input is one line.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES, family_generating
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy, default_key_steps
from tests import fd_reference
from tests.compare import pixels, relative_error
from tests.conftest import run_fd
from tests.test_cli_errors import assert_nothing_left, assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

FRAMES = 3  # not a power of two: a frame / row mix-up changes shapes or numbers
MODELS = {"animatediff": "tiny-animatediff", "t2v": "tiny-t2v"}
PROMPTS = ["a cat", "a photo of a dog"]
# FD against the reference, relative to the largest latent (fp32, ONNX Runtime vs torch): measured 1.1e-6 on
# tiny-animatediff; the nearest wrong variant is 50x this
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=list(MODELS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def comps(family):
    comps = family_generating(MODELS[family])()  # the same seeded weights the build uses
    comps.options["frames"] = FRAMES
    return comps


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("video") / MODELS[family]
    return build(BuildOptions(model=MODELS[family], frames=FRAMES, max_batch_size=2, max_window=6, out=str(out)),
                 log=lambda *_: None)


@pytest.fixture(scope="module")
def pipe(folder):
    return FasterDiffusionPipeline(folder, threads=1)


def initial_latents(pipe, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *pipe.latent_shape_at(None, None)), dtype=np.float32)


def unet_forward(comps, sample, t, text):
    """diffusers' own forward as its pipeline calls it: AnimateDiffPipeline repeats the text per frame before the
    UNet, UNet3DConditionModel repeats it inside."""
    if comps.family == "animatediff":
        text = text.repeat_interleave(sample.shape[2], dim=0)
    return comps.unet(sample, t, encoder_hidden_states=text).sample


# --- the split ---------------------------------------------------------------------------------------

def test_split_equals_the_full_forward(comps):
    encoder, decoder = FAMILIES[comps.family].denoiser_halves(comps, torch.float32)
    generator = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, FRAMES, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([901.0, 41.0])
    with torch.no_grad():
        full = torch.cat([unet_forward(comps, sample[r:r + 1], t[r], text[r:r + 1]) for r in range(2)])
        cache = encoder(sample, t, text)
        ours = decoder(t, text, *cache)
        shuffled = decoder(t, text, *(c.roll(1, dims=1) for c in cache))  # frames out of order
    assert ours.shape == full.shape == (2, 4, FRAMES, 16, 16)
    assert [tuple(c.shape[:2]) for c in cache] == [(2, FRAMES)] * len(cache)
    assert (ours - full).abs().max() <= 1e-5 * full.abs().max()
    # the temporal layers see the order of the frames: rolled frames do not come back as the rolled output
    assert (shuffled - full.roll(1, dims=2)).abs().max() > 1e-2 * full.abs().max()


def test_one_decoder_call_over_k_timesteps_equals_k_calls(comps):
    encoder, decoder = FAMILIES[comps.family].denoiser_halves(comps, torch.float32)
    generator = torch.Generator().manual_seed(2)
    sample, text = torch.randn(2, 4, FRAMES, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timesteps = [901.0, 801.0, 701.0]
    with torch.no_grad():
        cache = encoder(sample, torch.full((2,), 901.0), text)
        batched = decoder(torch.tensor(timesteps).repeat_interleave(2), text.repeat(3, 1, 1),
                          *(c.repeat(3, *[1] * (c.dim() - 1)) for c in cache))
        single = [decoder(torch.full((2,), t), text, *cache) for t in timesteps]
    for k, one in enumerate(single):
        assert (batched[2 * k:2 * k + 2] - one).abs().max() <= 1e-5 * one.abs().max()
    assert (single[0] - single[2]).abs().max() > 1e-2 * single[0].abs().max()  # each row's own timestep matters


def test_a_manifest_with_weight_files_over_2_gib_loads(folder, family, tmp_path):
    """An AnimateDiff-sized decoder keeps 3 GB of weights in its .onnx.data: the manifest's byte counts take it."""
    import shutil

    from fd.runtime.manifest import load_manifest
    if family != "animatediff":
        pytest.skip("a manifest rule")
    shutil.copytree(folder, tmp_path / "f")
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    manifest["backend_info"]["file_bytes"]["denoiser_decoder.onnx.data"] = 3_052_139_520
    (tmp_path / "f" / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(tmp_path / "f")["frames"] == FRAMES


def test_folder_records_frames_and_the_video_layout(folder, family):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["family"] == family and manifest["frames"] == FRAMES
    specs = manifest["components"]
    assert specs["denoiser_encoder"]["inputs"][0]["shape"] == ["batch", 4, FRAMES, 16, 16]
    assert specs["denoiser_decoder"]["outputs"][0]["shape"] == ["batch", 4, FRAMES, 16, 16]
    assert specs["denoiser_decoder"]["inputs"][2]["shape"][:2] == ["batch", FRAMES]  # mid, per video
    assert specs["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, FRAMES, 128, 128]
    flops = manifest["flops_per_sample"]
    assert flops["denoiser_encoder"] > 0 and flops["denoiser_decoder"] > 0


# --- baseline against diffusers' video pipelines -----------------------------------------------------

def diffusers_generate(comps, scheduler: str, steps: int, latents, guidance_scale: float):
    family = FAMILIES[comps.family]
    pipe = family.diffusers_pipeline(comps, fd_reference.make_scheduler(scheduler, comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        frames, final = family.diffusers_video(pipe, PROMPTS, torch.from_numpy(latents.copy()), steps=steps,
                                              guidance_scale=guidance_scale, height=128, width=128)
    return final.numpy(), (np.asarray(frames) * 255).round().astype(np.int16)


@pytest.mark.parametrize("scheduler,steps", [("ddim", 8), ("dpmpp-2m", 6)])
def test_baseline_equals_the_diffusers_pipeline(pipe, comps, scheduler, steps):
    if comps.family == "t2v" and scheduler != "ddim":
        pytest.skip("the multistep solver's history is the family-independent part: one family is enough")
    latents = initial_latents(pipe)
    ours = pipe(PROMPTS, steps=steps, scheduler=scheduler, latents=latents, policy=FasterDiffusionPolicy.baseline(steps))
    guidance = pipe.family.default_guidance_scale  # 7.5 AnimateDiff, 9.0 text-to-video: each pipeline's default
    want_latents, want_frames = diffusers_generate(comps, scheduler, steps, latents, guidance)
    assert ours.latents.shape == (2, 4, FRAMES, 16, 16)
    assert relative_error(ours.latents, want_latents) <= 1e-3
    got = np.stack([pixels(frames) for frames in ours.videos])
    assert got.shape == want_frames.shape == (2, FRAMES, 128, 128, 3)
    assert np.abs(got - want_frames).max() <= 2 and want_frames.std() > 20
    assert [image.size for image in ours.images] == [(128, 128)] * 2  # each video's first frame


# --- FasterDiffusion against an independent reference ------------------------------------------------

def encoder_modules(unet) -> list:
    """The modules whose outputs FasterDiffusion caches, as diffusers' forward calls them: the first skip (conv_in,
    or UNet3D's transformer_in after it), every down block (its hidden state and skips) and the mid block."""
    first = unet.transformer_in if getattr(unet, "transformer_in", None) is not None else unet.conv_in
    return [first, *unet.down_blocks, unet.mid_block]


def reference_encode(comps, sample, t, text) -> list:
    caught = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: caught.append(out)) for m in encoder_modules(comps.unet)]
    try:
        unet_forward(comps, sample, t, text)
    finally:
        for hook in hooks:
            hook.remove()
    return caught


def reference_decode(comps, cache: list, t, text, shape):
    """diffusers' forward at timestep t with every encoder output replaced by the cached one (hooks return them):
    the up blocks and conv_out run on the cache with t's own embedding; the latent is never read."""
    hooks = [m.register_forward_hook(lambda _m, _i, _out, value=value: value)
             for m, value in zip(encoder_modules(comps.unet), cache)]
    try:
        return unet_forward(comps, torch.zeros(shape), t, text)
    finally:
        for hook in hooks:
            hook.remove()


def reference_video_fd(comps, latents, prompts, scheduler_name, steps, guidance_scale, key_steps,
                       noise_injection=(0.003, 500),
                       decode_with_key_timestep=False):
    """FasterDiffusion on diffusers' video UNet, one decoder call per step, diffusers' scheduler and text encoding."""
    family = FAMILIES[comps.family]
    scheduler = fd_reference.make_scheduler(scheduler_name, comps.scheduler_config)
    pipe = family.diffusers_pipeline(comps, scheduler)
    guided = guidance_scale > 1.0
    noise = torch.from_numpy(np.asarray(latents, np.float32))
    z = noise * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(prompts, "cpu", 1, guided, None)
        text = torch.cat([negative, positive]) if guided else positive
        for i, t in enumerate(scheduler.timesteps):
            if i in set(key_steps) | {0}:
                t_key = t
                sample = scheduler.scale_model_input(torch.cat([z, z]) if guided else z, t)
                cache = reference_encode(comps, sample, t, text)
            eps = reference_decode(comps, cache, t_key if decode_with_key_timestep else t, text,
                                   (len(text), *z.shape[1:]))
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            if noise_injection is not None and t < noise_injection[1]:
                z = z + noise_injection[0] * noise
            z = scheduler.step(eps, t, z, return_dict=False)[0]
    return z.numpy()


def test_fasterdiffusion_equals_the_reference(pipe, comps):
    """DDIM-12 with the paper's rule (key steps 0, 1, 2, 3, 5, 10: windows of 1, 1, 1, 2, 5, 2 steps), noise injection
    below tau 500, the family's default guidance; one video (the baseline test covers two)."""
    steps, latents = 12, initial_latents(pipe, batch=1)
    ours = pipe(PROMPTS[:1], steps=steps, latents=latents)
    keys = default_key_steps(steps)
    assert ours.policy["key_steps"] == list(keys) and ours.policy["noise_injection"]["tau"] == 500
    assert ours.calls["denoiser_encoder"] == len(keys) and ours.calls["denoiser_decoder"] == len(keys)
    assert ours.rows["denoiser_decoder"] == 2 * steps  # one row per guidance half and step: each row F frames
    guidance = pipe.family.default_guidance_scale
    want = reference_video_fd(comps, latents, PROMPTS[:1], "ddim", steps, guidance, keys)
    assert relative_error(ours.latents, want) <= TOLERANCE
    # measured: 5e-4 / 1.5e-3 (tau 300) and 1.1e-3 / 1.1e-3 (key timestep) from the right result (AnimateDiff / t2v);
    # text-to-video checks one of them (CI time)
    wrongs = [{"decode_with_key_timestep": True}, {"noise_injection": (0.003, 300)}]
    for wrong in wrongs if comps.family == "animatediff" else wrongs[:1]:
        variant = reference_video_fd(comps, latents, PROMPTS[:1], "ddim", steps, guidance, keys, **wrong)
        assert relative_error(ours.latents, variant) > 20 * TOLERANCE, wrong


# --- fd-run: clips, latents ---------------------------------------------------------------------------

def test_fd_run_writes_clips_and_video_latents(folder, family, tmp_path):
    from PIL import Image

    from fd.runtime.cli import main as fd_run
    if family != "animatediff":
        pytest.skip("the command line is the same for every video family")
    args = ["--engine-dir", str(folder), "--prompt", "a cat", "--steps", "4"]
    assert fd_run([*args, "--out", str(tmp_path / "clip.gif"), "--save-latents", str(tmp_path / "z.npy")]) == 0
    with Image.open(tmp_path / "clip.gif") as gif:
        assert (gif.n_frames, gif.size) == (FRAMES, (128, 128))
    saved = np.load(tmp_path / "z.npy")
    assert saved.shape == (1, 4, FRAMES, 16, 16)
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal(saved.shape, dtype=np.float32))
    assert fd_run([*args, "--latents", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "frames"),
                   "--save-latents", str(tmp_path / "z2.npy")]) == 0
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame-00{i}.png" for i in range(FRAMES)]
    np.testing.assert_array_equal(np.load(tmp_path / "z2.npy"), saved)  # --seed 0's noise, given as latents
    try:
        import imageio_ffmpeg
    except ImportError:
        return
    assert fd_run([*args, "--out", str(tmp_path / "clip.mp4")]) == 0
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "clip.mp4"))
    assert next(reader)["size"] == (128, 128) and sum(1 for _ in reader) == FRAMES


def test_fd_serve_returns_the_clip(pipe, family):
    """The service batches two requests into one generation (a row per video) and answers each with its clip: an
    animated GIF of F frames whose first frame is the request's own, as a lone run makes it."""
    import io

    from PIL import Image

    from fd.serve.api import parse_image_request
    from fd.serve.app import image_response
    from fd.serve.service import ImageService
    from tests.compare import pixels as as_pixels
    if family != "animatediff":
        pytest.skip("the service is the same for every video family")
    service = ImageService(str(pipe.engine_dir), pipeline=pipe)
    bodies = [json.dumps({"prompt": prompt, "seed": seed, "steps": 4}).encode() for prompt, seed in
              (("a cat", 1), ("a dog", 2))]
    outcomes = service.run([service.prepare(parse_image_request(body)) for body in bodies])
    assert [(o.status, o.batch_size) for o in outcomes] == [(200, 2)] * 2
    for outcome, prompt, seed in zip(outcomes, ("a cat", "a dog"), (1, 2)):
        with Image.open(io.BytesIO(outcome.clip)) as gif:
            assert (gif.format, gif.n_frames) == ("GIF", FRAMES)
        alone = pipe([prompt], steps=4, seed=seed)
        assert np.abs(as_pixels([Image.open(io.BytesIO(outcome.png))]) - as_pixels(alone.images[:1])).max() <= 2
        response = image_response(outcome, as_json=False)
        assert response.media_type == "image/gif" and response.body == outcome.clip
        answer = json.loads(image_response(outcome, as_json=True).body)
        assert answer["video_media_type"] == "image/gif" and answer["video"] and answer["image"]


def test_fd_bench_reports_seconds_per_video_and_the_decoder_batch(folder, family, tmp_path):
    from fd.benchmarks.cli import main as fd_bench
    if family != "animatediff":
        pytest.skip("the benchmark is the same for every video family")
    assert fd_bench(["--engine-dir", str(folder), "--steps", "6", "--uniform", "3", "--runs", "1", "--warmup", "0",
                     "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["engine"]["frames"] == FRAMES and r["flop_floor"]["unet_speedup"] > 1
    # windows of 3 steps, guided: 3 steps x 2 halves x 1 video = 6 rows, each FRAMES frames, in one decoder call
    assert r["decoder_batch"] == {"rows": 6, "frames_per_row": FRAMES, "frames": 6 * FRAMES}
    assert r["arms"]["fasterdiffusion"]["calls"]["denoiser_decoder"] == 2 and r["arms"]["fasterdiffusion"]["peak_rss_bytes"]
    assert f"s/video ({FRAMES} frames) median" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("model", list(MODELS.values()))
def test_flop_split_of_a_video_model_adds_up_to_the_whole_unet(model, family, tmp_path):
    """Counted on the meta device: the halves' FLOPs per video add up to diffusers' whole forward (nothing is
    counted twice or left out), and the floor follows."""
    from fd.benchmarks.flop_split import main as flop_split
    if family != "animatediff":
        pytest.skip("counted once per model")
    assert flop_split(["--model", model, "--frames", str(FRAMES), "--size", "128", "--steps", "20",
                       "--json", str(tmp_path / "f.json")]) == 0
    (row,) = json.loads((tmp_path / "f.json").read_text())["sizes"]
    halves = row["denoiser_encoder"]["flops"] + row["denoiser_decoder"]["flops"]
    assert row["latent"] == [4, FRAMES, 16, 16] and abs(halves - row["unet"]["flops"]) <= 1e-3 * halves
    assert 1 < row["floor"] < 20 / 7


# --- local folders ---------------------------------------------------------------------------------

def test_a_saved_pipeline_folder_loads_as_the_generated_model(comps, tmp_path):
    """An AnimateDiffPipeline / TextToVideoSDPipeline folder is found by its model_index.json and loads the same
    weights (what fd-build --model DIR exports)."""
    from fd.builder.families import save_pipeline_folder
    from fd.builder.models import load_components, weights_fingerprint
    save_pipeline_folder(comps, str(tmp_path / "model"))
    loaded = load_components(str(tmp_path / "model"))
    assert loaded.family == comps.family and type(loaded.unet) is type(comps.unet)
    assert loaded.source["weights_sha256"] == weights_fingerprint(comps)


def test_the_animatediff_alias_combines_sd_and_the_motion_adapter(tiny_folder, tmp_path, monkeypatch, family):
    """`--model animatediff` takes SD1.5 and the motion adapter from the local cache (here: tiny's SD folder and a
    saved adapter standing in for the two snapshots) and combines them as AnimateDiffPipeline does."""
    from diffusers import MotionAdapter

    from fd.builder import models
    from fd.builder.families.video import ANIMATEDIFF_SCHEDULER_CONFIG
    if family != "animatediff":
        pytest.skip("an AnimateDiff alias")
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(32, 32, 64, 64), motion_norm_num_groups=8, motion_num_attention_heads=2)
    adapter.save_pretrained(tmp_path / "adapter")
    snapshots = {"stable-diffusion-v1-5/stable-diffusion-v1-5": str(tiny_folder),
                 "guoyww/animatediff-motion-adapter-v1-5-2": str(tmp_path / "adapter")}
    monkeypatch.setattr(models, "_hub_snapshot", lambda repo_id, model: snapshots[repo_id])
    comps = models.load_components("animatediff")
    assert comps.family == "animatediff" and type(comps.unet).__name__ == "UNetMotionModel"
    assert comps.scheduler_config == ANIMATEDIFF_SCHEDULER_CONFIG and comps.source["repo_ids"] == list(snapshots)
    ours = dict(comps.unet.named_parameters())
    for name, weight in adapter.down_blocks[1].motion_modules.named_parameters():  # the adapter's, in the UNet
        assert torch.equal(ours[f"down_blocks.1.motion_modules.{name}"], weight)


# --- bad input: one line each ------------------------------------------------------------------------

@pytest.mark.parametrize("out,fragment", [
    ("x.png", "a video folder writes a .gif, an .mp4 or a folder of PNG frames"),
])
def test_bad_video_outputs_are_one_line(folder, family, tmp_path, out, fragment):
    if family != "animatediff":
        pytest.skip("the command line is the same for every video family")
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folder), "--prompt", "a", "--out", str(tmp_path / out))
    assert_one_line_error(done, fragment)
    assert not any(tmp_path.iterdir())


def test_mp4_without_an_encoder_is_one_line(folder, family, tmp_path, monkeypatch, capsys):
    from fd.runtime.cli import main as fd_run
    if family != "animatediff":
        pytest.skip("the command line is the same for every video family")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if the video extra were not installed
    assert fd_run(["--engine-dir", str(folder), "--prompt", "a", "--out", str(tmp_path / "c.mp4")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --out …mp4 needs an MP4 encoder, which is not installed: pip install "
        "'fasterdiffusion-engines[video]' (imageio-ffmpeg), or write a .gif or a folder of PNG frames"]
    assert not any(tmp_path.iterdir())


def test_image_shaped_latents_are_one_line(folder, family, tmp_path):
    if family != "animatediff":
        pytest.skip("the command line is the same for every video family")
    np.save(tmp_path / "z.npy", np.zeros((1, 4, 16, 16), np.float32))
    done = run_fd("fd.runtime.cli", "--engine-dir", str(folder), "--prompt", "a", "--latents", str(tmp_path / "z.npy"),
                  "--out", str(tmp_path / "c.gif"))
    assert_one_line_error(done, f"(1, 4, {FRAMES}, 16, 16)", "batch x channels x frames x height/8 x width/8")


@pytest.mark.parametrize("args,fragment", [
    (["--model", "tiny", "--frames", "8"], "--frames applies to video families"),
    (["--model", "tiny-animatediff", "--frames", "0"], "--frames 0 is out of range"),
    (["--model", "tiny-animatediff", "--frames", "33"], "use 1 to 32 (this motion adapter's motion_max_seq_length)"),
    (["--model", "tiny-animatediff", "--img2img"], "--img2img is for UNet families"),
    (["--model", "animatediff"], "not in the local Hugging Face cache"),
])
def test_bad_video_builds_are_one_line(tmp_path, family, capfd, args, fragment):
    """fd-build in this process (a fresh interpreter per case costs CI ~20 s each); capfd also sees what libraries
    print straight to the process's stderr."""
    from fd.builder.cli import main as fd_build
    if family != "animatediff":
        pytest.skip("one family is enough")
    assert fd_build([*args, "--out", str(tmp_path / "engines" / "x")]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert_nothing_left(tmp_path / "engines")
