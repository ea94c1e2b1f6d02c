"""Every scheduler of the registry through whole generations on the tiny model (ONNX Runtime, CPU).

- the baseline (every step a key step, no injection) equals diffusers' StableDiffusionPipeline with that
  scheduler (latents within 1e-3 relative, pixels within 2/255), stochastic ones given the same per-step noise;
- FasterDiffusion equals the independent reference of tests/fd_reference.py, which applies the scheduler's
  scale_model_input at key steps and injects noise in the variance-preserving frame; leaving either out
  is caught;
- fractional (Euler) timesteps reach the graphs as float32; PLMS's extra evaluation; the few-step
  default; `--scheduler model`; an unsupported config option is one error line from fd-run.
"""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from fd.builder.families import FAMILIES
from fd.runtime.cli import main as fd_run, parse_args as fd_run_args
from fd.runtime.pipeline import FasterDiffusionPipeline, step_noise_generator
from fd.runtime.policy import FEW_STEPS, FasterDiffusionPolicy
from fd.runtime.schedulers import CHOICES, REGISTRY, SCHEDULERS, diffusers_scheduler, make_scheduler
from tests import fd_reference
from tests.compare import relative_error
from tests.test_fd_reference import TOLERANCE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

PROMPT = "a photo of an astronaut riding a horse on the moon"
SEED = 3
BASELINE_STEPS = 10
FD_STEPS, FD_KEYS, FD_WINDOW = 12, (0, 1, 2, 3, 5, 10), 4  # the 5-step windows split into 4 + 1
INJECTION = (0.003, 500)
# Euler's linspace spacing gives fractional timesteps (the tiny model's own config is leading, integer).
CONFIG_CHANGES = {"euler": {"timestep_spacing": "linspace"}, "euler-a": {"timestep_spacing": "linspace"}}




@pytest.fixture(scope="module")
def pipes(tiny_engine):
    """One pipeline per scheduler config: the folder's own, or with CONFIG_CHANGES (in memory)."""
    made = {}

    def get(name):
        key = json.dumps(CONFIG_CHANGES.get(name, {}), sort_keys=True)
        if key not in made:
            pipe = FasterDiffusionPipeline(tiny_engine, threads=1)
            pipe.manifest = {**pipe.manifest,
                             "scheduler_config": {**pipe.manifest["scheduler_config"], **CONFIG_CHANGES.get(name, {})}}
            made[key] = pipe
        return made[key]
    return get


def components_for(tiny_components, name):
    config = {**tiny_components.scheduler_config, **CONFIG_CHANGES.get(name, {})}
    return dataclasses.replace(tiny_components, scheduler_config=config)


def initial_latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)


def diffusers_generate(comps, name, steps, latents):
    """diffusers' own pipeline with the registry's diffusers scheduler; per-step noise from fd's generator."""
    pipe = FAMILIES["sd"].diffusers_pipeline(comps, diffusers_scheduler(name, comps.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs
    with torch.no_grad(), fd_reference.numpy_step_noise(pipe.scheduler, step_noise_generator(SEED)):
        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents),
                   output_type="np", callback_on_step_end=keep)
    return final["latents"].numpy(), (out.images[0] * 255).round().astype(np.int16)


def steps_for(name):
    return 4 if name == "lcm" else BASELINE_STEPS  # LCM runs at few steps


@pytest.mark.parametrize("name", SCHEDULERS)
def test_baseline_equals_the_diffusers_pipeline(pipes, tiny_components, name):
    pipe, comps, steps = pipes(name), components_for(tiny_components, name), steps_for(name)
    latents = initial_latents()
    ours = pipe([PROMPT], steps=steps, scheduler=name, seed=SEED, latents=latents,
                policy=FasterDiffusionPolicy.baseline(steps))
    want_latents, want_pixels = diffusers_generate(comps, name, steps, latents)
    assert np.abs(ours.latents - want_latents).max() <= 1e-3 * np.abs(want_latents).max()
    got_pixels = np.asarray(ours.images[0]).astype(np.int16)
    assert got_pixels.shape == want_pixels.shape == (128, 128, 3)
    assert np.abs(got_pixels - want_pixels).max() <= 2
    assert 20 < want_pixels.std()  # a real image, not a saturated one that any code would match
    evaluations = steps + 1 if name == "pndm" else steps  # PLMS evaluates the model once more than it steps
    assert len(ours.timesteps) == evaluations
    assert ours.calls["denoiser_encoder"] == ours.calls["denoiser_decoder"] == evaluations


def fd_policy():
    return FasterDiffusionPolicy(FD_KEYS, max_window=FD_WINDOW)


def reference(tiny_components, name, latents, key_steps, **variants):
    return fd_reference.reference_fd_sample(components_for(tiny_components, name), [PROMPT], None, latents, name,
                                            FD_STEPS, 7.5, key_steps, INJECTION,
                                            step_noise=step_noise_generator(SEED), **variants)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_fasterdiffusion_equals_the_reference(pipes, tiny_components, name):
    latents = initial_latents(1)
    ours = pipes(name)([PROMPT], steps=FD_STEPS, scheduler=name, seed=SEED, latents=latents, policy=fd_policy())
    assert ours.policy["key_steps"] == list(FD_KEYS)
    assert ours.calls["denoiser_encoder"] == len(FD_KEYS)
    assert relative_error(ours.latents, reference(tiny_components, name, latents, FD_KEYS)) <= TOLERANCE
    # The reuse matters on this model: FD differs from the plain sampler by far more than the tolerance.
    plain = pipes(name)([PROMPT], steps=FD_STEPS, scheduler=name, seed=SEED, latents=latents,
                        policy=FasterDiffusionPolicy.baseline(FD_STEPS))
    assert relative_error(ours.latents, plain.latents) > 30 * TOLERANCE


@pytest.mark.parametrize("name", ["euler", "euler-a"])
def test_input_scaling_and_injection_frame_are_both_needed(pipes, tiny_components, name):
    """The reference without scale_model_input at key steps, or injecting α·ε into the σ-space sample as
    it is, is far from fd: fd does both (the comparison above could catch either mistake)."""
    latents = initial_latents(1)
    ours = pipes(name)([PROMPT], steps=FD_STEPS, scheduler=name, seed=SEED, latents=latents, policy=fd_policy())
    unscaled = reference(tiny_components, name, latents, FD_KEYS, scale_input=False)
    sample_frame = reference(tiny_components, name, latents, FD_KEYS, vp_frame=False)
    assert relative_error(ours.latents, unscaled) > 1000 * TOLERANCE
    assert relative_error(ours.latents, sample_frame) > 3 * TOLERANCE


def test_fractional_timesteps_reach_the_graphs_as_float32(pipes, monkeypatch):
    pipe = pipes("euler")
    fed = []
    original = pipe.runner._execute

    def spy(graph, feeds):
        if "timestep" in feeds:
            fed.append((graph, np.array(pipe.runner.download(feeds["timestep"]))))
        return original(graph, feeds)
    monkeypatch.setattr(pipe.runner, "_execute", spy)
    result = pipe([PROMPT], steps=FD_STEPS, scheduler="euler", latents=initial_latents(), policy=fd_policy())
    sampler = make_scheduler("euler", pipe.manifest["scheduler_config"])
    sampler.set_timesteps(FD_STEPS)
    assert np.any(sampler.timesteps != np.round(sampler.timesteps))
    assert result.timesteps == sampler.timesteps.tolist()
    decoded = np.concatenate([t.reshape(-1, 2)[:, 0] for graph, t in fed if graph == "denoiser_decoder"])
    encoded = [t[0] for graph, t in fed if graph == "denoiser_encoder"]
    assert all(t.dtype == np.float32 for _, t in fed)
    assert np.array_equal(decoded, sampler.timesteps)  # every step decoded with its own fractional timestep
    assert np.array_equal(encoded, sampler.timesteps[list(FD_KEYS)])


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if REGISTRY[n].stochastic])
def test_stochastic_samplers_follow_the_seed(pipes, name):
    pipe, latents = pipes(name), initial_latents(2)
    run = lambda seed: pipe([PROMPT], steps=FD_STEPS, scheduler=name, seed=seed, latents=latents,  # noqa: E731
                            policy=fd_policy()).latents
    first = run(5)
    assert np.array_equal(first, run(5))
    assert relative_error(run(6), first) > 1e-2  # same initial latents: only the per-step noise differs


def test_model_scheduler_is_the_folders_own(pipes):
    pipe = pipes("pndm")
    assert pipe.manifest["scheduler_config"]["_class_name"] == "PNDMScheduler"
    own = pipe([PROMPT], steps=FD_STEPS, scheduler="model", latents=initial_latents())
    plms = pipe([PROMPT], steps=FD_STEPS, scheduler="pndm", latents=initial_latents())
    ddim = pipe([PROMPT], steps=FD_STEPS, scheduler="ddim", latents=initial_latents())
    assert np.array_equal(own.latents, plms.latents) and len(own.timesteps) == FD_STEPS + 1
    assert not np.allclose(own.latents, ddim.latents, atol=1e-3)


@pytest.mark.parametrize("name", ["lcm", "pndm"])
def test_few_steps_make_every_step_a_key_step(pipes, name):
    result = pipes(name)([PROMPT], steps=FEW_STEPS, scheduler=name, latents=initial_latents())
    evaluations = len(result.timesteps)
    assert result.policy["key_steps"] == list(range(evaluations))
    assert result.calls["denoiser_encoder"] == evaluations


def test_fd_run_says_once_that_few_steps_use_every_step(tiny_engine, tmp_path, capsys):
    common = ["--engine-dir", str(tiny_engine), "--prompt", PROMPT, "--scheduler", "lcm", "--steps", "4",
              "--out", str(tmp_path / "a.png")]
    assert fd_run(common) == 0
    err = capsys.readouterr().err
    assert err.count("every step is a key step") == 1 and "4 steps" in err
    assert fd_run([*common, "--key-steps", "0,2"]) == 0
    assert "every step is a key step" not in capsys.readouterr().err


def test_unsupported_scheduler_option_is_one_error_line(tiny_engine, tmp_path, capsys):
    folder = tmp_path / "engine"
    shutil.copytree(tiny_engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["scheduler_config"]["use_beta_sigmas"] = True
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code = fd_run(["--engine-dir", str(folder), "--prompt", PROMPT, "--scheduler", "euler", "--steps", "4",
                   "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: use_beta_sigmas=True is not supported by fd's euler scheduler; ")
    assert not (tmp_path / "x.png").exists()


def test_every_scheduler_name_is_accepted_by_fd_run_and_fd_bench():
    from fd.benchmarks.cli import parse_args as fd_bench_args
    for name in CHOICES:
        assert fd_run_args(["--engine-dir", "e", "--prompt", "p", "--scheduler", name]).scheduler == name
        assert fd_bench_args(["--engine-dir", "e", "--scheduler", name]).scheduler == name
    assert fd_run_args(["--engine-dir", "e", "--prompt", "p"]).scheduler == "ddim"
