"""Classifier-free guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024) composed with
FasterDiffusion's windows: the option, the rows it skips, and its output against the independent reference.

Steps whose σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) lies outside (low, high] use the conditional prediction alone, and
their unconditional rows are never computed: a window with no guided step encodes the conditional rows
only; a window with both kinds encodes both halves and decodes, per step, the rows that step needs.
"""
import json

import numpy as np
import pytest

from fd_reference import reference_fd_sample
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.runtime.policy import (PAPER_GUIDANCE_INTERVAL, FasterDiffusionPolicy, model_sigmas,
                            parse_guidance_interval)
from fd.runtime.request import Policy, Request
from fd.runtime.schedulers import make_scheduler
from tests.conftest import run_fd
from tests.compare import relative_error
from tests.test_fd_reference import PAPER_INJECTION, TOLERANCE, paper_keys, unit_noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPT = "a photo of an astronaut riding a horse on the moon"
PAPER = PAPER_GUIDANCE_INTERVAL
EVERY_STEP = (0.0, float("inf"))  # every σ > 0 of a model's schedule
NO_STEP = (1e6, 1e6)  # (x, x] is empty



def default_policy(pipe, steps: int):
    """The paper's plan for `steps` on this folder, as a request with no policy options gets it."""
    return pipe.prepare(Request(prompts=[PROMPT], steps=steps)).policy


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return FasterDiffusionPipeline(tiny_engine, threads=1)


def sigmas_of(pipe, scheduler, steps):
    sampler = make_scheduler(scheduler, pipe.manifest["scheduler_config"])
    sampler.set_timesteps(steps)
    return sampler.timesteps, model_sigmas(sampler.alphas_cumprod, sampler.timesteps)


def with_interval(policy, interval):
    return FasterDiffusionPolicy(policy.key_steps, policy.max_window, policy.noise_injection, interval)


# --- the option -------------------------------------------------------------------------------------------

def test_parse_and_validate():
    assert parse_guidance_interval("paper") == parse_guidance_interval(" Paper ") == (0.28, 5.42)
    assert parse_guidance_interval("0.5,2") == (0.5, 2.0)
    assert parse_guidance_interval("0,inf") == (0.0, float("inf"))
    for bad, says in (("0.5", "not LOW,HIGH"), ("a,b", "not LOW,HIGH"), ("1,2,3", "not LOW,HIGH"),
                      ("3,2", "0 ≤ LOW ≤ HIGH"), ("-1,2", "0 ≤ LOW ≤ HIGH"), ("nan,2", "0 ≤ LOW ≤ HIGH"),
                      ("inf,inf", "LOW finite")):
        with pytest.raises(FdError, match=says) as info:
            parse_guidance_interval(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(FdError, match="not two numbers"):
        FasterDiffusionPolicy((0,), 15, guidance_interval=(1.0,))


def test_policy_field_from_options_and_describe():
    assert Policy().resolve(20, 15, 500).guidance_interval is None
    fd = Policy(guidance_interval=parse_guidance_interval("paper")).resolve(20, 15, 500)
    assert fd.guidance_interval == PAPER and fd.key_steps == (0, 1, 2, 3, 5, 10, 15)
    assert fd.describe()["guidance_interval"] == [0.28, 5.42]
    base = Policy(baseline=True, guidance_interval=parse_guidance_interval("0.5,2")).resolve(20, 15, 500)
    assert base == FasterDiffusionPolicy.baseline(20, (0.5, 2.0)) and base.noise_injection is None
    assert FasterDiffusionPolicy((0,), 15, guidance_interval=[1, 2]).guidance_interval == (1.0, 2.0)
    assert FasterDiffusionPolicy((0,), 15).guided_steps([20.0, 3.0, 0.1]) == (True, True, True)
    # (low, high]: the upper bound is inside, the lower one outside
    assert FasterDiffusionPolicy((0,), 15, guidance_interval=(0.1, 3.0)).guided_steps([20.0, 3.0, 0.1]) == \
        (False, True, False)


def test_sigmas_are_the_models_and_the_paper_interval_skips_13_of_sd15s_50_ddim_steps(pipe):
    """tiny has SD1.5's noise schedule (scaled_linear 0.00085…0.012, steps_offset 1)."""
    import diffusers
    timesteps, sigmas = sigmas_of(pipe, "dpmpp-2m", 20)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(pipe.manifest["scheduler_config"])
    theirs.set_timesteps(20)
    np.testing.assert_allclose(sigmas, theirs.sigmas[:-1].double().numpy(), rtol=1e-6)
    timesteps, sigmas = sigmas_of(pipe, "ddim", 50)
    guided = FasterDiffusionPolicy((0,), 15, guidance_interval=PAPER).guided_steps(sigmas)
    skipped = [i for i, g in enumerate(guided) if not g]
    assert skipped == [*range(9), 46, 47, 48, 49]  # 9 at high noise, 4 at low (issue 14's count)
    assert timesteps[9] == 801 and 5.0 < sigmas[9] <= 5.42 < sigmas[8]


# --- what runs ---------------------------------------------------------------------------------------------

def spy_on_graphs(pipe, monkeypatch):
    """Every graph execution's feeds, as host arrays (below the pipeline's own bookkeeping)."""
    seen = {}
    original = pipe.runner._execute

    def spy(graph, feeds):
        seen.setdefault(graph, []).append({name: np.array(pipe.runner.download(value)) for name, value in feeds.items()})
        return original(graph, feeds)
    monkeypatch.setattr(pipe.runner, "_execute", spy)
    return seen


def test_rows_given_to_the_encoder_and_decoder_are_the_ones_the_interval_asks_for(pipe, monkeypatch):
    seen = spy_on_graphs(pipe, monkeypatch)
    result = pipe([PROMPT], steps=50, seed=3, negative_prompt="a horse",
                  policy=with_interval(default_policy(pipe, 50), PAPER))
    timesteps = np.asarray(result.timesteps, np.float32)
    text = seen["text_encoder"][0]  # computed once: [negative, prompt]
    embeddings = pipe.runner.download(pipe.runner.run("text_encoder", {"input_ids": text["input_ids"]})["text_embeddings"])
    negative, positive = embeddings[:1], embeddings[1:]
    # windows of the paper's keys: [0] [1] [2] [3,4] [5..9] [10..14] [15..24] [25..34] [35..49];
    # steps 0..8 and 46..49 are outside (0.28, 5.42]
    encoder = seen["denoiser_encoder"]
    assert [len(call["sample"]) for call in encoder] == [1, 1, 1, 1, 2, 2, 2, 2, 2]
    for call in encoder[:4]:  # no guided step in the window: the prompt's row only
        np.testing.assert_array_equal(call["encoder_hidden_states"], positive)
    for call in encoder[4:]:
        np.testing.assert_array_equal(call["encoder_hidden_states"], np.concatenate([negative, positive]))
        np.testing.assert_array_equal(call["sample"][0], call["sample"][1])
    decoder = seen["denoiser_decoder"]
    assert [len(call["timestep"]) for call in decoder] == [1, 1, 1, 2, 4 + 2, 10, 20, 20, 11 * 2 + 4]
    guided_rows = {i: 2 if 9 <= i <= 45 else 1 for i in range(50)}
    window_steps = [[0], [1], [2], [3, 4], range(5, 10), range(10, 15), range(15, 25), range(25, 35), range(35, 50)]
    for call, steps in zip(decoder, window_steps):
        np.testing.assert_array_equal(call["timestep"], np.repeat(timesteps[list(steps)], [guided_rows[i] for i in steps]))
        want = np.concatenate([np.concatenate([negative, positive]) if guided_rows[i] == 2 else positive for i in steps])
        np.testing.assert_array_equal(call["encoder_hidden_states"], want)
    # the straddling window [5..9]: steps 5..8 read the cache's conditional row, step 9 both rows
    cache_rows = {name: value for name, value in encoder[4].items()}
    straddle = decoder[4]
    assert straddle["mid"].shape[0] == 6
    np.testing.assert_array_equal(straddle["mid"][:4], np.repeat(spy_cache(pipe, cache_rows)["mid"][1:], 4, axis=0))
    np.testing.assert_array_equal(straddle["mid"][4:], spy_cache(pipe, cache_rows)["mid"])
    assert result.rows == {"text_encoder": 2, "denoiser_encoder": 14, "denoiser_decoder": 87, "vae_decoder": 1}
    assert result.calls == {"text_encoder": 1, "denoiser_encoder": 9, "denoiser_decoder": 9, "vae_decoder": 1}


def spy_cache(pipe, encoder_feeds):
    """The cache the encoder made from these feeds (recomputed: graphs are deterministic)."""
    outputs = pipe.runner.run("denoiser_encoder", encoder_feeds)
    return {name: np.array(outputs[name]) for name in pipe.manifest["cache"]}


def test_without_an_interval_rows_are_as_before(pipe):
    result = pipe([PROMPT], steps=50, seed=3)
    assert result.rows == {"text_encoder": 2, "denoiser_encoder": 18, "denoiser_decoder": 100, "vae_decoder": 1}
    assert result.policy["guidance_interval"] is None


def test_a_backend_that_holds_the_batch_minimum_gets_padded_decoder_calls(pipe, monkeypatch):
    """TensorRT's profiles and torch.export's Dim start the decoder at 2 rows: a one-step conditional call
    repeats its step, and the extra prediction is dropped (same latents)."""
    policy = with_interval(default_policy(pipe, 20), PAPER)
    free = pipe([PROMPT], steps=20, scheduler="dpmpp-2m", seed=4, policy=policy)
    monkeypatch.setattr(pipe.runner, "holds_batch_minimum", True)
    seen = spy_on_graphs(pipe, monkeypatch)
    held = pipe([PROMPT], steps=20, scheduler="dpmpp-2m", seed=4, policy=policy)
    # DPM++-20 keys 0,1,2,3,5,10,15; steps 0..3 and 19 outside the paper's interval
    assert free.rows["denoiser_decoder"] == 1 + 1 + 1 + (1 + 2) + 10 + 10 + (4 * 2 + 1)
    assert [len(call["timestep"]) for call in seen["denoiser_decoder"]] == [2, 2, 2, 3, 10, 10, 9]
    assert seen["denoiser_decoder"][0]["timestep"].tolist() == [999, 999]
    np.testing.assert_allclose(held.latents, free.latents, rtol=0, atol=1e-6 * np.abs(free.latents).max())


# --- what comes out ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fd", [True, False])
def test_an_interval_covering_every_step_equals_todays_output_exactly(pipe, fd):
    policy = default_policy(pipe, 20) if fd else FasterDiffusionPolicy.baseline(20)
    today = pipe([PROMPT], steps=20, seed=7, policy=policy)
    every = pipe([PROMPT], steps=20, seed=7, policy=with_interval(policy, EVERY_STEP))
    assert np.array_equal(every.latents, today.latents)
    assert every.rows == today.rows and every.calls == today.calls


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_an_empty_interval_equals_guidance_free_conditional_sampling(pipe, scheduler):
    policy = default_policy(pipe, 20)
    empty = pipe([PROMPT], steps=20, seed=8, scheduler=scheduler, negative_prompt="a horse",
                 policy=with_interval(policy, NO_STEP))
    plain = pipe([PROMPT], steps=20, seed=8, scheduler=scheduler, guidance_scale=1.0, policy=policy)
    guided = pipe([PROMPT], steps=20, seed=8, scheduler=scheduler, negative_prompt="a horse", policy=policy)
    # the text encoder ran on two rows instead of one: equal up to its batch-dependent rounding
    assert relative_error(empty.latents, plain.latents) <= 1e-6
    assert relative_error(guided.latents, plain.latents) > 1e-2
    assert empty.rows["denoiser_encoder"] == plain.rows["denoiser_encoder"] == 7
    assert empty.rows["denoiser_decoder"] == plain.rows["denoiser_decoder"] == 20


_references = {}


def reference(components, negative, latents, scheduler, steps, fd, interval):
    key = (negative, latents.tobytes(), scheduler, steps, fd, interval)
    if key not in _references:
        options = dict(key_steps=paper_keys(steps), noise_injection=PAPER_INJECTION) if fd else \
            dict(key_steps=range(steps), noise_injection=None)
        _references[key] = reference_fd_sample(components, [PROMPT], negative, latents, scheduler, steps, 7.5,
                                               guidance_interval=interval, **options)
    return _references[key]


@pytest.mark.parametrize("fd", [True, False], ids=["fd", "no-fd"])
@pytest.mark.parametrize("scheduler,steps", [("ddim", 50), ("dpmpp-2m", 20)])
def test_the_papers_interval_equals_the_reference(pipe, tiny_components, scheduler, steps, fd):
    latents = unit_noise(seed=1)
    policy = default_policy(pipe, steps) if fd else FasterDiffusionPolicy.baseline(steps)
    ours = pipe([PROMPT], negative_prompt="a horse", steps=steps, scheduler=scheduler, latents=latents,
                policy=with_interval(policy, PAPER))
    want = reference(tiny_components, "a horse", latents, scheduler, steps, fd, PAPER)
    assert relative_error(ours.latents, want) <= TOLERANCE
    # sharp enough: guidance at every step, or the interval's steps swapped, are far off
    assert relative_error(reference(tiny_components, "a horse", latents, scheduler, steps, fd, None), want) \
        > 10 * TOLERANCE
    _, sigmas = sigmas_of(pipe, scheduler, steps)
    inverse = (float(np.min(sigmas)) / 2, 0.28)  # only the low-noise steps the paper leaves unguided
    assert relative_error(reference(tiny_components, "a horse", latents, scheduler, steps, fd, inverse), want) \
        > 10 * TOLERANCE


# --- command lines -------------------------------------------------------------------------------------------

def test_fd_run_prints_the_rows_it_computed(tiny_engine, tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tiny_engine), "--prompt", "a cat", "--steps", "50",
                  "--guidance-interval", "paper", "--timings", "--out", str(tmp_path / "x.png"))
    assert done.returncode == 0, done.stderr
    assert "rows: text encoder 2, denoiser encoder 14, denoiser decoder 87, vae decoder 1" in done.stdout
    assert "guidance interval: sigma in (0.28, 5.42]" in done.stdout


def test_fd_run_refuses_a_bad_interval_in_one_line_before_loading(tmp_path):
    done = run_fd("fd.runtime.cli", "--engine-dir", str(tmp_path / "missing"), "--prompt", "a cat",
                  "--guidance-interval", "5,1", "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: guidance interval (5, 1] is not allowed")


def test_fd_bench_arm_setting(tiny_engine, tmp_path):
    from fd.benchmarks import cli
    out = tmp_path / "r.json"
    assert cli.main(["--engine-dir", str(tiny_engine), "--runs", "1", "--warmup", "0", "--steps", "20",
                     "--guidance-interval", "paper", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["guidance_interval"] == [0.28, 5.42]
    base, fd = r["arms"]["baseline"], r["arms"]["fasterdiffusion"]
    assert base["policy"]["guidance_interval"] is None and fd["policy"]["guidance_interval"] == [0.28, 5.42]
    # DDIM-20: steps 0, 1, 2 (σ > 5.42) and 18, 19 (σ ≤ 0.28) skip the unconditional row
    assert base["rows"]["denoiser_decoder"] == 40 and fd["rows"]["denoiser_decoder"] == 35
    assert base["rows"]["denoiser_encoder"] == 40 and fd["rows"]["denoiser_encoder"] == 3 * 1 + 4 * 2
