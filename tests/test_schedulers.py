"""The numpy schedulers against diffusers itself as the oracle (CPU, float32)."""

import inspect
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from runtime.errors import FdError  # noqa: E402
from runtime.schedulers import (  # noqa: E402
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    make_scheduler,
)

logging.getLogger("diffusers").setLevel(logging.ERROR)  # from_config warns about foreign keys

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json (a PNDM config)
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 (a DDIM config without timestep_spacing)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
CONFIGS = {
    "sd15": SD15,
    "sd21": SD21,
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
}
ORACLES = {"ddim": diffusers.DDIMScheduler, "dpmpp-2m": diffusers.DPMSolverMultistepScheduler}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5  # relative to max(1, |sample|); a wrong coefficient is off by orders of magnitude more


def run_both(name, config, steps, seed=0):
    """Drive ours and diffusers through the same loop; return the worst scaled |difference|."""
    ours, ref = make_scheduler(name, config), ORACLES[name].from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    worst = 0.0
    for t in ours.timesteps:
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        x = ours.step(out, int(t), ours.scale_model_input(x, int(t)))
        x_ref = ref.scale_model_input(x_ref, t)
        x_ref = ref.step(torch.from_numpy(out), torch.tensor(int(t)), x_ref).prev_sample
        assert x.dtype == np.float32 and x.shape == SHAPE
        expected = x_ref.numpy()
        assert np.isfinite(expected).all()
        worst = max(worst, float(np.abs(x - expected).max() / max(1.0, np.abs(expected).max())))
    return worst


@pytest.mark.parametrize("steps", [50, 20, 13, 7])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers(name, prediction, config, steps):
    assert run_both(name, {**CONFIGS[config], "prediction_type": prediction}, steps) <= TOL


ZERO_SNR = {
    **SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
}
DDIM_VARIANTS = {
    "defaults": {},  # linear betas, clip_sample=True, set_alpha_to_one=True, leading, offset 0
    "sample-pred-clipped": {
        **SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5,
    },
    "alpha-to-one": {**SD21, "set_alpha_to_one": True},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False, "timestep_spacing": "linspace"},
    "trained-betas": {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist(), "clip_sample": False},
    "zero-snr": ZERO_SNR,
}
DPM_VARIANTS = {
    "heun": {**SD15, "solver_type": "heun"},
    "sigma-min": {**SD15, "final_sigmas_type": "sigma_min"},
    "sigma-min-full-order": {**SD15, "final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler-at-final": {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True},
    "leading": {**SD15, "timestep_spacing": "leading"},
    "sample-pred": {**SD15, "prediction_type": "sample"},
    "cosine-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    "zero-snr": ZERO_SNR,
    "zero-snr-eps": {**ZERO_SNR, "prediction_type": "epsilon"},
    "unipc-names": {**SD15, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh2"},
}


@pytest.mark.parametrize("steps", [25, 14, 1])
@pytest.mark.parametrize(
    "name,variant",
    [("ddim", v) for v in DDIM_VARIANTS] + [("dpmpp-2m", v) for v in DPM_VARIANTS],
)
def test_variants_match_diffusers(name, variant, steps):
    config = (DDIM_VARIANTS if name == "ddim" else DPM_VARIANTS)[variant]
    assert run_both(name, config, steps, seed=steps) <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_timesteps_for_many_step_counts(name, spacing):
    config = {**SD15, "timestep_spacing": spacing}
    ours, ref = make_scheduler(name, config), ORACLES[name].from_config(config)
    for steps in [*range(1, 61), 99, 100, 150, 250, 333, 500, 997, 998, 999, 1000]:
        ref.set_timesteps(steps)
        expected = ref.timesteps.numpy()
        if expected.min() < 0 or expected.max() > 999:
            # e.g. 998 trailing steps (float arange overshoots to t=-1) or 999 leading ones with
            # steps_offset 1 (t=1000): diffusers indexes past its table, we refuse.
            with pytest.raises(FdError, match="outside the model's 0..999"):
                ours.set_timesteps(steps)
            continue
        ours.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=f"{steps} steps")
        if name == "dpmpp-2m":
            # torch's float32 sqrt is not always correctly rounded (numpy's is): allow an ulp or two.
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=3e-7, atol=0, err_msg=f"{steps}")


@pytest.mark.parametrize(
    "config",
    [SD15, {}, {"beta_schedule": "squaredcos_cap_v2"},
     {"beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 999}],
    ids=["scaled_linear", "linear", "cosine", "linear-999"],
)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_alphas_cumprod_bit_exact(name, config):
    """Betas and their cumulative product reproduce torch's float32 linspace and cumprod exactly."""
    ours, ref = make_scheduler(name, config), ORACLES[name].from_config(config)
    assert ours.alphas_cumprod.dtype == np.float32
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("name", SCHEDULERS)
def test_zero_snr_alphas_cumprod_close(name):
    # The rescale takes square roots; torch's float32 sqrt (MKL) is not always correctly rounded.
    config = {**SD15, "rescale_betas_zero_snr": True}
    ours, ref = make_scheduler(name, config), ORACLES[name].from_config(config)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    assert ours.alphas_cumprod[-1] == ref.alphas_cumprod[-1].item()  # 0 for ddim, 2**-24 for dpm


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name):
    ours, ref = make_scheduler(name, SD21), ORACLES[name].from_config(SD21)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    ts = ours.timesteps[[3, 11]]
    got = ours.add_noise(x0, noise, ts)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_config_resolution_follows_from_config(name):
    sched = make_scheduler(name, SD15)
    ref = ORACLES[name].from_config(SD15)
    # diffusers' .config also carries the foreign keys along; its __init__ takes only these.
    assert set(sched.config) == set(inspect.signature(ORACLES[name].__init__).parameters) - {"self"}
    for key, value in sched.config.items():
        assert value == ref.config[key], key
    # A live scheduler's config lists keys it only defaulted; those must take *our* class's defaults.
    live = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in live["_use_default_values"]
    sched, ref = make_scheduler(name, live), ORACLES[name].from_config(live)
    assert sched.config["timestep_spacing"] == ref.config["timestep_spacing"]
    sched.set_timesteps(10)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())


def test_default_spacings_differ_like_diffusers():
    assert DDIMScheduler({}).config["timestep_spacing"] == "leading"
    assert DPMSolverMultistepScheduler({}).config["timestep_spacing"] == "linspace"
    assert DDIMScheduler(SD15).config["steps_offset"] == 1
    assert DPMSolverMultistepScheduler({}).config["steps_offset"] == 0


UNSUPPORTED = [
    ("ddim", {"thresholding": True}),
    ("ddim", {"prediction_type": "flow_prediction"}),
    ("ddim", {"timestep_spacing": "karras"}),
    ("ddim", {"beta_schedule": "sigmoid"}),
    ("dpmpp-2m", {"thresholding": True}),
    ("dpmpp-2m", {"use_karras_sigmas": True}),
    ("dpmpp-2m", {"use_exponential_sigmas": True}),
    ("dpmpp-2m", {"use_beta_sigmas": True}),
    ("dpmpp-2m", {"use_lu_lambdas": True}),
    ("dpmpp-2m", {"use_flow_sigmas": True}),
    ("dpmpp-2m", {"use_dynamic_shifting": True}),
    ("dpmpp-2m", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp-2m", {"algorithm_type": "dpmsolver"}),
    ("dpmpp-2m", {"solver_order": 3}),
    ("dpmpp-2m", {"solver_order": 1}),
    ("dpmpp-2m", {"solver_type": "unknown"}),
    ("dpmpp-2m", {"variance_type": "learned_range"}),
    ("dpmpp-2m", {"prediction_type": "flow_prediction"}),
    ("dpmpp-2m", {"final_sigmas_type": "denoise_to_zero"}),
]


@pytest.mark.parametrize("name,extra", UNSUPPORTED, ids=[f"{n}-{k}={v}" for n, e in UNSUPPORTED for k, v in e.items()])
def test_unsupported_options_raise(name, extra):
    with pytest.raises(FdError, match=f"is not supported by fd's {name} scheduler; "):
        make_scheduler(name, {**SD15, **extra})


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_before_set_timesteps_raises(name):
    sched = make_scheduler(name, SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(FdError, match="run set_timesteps"):
        sched.step(x, 999, x)


@pytest.mark.parametrize("steps", [0, -3, 1001])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_count_out_of_range_raises(name, steps):
    with pytest.raises(FdError, match="num_inference_steps"):
        make_scheduler(name, SD15).set_timesteps(steps)


def test_dpm_out_of_order_and_extra_steps_raise():
    sched = make_scheduler("dpmpp-2m", SD15)
    sched.set_timesteps(3)
    x = np.zeros(SHAPE, np.float32)
    sched.step(x, int(sched.timesteps[0]), x)
    with pytest.raises(FdError, match="step in order"):
        sched.step(x, int(sched.timesteps[2]), x)
    for t in sched.timesteps[1:]:
        sched.step(x, int(t), x)
    with pytest.raises(FdError, match="run set_timesteps again"):
        sched.step(x, int(sched.timesteps[-1]), x)
    sched.set_timesteps(3)  # resets the history
    assert sched.step_index is None and sched.lower_order_nums == 0


def test_dpm_leading_schedule_past_last_timestep_raises():
    # 999 leading steps with steps_offset 1 would ask the model for t = 1000; diffusers clamps its sigma.
    with pytest.raises(FdError, match="reaches t=1000, outside the model's 0..999"):
        make_scheduler("dpmpp-2m", {**SD15, "timestep_spacing": "leading"}).set_timesteps(999)


def test_unknown_scheduler_name_raises():
    with pytest.raises(FdError, match="ddim, dpmpp-2m"):
        make_scheduler("euler", SD15)


def test_runtime_does_not_import_torch_or_diffusers():
    code = (
        "import sys, runtime.schedulers as s; s.make_scheduler('dpmpp-2m', {}).set_timesteps(5); "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
