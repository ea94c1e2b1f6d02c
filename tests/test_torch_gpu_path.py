"""The torch backend's GPU path, checked on the CPU: host round trips of the denoising loop, fused attention.

On a GPU every host transfer inside the loop is a synchronization, so the loop may do only the ones its numpy
scheduler needs: per window the key step's latent (and its timestep) goes up to the encoder, per decoder call
the window's timesteps go up and its noise predictions come down; the text embeddings and the encoder's cache
never leave the runner. The counts are taken where a torch tensor can reach the host at all (Tensor.numpy, .cpu,
.item, .tolist) and where a host array enters a graph (Runner.run's feeds).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fd.builder.build import BuildOptions, build
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import FasterDiffusionPolicy

STEPS = 10  # the paper's rule gives key steps [0, 1, 2, 3, 5]: five windows of 1, 1, 1, 2 and 5 steps
HOST_READS = ("numpy", "cpu", "item", "tolist")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "tiny-torch"
    build(BuildOptions(model="tiny", backend="torch", precision="fp32", out=str(out)), log=lambda *_: None)
    pipe = FasterDiffusionPipeline(out)
    yield pipe
    pipe.close()


def count_transfers(pipe, monkeypatch, policy=None) -> dict:
    """Generate once; return the host reads of torch tensors and, per graph, the host arrays fed to each call."""
    reads, fed = Counter(), {}
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads[_method] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    run = pipe.runner.run

    def recorded(graph, feeds):
        fed.setdefault(graph, []).append(sorted(n for n, v in feeds.items() if isinstance(v, np.ndarray)))
        return run(graph, feeds)
    monkeypatch.setattr(pipe.runner, "run", recorded)
    result = pipe(["a red square"], steps=STEPS, seed=0, policy=policy)
    monkeypatch.undo()
    return {"reads": dict(reads), "fed": fed, "calls": result.calls}


def test_loop_moves_only_latents_timesteps_and_predictions(pipe, monkeypatch):
    counted = count_transfers(pipe, monkeypatch)
    windows = 5
    assert counted["calls"]["denoiser_encoder"] == windows and counted["calls"]["denoiser_decoder"] == windows
    # up: the key step's latent and timestep to the encoder, only the timesteps to the decoder (its cache and
    # the text embeddings are the runner's own tensors)
    assert counted["fed"]["denoiser_encoder"] == [["sample", "timestep"]] * windows
    assert counted["fed"]["denoiser_decoder"] == [["timestep"]] * windows
    # down: one noise prediction per decoder call, and the image: a .cpu() and .numpy() each, nothing else
    downloads = windows + 1
    assert counted["reads"] == {"cpu": downloads, "numpy": downloads}


def test_baseline_pays_one_round_trip_per_step(pipe, monkeypatch):
    counted = count_transfers(pipe, monkeypatch, FasterDiffusionPolicy.baseline(STEPS))
    assert counted["reads"] == {"cpu": STEPS + 1, "numpy": STEPS + 1}


def test_a_cache_through_the_host_is_caught(pipe, monkeypatch):
    """The counter sees a leak: a runner whose encoder outputs visit the host costs one read per cache tensor."""
    runner, execute = pipe.runner, pipe.runner._execute

    def leaky(graph, feeds):
        out = execute(graph, feeds)
        if graph == "denoiser_encoder":
            out = {name: torch.from_numpy(value.cpu().numpy()) for name, value in out.items()}
        return out
    monkeypatch.setattr(runner, "_execute", leaky)
    counted = count_transfers(pipe, monkeypatch)
    cache = len(pipe.manifest["cache"])
    assert counted["reads"]["numpy"] == 5 + 1 + 5 * cache


def test_programs_keep_pytorch_fused_attention(pipe):
    """Every attention of the exported programs is one aten.scaled_dot_product_attention node, which PyTorch runs
    as a fused kernel (flash or memory-efficient attention in fp16 on a GPU), not a softmax over explicit
    matmuls that torch.export could have decomposed it into."""
    from torch.export.pt2_archive._package import load_pt2
    for graph, spec in pipe.manifest["components"].items():
        program = load_pt2(str(pipe.engine_dir / spec["file"])).exported_programs["model"]
        ops = Counter(str(node.target) for node in program.graph.nodes if node.op == "call_function")
        assert ops["aten.scaled_dot_product_attention.default"] > 0, graph
        assert not [op for op in ops if "softmax" in op], graph
