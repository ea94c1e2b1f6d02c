"""fd-bench's peer arms (benchmarks/peers.py): diffusers' First Block Cache, TaylorSeer and MagCache hooks on
diffusers' own FluxPipeline / StableDiffusion3Pipeline, beside fd's arms.

- each peer really skips work: a hook written here counts the attention computations (calls of each block's
  `attn.to_q`) and a peer makes fewer than diffusers' plain pipeline, which makes exactly steps × blocks; its final
  latents differ from the plain pipeline's; the plain pipeline run after the peers equals its first run (the
  hooks are removed again);
- fd-bench --peer on tiny-flux: every peer is an arm with s/image, a speedup over diffusers, its distance from
  diffusers and FD's distance from diffusers and from fd's baseline;
- a peer that cannot run (unknown name or field, First Block Cache on SD3, a UNet folder) is one line.
The configs below force skipping at a few steps (the defaults skip nothing in 3 steps: warm-up steps, retention).
No test asserts a speed.
"""
import json

import numpy as np
import pytest
import torch

from fd.benchmarks import bench, cli, peers
from fd.builder.families import family_generating
from fd.runtime.errors import FdError
from fd.runtime.pipeline import EngineFolder
from fd.runtime.request import Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

STEPS = 3
FORCING = {  # skip from the second step on (First Block Cache, MagCache) / forecast every other step (TaylorSeer)
    "first-block-cache": "first-block-cache:threshold=1e9",
    "taylorseer": "taylorseer:disable_cache_before_step=1:cache_interval=2",
    "magcache": "magcache:threshold=1e9:retention_ratio=0",
}


def attention_counter(transformer) -> list:
    """Counts each block's attention computations: the first projection runs only when the block's attention does."""
    count = [0]
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    for block in blocks:
        block.attn.to_q.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count, len(blocks)


@pytest.mark.parametrize("model, names", [("tiny-flux", ("first-block-cache", "taylorseer", "magcache")),
                                          ("tiny-sd3", ("taylorseer", "magcache"))])
def test_each_peer_skips_attention_and_changes_the_result(model, names, monkeypatch):
    comps = family_generating(model)()
    monkeypatch.setattr("fd.builder.models.load_components", lambda _: comps)  # the test's own transformer
    manifest = {"source": {"kind": "generated", "model": model}, "scheduler_config": comps.scheduler_config,
                "precision": "fp32"}
    request = Request(prompts=["a cat"], steps=STEPS, height=128, width=128, scheduler="flow-euler",
                      guidance_scale=3.5 if model == "tiny-flux" else 7.0)
    settings = bench.Settings(request, runs=1, warmup=0, compare_diffusers=True,
                              peers=tuple(peers.parse_peer(FORCING[name]) for name in names))
    latents = np.random.default_rng(0).standard_normal((1, 16, 16, 16), dtype=np.float32)
    plain = bench.diffusers_arm(manifest, settings, ["a cat"], latents, on_gpu=False)
    count, blocks = attention_counter(comps.transformer)
    first = plain()
    assert count[0] == STEPS * blocks  # the hook sees every attention computation of the plain pipeline
    for name in names:
        count[0] = 0
        sample = plain.peers[FORCING[name]]()
        assert 0 < count[0] < STEPS * blocks, name
        assert 0 < sample.calls["block_linear_gflop"] < first.calls["block_linear_gflop"], name
        assert np.abs(sample.latents - first.latents).max() > 1e-3, name
    again = plain()
    np.testing.assert_array_equal(again.latents, first.latents)  # the hooks are gone after each peer's run


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from fd.builder.build import BuildOptions, build
    return build(BuildOptions(model="tiny-flux", max_batch_size=1, max_window=4,
                              out=str(tmp_path_factory.mktemp("peers") / "tiny-flux")), log=lambda *_: None)


def test_fd_bench_reports_each_peer_beside_fd(flux_folder, tmp_path):
    out, table = tmp_path / "r.json", tmp_path / "r.md"
    labels = list(FORCING.values())
    code = cli.main(["--engine-dir", str(flux_folder), "--steps", str(STEPS), "--runs", "1", "--warmup", "0",
                     *(arg for label in labels for arg in ("--peer", label)), "--json", str(out),
                     "--markdown", str(table)])
    assert code == 0
    r = json.loads(out.read_text())
    assert list(r["arms"]) == ["baseline", "fasterdiffusion", "diffusers", *labels]  # --peer implies diffusers
    plain = r["arms"]["diffusers"]
    for label in labels:
        arm = r["arms"][label]
        assert arm["pipeline"] == "FluxPipeline" and arm["calls"]["transformer"] == STEPS
        assert arm["calls"]["block_linear_gflop"] < plain["calls"]["block_linear_gflop"]
        assert arm["seconds_per_image"]["median"] > 0 and r["speedup"][f"{label}_over_diffusers"]["median"] > 0
        distance = r["fidelity"][f"{label}_vs_diffusers"]
        assert distance["psnr_db"] != "inf" and distance["max_abs_latent_diff"] > 1e-3
    assert r["fidelity"]["diffusers_vs_baseline"]["max_abs_latent_diff"] < 1e-3  # diffusers is fd's baseline
    for key in ("fasterdiffusion_vs_diffusers", "fasterdiffusion_vs_baseline"):
        assert r["fidelity"][key]["max_abs_latent_diff"] > 1e-3  # FD's distance (noise injection at least)
    assert "magcache" in r["arms"][FORCING["magcache"]]["config"].lower()
    assert all(label in table.read_text() for label in labels)


def test_a_peer_that_cannot_run_is_one_line(flux_folder, capsys):
    for bad, fragment in (("deepcache", "unknown peer 'deepcache'"), ("magcache:thresold=1", "KEY=VALUE"),
                          ("magcache:mag_ratios=[1]", "KEY=VALUE")):  # fd sets the ratios (calibration)
        code = cli.main(["--engine-dir", str(flux_folder), "--steps", "2", "--peer", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
    with pytest.raises(FdError, match="fails on SD3's last joint block"):
        peers.check_family(peers.parse_peer("first-block-cache"), "sd3")
    with pytest.raises(FdError, match="SD3 and FLUX.1 folders only"):
        peers.check_family(peers.parse_peer("taylorseer"), "sd")
    with pytest.raises(FdError, match="add --compare diffusers"):
        bench.check_settings(EngineFolder(flux_folder), bench.Settings(
            Request(prompts=["a cat"], steps=2), peers=(peers.parse_peer("magcache"),)))
