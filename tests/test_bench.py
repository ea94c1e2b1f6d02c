"""fd-bench: the JSON record of a tiny run, the diffusers arm, Ctrl-C, and the fidelity metrics.

No test asserts a speed: timings on a shared CI box are noise. They check structure, call counts, the
FLOP-floor arithmetic and that the image metrics are right.
"""
import json
import math
import shutil

import numpy as np
import pytest

from fd.benchmarks import bench, cli, fidelity
from fd.benchmarks.report import json_safe

# --- fd-bench on the tiny engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(tiny_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["--engine-dir", str(tiny_engine), "--runs", "1", "--warmup", "0", "--steps", "20",
                     "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--plot", str(out / "r.png")])
    assert code == 0
    return out


def test_json_record_has_both_arms_and_every_section(tiny_report, tiny_engine):
    r = json.loads((tiny_report / "r.json").read_text())
    assert r["schema"] == "fd-bench/1" and r["complete"] is True
    assert r["command"].startswith("fd-bench --engine-dir ")
    for key in ("created", "machine", "versions", "engine", "settings", "arms", "speedup", "flop_floor",
                "fidelity", "memory"):
        assert key in r, key
    assert r["machine"]["logical_cores"] >= 1 and "onnxruntime" in r["versions"]
    assert r["engine"]["backend"] == "onnxruntime" and (r["settings"]["height"], r["settings"]["width"]) == (128, 128)
    assert set(r["arms"]) == {"baseline", "fasterdiffusion"}
    for arm in r["arms"].values():
        assert arm["runs_measured"] == 1 and len(arm["runs"]) == 1
        assert set(arm["seconds_per_image"]) == {"median", "min", "max", "n"}
        assert set(arm["stage_seconds_median"]) == {"text_encoder", "denoiser_encoder", "denoiser_decoder", "scheduler",
                                                    "vae_decoder", "other", "total"}
        assert arm["peak_rss_bytes"] > 0
    for name in ("fd_over_baseline", "fd_over_baseline_unet"):
        assert r["speedup"][name]["n"] == 1 and r["speedup"][name]["median"] > 0


def test_call_counts_follow_the_key_steps(tiny_report):
    r = json.loads((tiny_report / "r.json").read_text())
    base, fd = r["arms"]["baseline"], r["arms"]["fasterdiffusion"]
    assert base["calls"]["denoiser_encoder"] == base["calls"]["denoiser_decoder"] == 20
    assert fd["policy"]["key_steps"] == r["settings"]["key_steps"] == [0, 1, 2, 3, 5, 10, 15]
    assert fd["calls"]["denoiser_encoder"] == 7 and fd["calls"]["denoiser_decoder"] == 7  # windows ≤ max window 15
    assert base["policy"]["noise_injection"] is None and fd["policy"]["noise_injection"] is not None


def test_flop_floor_is_the_formula_on_the_manifest_flops(tiny_report, tiny_engine):
    r = json.loads((tiny_report / "r.json").read_text())
    flops = json.loads((tiny_engine / "manifest.json").read_text())["flops_per_sample"]
    e, d = flops["denoiser_encoder"], flops["denoiser_decoder"]
    floor = r["flop_floor"]
    assert floor["key_steps"] == 7 and floor["steps"] == 20
    assert floor["unet_speedup"] == pytest.approx(20 * (e + d) / (7 * e + 20 * d))
    measured = r["speedup"]["fd_over_baseline"]["median"]
    assert floor["fraction_of_floor"] == pytest.approx(measured / floor["unet_speedup"])


def test_flop_floor_counts_the_rows_a_guidance_interval_skips(tiny_engine, tmp_path):
    code = cli.main(["--engine-dir", str(tiny_engine), "--runs", "1", "--warmup", "0", "--steps", "50",
                     "--guidance-interval", "paper", "--json", str(tmp_path / "r.json")])
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    flops = json.loads((tiny_engine / "manifest.json").read_text())["flops_per_sample"]
    e, d = flops["denoiser_encoder"], flops["denoiser_decoder"]
    assert r["arms"]["fasterdiffusion"]["rows"]["denoiser_encoder"] == 14  # 9 key steps, 4 of them unguided
    assert r["arms"]["fasterdiffusion"]["rows"]["denoiser_decoder"] == 87  # 50 steps, 13 of them unguided
    assert r["flop_floor"]["counted"] == "rows"
    assert r["flop_floor"]["unet_speedup"] == pytest.approx((100 * e + 100 * d) / (14 * e + 87 * d))
    assert r["flop_floor"]["unet_speedup"] > 1.05 * bench.flop_floor(flops, 50, 9)  # more than key steps alone


def test_fidelity_of_the_pair_is_finite_and_in_range(tiny_report):
    f = json.loads((tiny_report / "r.json").read_text())["fidelity"]["fasterdiffusion_vs_baseline"]
    assert math.isfinite(f["psnr_db"]) and 0 < f["psnr_db"] < 200  # noise injection: never identical
    assert 0.9 < f["ssim"] < 1  # close to the baseline (0.9998 on tiny DDIM-20) but not identical
    assert math.isfinite(f["max_abs_latent_diff"]) and f["max_abs_latent_diff"] > 0


def test_markdown_and_plot_are_written(tiny_report):
    text = (tiny_report / "r.md").read_text()
    assert "| baseline |" in text and "| FasterDiffusion |" in text and "FLOP floor" in text
    assert (tiny_report / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_torch_thread():
    """torch's OpenMP threads can stall for seconds on a busy 2-core box; one thread is steady."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compare_diffusers_adds_a_third_arm(tiny_engine, tmp_path, one_torch_thread):
    code = cli.main(["--engine-dir", str(tiny_engine), "--runs", "1", "--warmup", "0", "--steps", "4",
                     "--compare", "diffusers", "--json", str(tmp_path / "r.json")])
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    arm = r["arms"]["diffusers"]
    assert arm["runs_measured"] == 1 and arm["calls"] == {"unet": 4} and arm["device"] == "cpu"
    assert {"fd_over_diffusers", "baseline_over_diffusers"} <= set(r["speedup"])
    same = r["fidelity"]["diffusers_vs_baseline"]  # the same sampler on the same weights and latents
    assert same["psnr_db"] == "inf" or same["psnr_db"] > 40
    assert same["max_abs_latent_diff"] < 1e-3


@pytest.fixture(scope="module")
def tiny_xl_engine(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("engines") / "tiny-xl-fp32-onnxruntime"
    return build(BuildOptions(model="tiny-xl", out=str(out)), log=lambda *_: None)


def test_sdxl_baseline_equals_diffusers_sdxl_pipeline(tiny_xl_engine, tmp_path, one_torch_thread):
    """On an SDXL folder the diffusers arm is StableDiffusionXLPipeline with no negative prompt (zero
    unconditional embeddings); fd's baseline, from the same latents, must give its latents and pixels."""
    code = cli.main(["--engine-dir", str(tiny_xl_engine), "--runs", "1", "--warmup", "0", "--steps", "4",
                     "--compare", "diffusers", "--json", str(tmp_path / "r.json")])
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["engine"]["family"] == "sdxl"
    arm = r["arms"]["diffusers"]
    assert arm["pipeline"] == "StableDiffusionXLPipeline" and arm["calls"] == {"unet": 4}
    assert r["arms"]["baseline"]["calls"]["text_encoder_2"] == 1
    same = r["fidelity"]["diffusers_vs_baseline"]
    assert same["psnr_db"] == "inf" or same["psnr_db"] > 40
    assert same["max_abs_latent_diff"] < 1e-3
    differs = r["fidelity"]["fasterdiffusion_vs_baseline"]  # FD skips the encoder: the check can tell them apart
    assert differs["max_abs_latent_diff"] > 1e-2


def test_sdxl_diffusers_arm_with_an_empty_negative_prompt_differs(tiny_xl_engine, monkeypatch, one_torch_thread):
    """The check above can fail: diffusers given "" as negative prompt (not zeros) no longer equals fd."""
    from diffusers import StableDiffusionXLPipeline
    call = StableDiffusionXLPipeline.__call__
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__",
                        lambda self, *a, **k: call(self, *a, **{**k, "negative_prompt": ""}))
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy
    from fd.runtime.request import Request
    pipe = FasterDiffusionPipeline(tiny_xl_engine)
    request = Request(prompts=[bench.DEFAULT_PROMPT], steps=4, policy=FasterDiffusionPolicy.baseline(4))
    r = bench.run_benchmark(pipe, bench.Settings(request, runs=1, warmup=0, compare_diffusers=True))
    pipe.close()
    assert r["fidelity"]["diffusers_vs_baseline"]["max_abs_latent_diff"] > 1e-2


def test_compare_diffusers_without_the_source_model_is_one_clear_error(tiny_engine, tmp_path, capsys):
    moved = tmp_path / "engine"
    shutil.copytree(tiny_engine, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"] = {"model": "/gone/sd", "kind": "local", "path": "/gone/sd"}
    (moved / "manifest.json").write_text(json.dumps(manifest))
    code = cli.main(["--engine-dir", str(moved), "--runs", "1", "--warmup", "0", "--steps", "2",
                     "--compare", "diffusers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compare diffusers cannot find the model" in err[0]


def test_ctrl_c_keeps_what_was_measured(tiny_engine, tmp_path, monkeypatch):
    made = bench.fd_arm
    calls = []

    def interrupting_arm(*args):
        run = made(*args)

        def maybe_interrupt():
            calls.append(1)
            if len(calls) == 4:  # baseline, FD, baseline, then Ctrl-C during the second FD run
                raise KeyboardInterrupt
            return run()
        return maybe_interrupt
    monkeypatch.setattr(bench, "fd_arm", interrupting_arm)
    code = cli.main(["--engine-dir", str(tiny_engine), "--runs", "3", "--warmup", "0", "--steps", "3",
                     "--json", str(tmp_path / "r.json")])
    assert code == 130
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["complete"] is False
    assert r["arms"]["baseline"]["runs_measured"] == 2 and r["arms"]["fasterdiffusion"]["runs_measured"] == 1
    assert r["speedup"]["fd_over_baseline"]["n"] == 1  # only complete pairs


def test_bad_settings_fail_before_any_run(tiny_engine, capsys):
    code = cli.main(["--engine-dir", str(tiny_engine), "--batch-size", "2", "--steps", "2"])
    assert code == 2 and "--max-batch-size 2" in capsys.readouterr().err


# --- fidelity metrics -----------------------------------------------------------------------------------

def image(seed, shape=(64, 48, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_identical_images_give_infinite_psnr_and_ssim_one():
    a = image(0)
    assert fidelity.psnr(a, a) == math.inf
    assert fidelity.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert json_safe({"psnr": math.inf}) == {"psnr": "inf"}


def test_psnr_of_a_known_error():
    a = np.full((32, 32, 3), 128.0)
    noisy = a + 5.0 * np.where(np.indices(a.shape).sum(0) % 2, 1, -1)  # |error| = 5 everywhere: MSE 25
    assert fidelity.psnr(a, noisy) == pytest.approx(20 * math.log10(255 / 5))
    rng = np.random.default_rng(1)
    gaussian = a + rng.normal(0, 10, a.shape)
    assert fidelity.psnr(a, gaussian) == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=0.2)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = np.full((20, 20), 100.0), np.full((20, 20), 140.0)
    c1 = (0.01 * 255) ** 2
    assert fidelity.ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1))


def test_ssim_is_symmetric_and_below_one_for_different_images():
    a, b = image(0), image(1)
    smooth = np.clip(a.astype(float) + np.random.default_rng(2).normal(0, 20, a.shape), 0, 255)
    assert fidelity.ssim(a, b) == pytest.approx(fidelity.ssim(b, a))
    assert fidelity.ssim(a, b) < 0.1  # unrelated noise images
    assert fidelity.ssim(a, b) < fidelity.ssim(a, smooth) < 1


def test_separable_filter_equals_the_direct_2d_window():
    x = np.random.default_rng(3).random((15, 13))
    k = fidelity.gaussian_kernel()
    direct = np.array([[np.sum(np.outer(k, k) * x[i:i + 11, j:j + 11]) for j in range(3)] for i in range(5)])
    np.testing.assert_allclose(fidelity.gaussian_filter_valid(x, k), direct, rtol=1e-12)
    assert k.sum() == pytest.approx(1.0) and len(k) == 11


def test_batch_ssim_is_the_mean_over_images_and_shapes_are_checked():
    a, b = np.stack([image(0), image(2)]), np.stack([image(1), image(2)])
    assert fidelity.ssim(a, b) == pytest.approx((fidelity.ssim(a[0], b[0]) + 1.0) / 2)
    with pytest.raises(ValueError):
        fidelity.psnr(image(0), image(0, (32, 32, 3)))
    with pytest.raises(ValueError):
        fidelity.ssim(np.zeros((8, 8)), np.zeros((8, 8)))


# --- flop_split: the encoder/decoder FLOP split of a generated model -------------------------------------

def test_flop_split_on_meta_equals_a_real_count_with_attention(tiny_components):
    """Counting on the meta device (no memory) gives the FLOPs of real tensors, attention scores included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    from fd.builder.split import UNetEncoder
    from fd.benchmarks import flop_split

    counted = flop_split.count_split(flop_split.make_on_meta("tiny"), 128, 128)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:  # no formula for it in torch
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as real:
        UNetEncoder(tiny_components.unet)(torch.zeros(1, 4, 16, 16), torch.tensor([500.0]), torch.zeros(1, 77, 32))
    encoder = counted["denoiser_encoder"]
    assert encoder["flops"] == real.get_total_flops()
    assert 0 < encoder["attention_scores"] < encoder["flops"]


def test_flop_split_json_floor_and_halves(tiny_engine, tmp_path):
    from fd.benchmarks import flop_split
    code = flop_split.main(["--model", "tiny", "--size", "128", "--json", str(tmp_path / "s.json")])
    assert code == 0
    row = json.loads((tmp_path / "s.json").read_text())["sizes"][0]
    e, d, whole = row["denoiser_encoder"], row["denoiser_decoder"], row["unet"]["flops"]
    assert row["latent"] == [4, 16, 16]
    assert row["decoder_share"] == pytest.approx(d["flops"] / (e["flops"] + d["flops"]))
    assert row["floor"] == pytest.approx(50 / (9 + 41 * row["decoder_share"]))
    assert 0 < e["flops"] + d["flops"] - whole < 0.01 * whole  # only the time embedding runs in both halves
    manifest = json.loads((tiny_engine / "manifest.json").read_text())["flops_per_sample"]
    for name, half in (("denoiser_encoder", e), ("denoiser_decoder", d)):  # fd-build counts on CPU tensors, where
        assert manifest[name] in (half["flops"], half["flops"] - half["attention_scores"])  # SDPA is uncounted


def test_flop_split_unknown_model_is_one_line(capsys):
    from fd.benchmarks import flop_split
    code = flop_split.main(["--model", "sd99", "--size", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a generated model" in err[0] and "sdxl-random" in err[0]
