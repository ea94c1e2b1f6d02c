"""fd-bench on a folder with a ControlNet (and the VAE encoder): `tiny` + tiny-controlnet, ONNX Runtime.

- the ControlNet is its own stage in every output, runs at every step in the baseline and at key steps in FD;
- the FLOP floor counts the ControlNet on the encoder's side: it equals the hand-computed value from the
  manifest's counted FLOPs and is higher than the floor of the UNet alone;
- the diffusers arm is StableDiffusionControlNetPipeline with the same image, scale and latents;
- image to image is measured on the steps that run; load time and first runs are recorded;
- a ControlNet folder without --control-image, or --control-image on a folder without one, is one line before
  any engine loads.
"""
import json

import numpy as np
import pytest
from PIL import Image

from fd.benchmarks import bench, cli
from fd.builder.controlnet import SD15_RANDOM, load_controlnet
from fd.runtime.errors import FdError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

STEPS = 20  # the paper's key steps at 20: 0,1,2,3,5,10,15
KEYS = 7


@pytest.fixture(scope="module")
def control_folder(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("bench-control") / "tiny-control"
    return build(BuildOptions(model="tiny", controlnets=("tiny-controlnet",), img2img=True, out=str(out)),
                 log=lambda *_: None)


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "edges.png"
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def control_report(control_folder, edges, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-control-out")
    code = cli.main(["--engine-dir", str(control_folder), "--runs", "1", "--warmup", "0", "--steps", str(STEPS),
                     "--control-image", str(edges), "--controlnet-scale", "0.8", "--json", str(out / "r.json"),
                     "--markdown", str(out / "r.md"), "--plot", str(out / "r.png")])
    assert code == 0
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def manifest_flops(folder):
    return json.loads((folder / "manifest.json").read_text())["flops_per_sample"]


def test_controlnet_is_its_own_stage_and_runs_at_key_steps_only(control_report):
    r, _ = control_report
    base, fd = r["arms"]["baseline"], r["arms"]["fasterdiffusion"]
    for arm in (base, fd):
        assert arm["stage_seconds_median"]["controlnet"] > 0
        stages = arm["runs"][0]["stages"]  # they still add up to the total
        assert sum(stages.values()) == pytest.approx(arm["runs"][0]["total"], rel=1e-6)
    assert base["calls"]["controlnet"] == STEPS and fd["calls"]["controlnet"] == KEYS == fd["calls"]["denoiser_encoder"]
    assert r["settings"]["control_images"] and r["settings"]["controlnet_scales"] == [0.8]
    assert r["engine"]["controlnets"] == [{"graph": "controlnet", "model": "tiny-controlnet"}]


def test_flop_floor_counts_the_controlnet_on_the_encoder_side(control_report, control_folder):
    r, _ = control_report
    flops = manifest_flops(control_folder)
    e, d, c = flops["denoiser_encoder"], flops["denoiser_decoder"], flops["controlnet"]
    assert c > 0  # fd-build counted the ControlNet graph
    floor = r["flop_floor"]
    assert floor["counted"] == "rows" and floor["controlnet_flops"] == {"controlnet": c}
    want = STEPS * (e + c + d) / (KEYS * (e + c) + STEPS * d)  # guided: every count times 2 rows, which cancels
    assert floor["unet_speedup"] == pytest.approx(want)
    assert floor["unet_speedup"] == pytest.approx(bench.flop_floor(flops, STEPS, KEYS))
    without = STEPS * (e + d) / (KEYS * e + STEPS * d)
    assert floor["unet_speedup"] > without * 1.01
    # "UNet only" now means the denoiser's halves and the ControlNet, the work the floor counts
    base, fd = (r["arms"][n]["runs"][0]["stages"] for n in ("baseline", "fasterdiffusion"))
    denoiser = [sum(x[k] for k in ("denoiser_encoder", "controlnet", "denoiser_decoder")) for x in (base, fd)]
    assert r["speedup"]["fd_over_baseline_unet"]["median"] == pytest.approx(denoiser[0] / denoiser[1])


def test_floor_leaves_out_a_controlnet_the_manifest_did_not_count():
    flops = {"denoiser_encoder": 10.0, "denoiser_decoder": 30.0}
    rows_base = {"denoiser_encoder": 40, "denoiser_decoder": 40, "controlnet": 40}
    rows_fd = {"denoiser_encoder": 14, "denoiser_decoder": 40, "controlnet": 14}
    assert bench.flop_floor_of_rows(flops, rows_base, rows_fd) == pytest.approx(40 * 40 / (14 * 10 + 40 * 30))
    flops["controlnet"] = 20.0
    assert bench.flop_floor_of_rows(flops, rows_base, rows_fd) == pytest.approx(40 * 60 / (14 * 30 + 40 * 30))


def test_controlnet_graph_names_are_the_runtimes():
    """One rule (runtime/control.py) for which graphs are ControlNets, in the floor and in fd-build's count."""
    from fd.builder.flops import counted_graphs
    from fd.runtime.control import is_controlnet_graph
    assert [is_controlnet_graph(n) for n in ("controlnet", "controlnet_1", "controlnet_x", "vae_encoder",
                                              "denoiser_encoder")] == [True, True, False, False, False]
    graphs = {name: None for name in ("text_encoder", "denoiser_encoder", "controlnet", "vae_encoder", "controlnet_1",
                                      "denoiser_decoder")}
    assert counted_graphs(graphs) == ["denoiser_encoder", "denoiser_decoder", "controlnet", "controlnet_1"]
    assert bench.encoder_side(graphs) == ["denoiser_encoder", "controlnet", "controlnet_1"]


def test_reports_show_the_controlnet_and_the_load_time(control_report):
    r, markdown = control_report
    assert "| UNet encoder | ControlNet | UNet decoder |" in markdown.splitlines()[4]  # a stage column of its own
    assert "ControlNet calls" in markdown and f"| {STEPS} |" in markdown and f"| {KEYS} |" in markdown
    table = cli.report.format_table(r)
    assert "ControlNet (s, median)" in table and "ControlNet calls" in table
    assert "FLOP floor (UNet + ControlNet" in table and "load: engine folder" in table
    assert r["load"]["engine_seconds"] > 0
    assert all(arm["first_run_seconds"] > 0 for arm in r["arms"].values())


def test_without_a_controlnet_the_stage_is_not_shown(tiny_engine, tmp_path):
    code = cli.main(["--engine-dir", str(tiny_engine), "--runs", "1", "--warmup", "0", "--steps", "3",
                     "--json", str(tmp_path / "r.json")])
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert "controlnet" not in r["arms"]["baseline"]["stage_seconds_median"]
    assert r["flop_floor"]["controlnet_flops"] is None and r["load"]["engine_seconds"] > 0
    assert "ControlNet" not in cli.report.format_table(r) and "ControlNet" not in cli.report.format_markdown(r)


def test_compare_diffusers_uses_the_controlnet_pipeline(control_folder, edges, tmp_path):
    code = cli.main(["--engine-dir", str(control_folder), "--runs", "1", "--warmup", "0", "--steps", "4",
                     "--control-image", str(edges), "--controlnet-scale", "0.7", "--compare", "diffusers",
                     "--json", str(tmp_path / "r.json")])
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    arm = r["arms"]["diffusers"]
    assert arm["pipeline"] == "StableDiffusionControlNetPipeline" and arm["calls"] == {"unet": 4, "controlnet": 4}
    assert arm["load_seconds"] > 0
    same = r["fidelity"]["diffusers_vs_baseline"]  # same ControlNet, image, scale and latents
    assert same["psnr_db"] == "inf" or same["psnr_db"] > 40
    assert same["max_abs_latent_diff"] < 1e-3


def test_compare_diffusers_without_the_control_image_differs(control_folder, edges, monkeypatch):
    """The check above can fail: diffusers given another control scale no longer equals fd's baseline."""
    from diffusers import StableDiffusionControlNetPipeline
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy
    from fd.runtime.request import Request
    call = StableDiffusionControlNetPipeline.__call__
    monkeypatch.setattr(StableDiffusionControlNetPipeline, "__call__",
                        lambda self, *a, **k: call(self, *a, **{**k, "controlnet_conditioning_scale": 0.0}))
    pipe = FasterDiffusionPipeline(control_folder)
    request = Request(prompts=[bench.DEFAULT_PROMPT], steps=4, control_images=[str(edges)],
                      policy=FasterDiffusionPolicy.baseline(4))
    r = bench.run_benchmark(pipe, bench.Settings(request, runs=1, warmup=0, compare_diffusers=True))
    pipe.close()
    assert r["fidelity"]["diffusers_vs_baseline"]["max_abs_latent_diff"] > 1e-2


def test_init_image_runs_the_last_steps_with_the_vae_encoder_stage(control_folder, edges, tmp_path):
    code = cli.main(["--engine-dir", str(control_folder), "--runs", "1", "--warmup", "0", "--steps", "20",
                     "--control-image", str(edges), "--init-image", str(edges), "--strength", "0.5",
                     "--json", str(tmp_path / "r.json")])
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    base, fd = r["arms"]["baseline"], r["arms"]["fasterdiffusion"]
    assert r["settings"]["steps_run"] == 10 and r["flop_floor"]["steps"] == 10
    assert base["calls"]["denoiser_encoder"] == base["calls"]["controlnet"] == 10 and base["calls"]["vae_encoder"] == 1
    assert fd["policy"]["key_steps"] == [0, 1, 2, 3, 5] and fd["calls"]["controlnet"] == 5
    assert base["stage_seconds_median"]["vae_encoder"] > 0


# --- refusals: one line, before any engine loads ---------------------------------------------------------

@pytest.fixture
def no_engine_load(monkeypatch):
    """Fails the test if the engines start loading: the check must come first."""
    from fd.runtime import pipeline

    def refuse(*_a, **_k):
        raise AssertionError("the engine folder was loaded before the options were checked")
    monkeypatch.setattr(pipeline.FasterDiffusionPipeline, "__init__", refuse)


@pytest.mark.parametrize("case", ["no control image", "control image without controlnet", "diffusers img2img"])
def test_image_input_mismatch_is_one_line_before_loading(case, control_folder, tiny_engine, edges, capsys,
                                                         no_engine_load):
    folder, extra, fragment = {
        "no control image": (control_folder, [], "built with 1 ControlNet (tiny-controlnet): give --control-image"),
        "control image without controlnet": (tiny_engine, ["--control-image", str(edges)],
                                             "this engine folder has no ControlNet"),
        "diffusers img2img": (control_folder, ["--control-image", str(edges), "--init-image", str(edges),
                                               "--compare", "diffusers"], "--compare diffusers does not take"),
    }[case]
    code = cli.main(["--engine-dir", str(folder), "--runs", "1", "--warmup", "0", "--steps", "4", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err


def test_sd15_random_controlnet_refuses_another_unet_in_one_line(tiny_components):
    with pytest.raises(FdError) as error:
        load_controlnet(SD15_RANDOM, tiny_components.unet)
    assert "is SD1.5-shaped and does not fit this model: its block_out_channels" in str(error.value)
    assert "\n" not in str(error.value)
