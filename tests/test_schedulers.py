"""The numpy schedulers against diffusers itself as the oracle (CPU, float32), and the scheduler registry.

Every scheduler in the registry is driven through the same loop as its diffusers counterpart (the one
the registry names, with its config overrides): timesteps, sigmas, the scaled model input and every
step's output must agree. Stochastic schedulers get the same per-step noise on both sides: diffusers'
`randn_tensor` is made to draw from a numpy generator seeded like the one fd's scheduler is given.
"""

import inspect
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fd.runtime.errors import FdError  # noqa: E402
from fd.runtime.schedulers import (  # noqa: E402
    CHOICES,
    REGISTRY,
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    diffusers_scheduler,
    make_scheduler,
    scheduler_for_model,
    with_overrides,
)
from tests.fd_reference import numpy_step_noise  # noqa: E402

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
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0 (an Euler config)
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
CONFIGS = {
    "sd15": SD15,
    "sd21": SD21,
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
}
STOCHASTIC = tuple(name for name in SCHEDULERS if REGISTRY[name].stochastic)
SHAPE = (2, 4, 8, 8)
TOL = 3e-5  # relative to max(1, |sample|); a wrong coefficient is off by orders of magnitude more (1.25e-5 seen on
# an AVX-512 CPU with zero-SNR Euler at 14 steps, from the sigma tables' last bits)
SIGMA_RTOL = 5e-6  # a sigma table's last bits vary with the CPU (see run_both); a wrong formula is off by far more


def as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def scaled_error(got, want) -> float:
    want = as_numpy(want)
    assert np.isfinite(want).all()
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def run_both(name, config, steps, seed=0):
    """Drive ours and diffusers through the same sampling loop; return the worst scaled |difference|."""
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    ref_ts = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_ts.dtype  # int64, or float32 where diffusers' are fractional
    if ref_ts.dtype.kind == "f":  # Karras-style timesteps come from the sigmas through log: the same last-bit caveat
        np.testing.assert_allclose(ours.timesteps, ref_ts, rtol=SIGMA_RTOL, atol=0)
    else:
        np.testing.assert_array_equal(ours.timesteps, ref_ts)
    if getattr(ref, "sigmas", None) is not None and getattr(ours, "sigmas", None) is not None:
        # Last bits differ by CPU: torch's float32 sqrt is not always correctly rounded, and numpy's exp/log/power
        # take AVX-512 code paths (SVML) on CPUs that have it: up to ~1.3e-6 relative seen on such a CPU.
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=SIGMA_RTOL, atol=0)
    # sigma_max (or sqrt(sigma_max^2 + 1)) of those sigmas: the same ulp or two (seen on this CI's CPU at 1 step)
    np.testing.assert_allclose(np.float32(ours.init_noise_sigma), np.float32(float(ref.init_noise_sigma)),
                               rtol=SIGMA_RTOL, atol=0)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    worst = 0.0
    ours_noise, ref_noise = np.random.default_rng(seed + 100), np.random.default_rng(seed + 100)
    with numpy_step_noise(ref, ref_noise):
        for t, t_ref in zip(ours.timesteps, ref.timesteps):
            out = rng.standard_normal(SHAPE, dtype=np.float32)
            model_in = ours.scale_model_input(x, t)
            worst = max(worst, scaled_error(model_in, ref.scale_model_input(x_ref, t_ref)))
            x = ours.step(out, t, x, generator=ours_noise)
            x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
            assert x.dtype == np.float32 and x.shape == SHAPE
            worst = max(worst, scaled_error(x, x_ref))
    return worst


def prediction_cases():
    for name in SCHEDULERS:
        for prediction in ("epsilon", "v_prediction"):
            assert prediction in REGISTRY[name].prediction_types
            yield name, prediction


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name,prediction", list(prediction_cases()))
def test_matches_diffusers(name, prediction, config, steps):
    assert run_both(name, {**CONFIGS[config], "prediction_type": prediction}, steps) <= TOL


ZERO_SNR = {
    **SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
}
VARIANTS = {
    "ddim": {
        "defaults": {},  # linear betas, clip_sample=True, set_alpha_to_one=True, leading, offset 0
        "sample-pred-clipped": {**SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5},
        "alpha-to-one": {**SD21, "set_alpha_to_one": True},
        "cosine": {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False, "timestep_spacing": "linspace"},
        "trained-betas": {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist(), "clip_sample": False},
        "zero-snr": ZERO_SNR,
    },
    "dpmpp-2m": {
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
        "karras-config": {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
    },
    "dpmpp-2m-karras": {
        "heun": {**SD15, "solver_type": "heun"},
        "sigma-min": {**SD15, "final_sigmas_type": "sigma_min"},
        "sample-pred": {**SD15, "prediction_type": "sample"},
        "linear": {},
        "trailing-v": {**SD21, "timestep_spacing": "trailing"},
    },
    "euler": {
        "sdxl": SDXL,
        "karras": {**SD15, "use_karras_sigmas": True},
        "karras-bounds": {**SD15, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        "sigma-min": {**SD15, "final_sigmas_type": "sigma_min"},
        "sample-pred": {**SD15, "prediction_type": "sample"},
        "zero-snr": ZERO_SNR,
        "trained-betas": {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    },
    "euler-a": {"sdxl": SDXL, "zero-snr": ZERO_SNR, "linear": {}},
    "pndm": {"alpha-to-one": {**SD15, "set_alpha_to_one": True}, "linear": {}, "cosine": {
        "beta_schedule": "squaredcos_cap_v2"}},
    "unipc": {
        "sigma-min": {**SD15, "final_sigmas_type": "sigma_min"},
        "full-order-final": {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        "no-corrector-some-steps": {**SD15, "disable_corrector": [0, 3]},
        "sample-pred": {**SD15, "prediction_type": "sample"},
        "dpm-names": {**SD15, "solver_type": "midpoint"},
        "leading": {**SD15, "timestep_spacing": "leading"},
        "zero-snr": ZERO_SNR,
    },
    "lcm": {
        "defaults": {},
        "original-100": {**SD15, "original_inference_steps": 100},
        "sample-pred-clipped": {**SD15, "prediction_type": "sample", "clip_sample": True},
        "zero-snr-v": ZERO_SNR,
        "alpha-not-one": {**SD15, "set_alpha_to_one": False},
    },
    "ddpm": {
        "defaults": {},
        "fixed-large": {**SD15, "variance_type": "fixed_large"},
        "fixed-small-log": {**SD15, "variance_type": "fixed_small_log"},
        "trailing": {**SD15, "timestep_spacing": "trailing"},
        "zero-snr": ZERO_SNR,
    },
}


@pytest.mark.parametrize("steps", [25, 14, 1])
@pytest.mark.parametrize("name,variant", [(n, v) for n, variants in VARIANTS.items() for v in variants])
def test_variants_match_diffusers(name, variant, steps):
    assert run_both(name, VARIANTS[name][variant], steps, seed=steps) <= TOL


def test_every_scheduler_has_variants():
    assert set(VARIANTS) == set(SCHEDULERS)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_timesteps_for_many_step_counts(name, spacing):
    config = {**SD15, "timestep_spacing": spacing}
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    for steps in [*range(1, 61), 99, 100, 150, 250, 333, 500, 997, 998, 999, 1000]:
        try:
            ref.set_timesteps(steps)
            expected = ref.timesteps.numpy()
        except (ValueError, IndexError):  # e.g. LCM past its original_inference_steps
            expected = None
        if expected is None or expected.min() < 0 or expected.max() > 999:
            # e.g. 998 trailing steps (float arange overshoots to t=-1) or 999 leading ones with
            # steps_offset 1 (t=1000): diffusers indexes past its table, we refuse.
            with pytest.raises(FdError):
                ours.set_timesteps(steps)
            continue
        ours.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps, expected, err_msg=f"{steps} steps")
        if getattr(ours, "sigmas", None) is not None:
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=SIGMA_RTOL, atol=0, err_msg=f"{steps}")


def test_euler_timesteps_stay_fractional_float32():
    sched = make_scheduler("euler", {**SD15, "timestep_spacing": "linspace"})
    sched.set_timesteps(20)
    assert sched.timesteps.dtype == np.float32
    assert np.any(sched.timesteps != np.round(sched.timesteps))  # e.g. 946.4737: not truncated to an int


@pytest.mark.parametrize(
    "config",
    [SD15, {}, {"beta_schedule": "squaredcos_cap_v2"},
     {"beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 999}],
    ids=["scaled_linear", "linear", "cosine", "linear-999"],
)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_alphas_cumprod_bit_exact(name, config):
    """Betas and their cumulative product reproduce torch's float32 linspace and cumprod exactly."""
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    assert ours.alphas_cumprod.dtype == np.float32
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if "rescale_betas_zero_snr" in REGISTRY[n].defaults])
def test_zero_snr_alphas_cumprod_close(name):
    # The rescale takes square roots; torch's float32 sqrt (MKL) is not always correctly rounded.
    config = {**SD15, "rescale_betas_zero_snr": True}
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    assert ours.alphas_cumprod[-1] == ref.alphas_cumprod[-1].item()  # 0, or 2**-24 where sigmas need it


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name):
    ours, ref = make_scheduler(name, SD21), diffusers_scheduler(name, SD21)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    ts = ours.timesteps[[3, 11]]
    got = ours.add_noise(x0, noise, ts)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(ts)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_config_resolution_follows_from_config(name):
    spec = REGISTRY[name]
    sched, ref = make_scheduler(name, SD15), diffusers_scheduler(name, SD15)
    # diffusers' .config also carries the foreign keys along; its __init__ takes only these.
    init_keys = set(inspect.signature(type(ref).__init__).parameters) - {"self"}
    assert set(spec.defaults) == set(sched.config) == init_keys
    for key, value in sched.config.items():
        assert value == ref.config[key], key
    for key, value in spec.overrides.items():
        assert sched.config[key] == value
    # A live scheduler's config lists keys it only defaulted; those must take *our* class's defaults.
    live = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in live["_use_default_values"]
    sched, ref = make_scheduler(name, live), diffusers_scheduler(name, live)
    assert sched.config["timestep_spacing"] == ref.config["timestep_spacing"]
    sched.set_timesteps(10)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())


def test_overrides_win_over_defaulted_keys():
    # A live PNDM config lists skip_prk_steps among its defaults when it was never set; pndm still sets it.
    live = dict(diffusers.PNDMScheduler.from_config({}).config)
    assert "skip_prk_steps" in live["_use_default_values"]
    assert make_scheduler("pndm", live).config["skip_prk_steps"] is True
    assert diffusers_scheduler("pndm", live).config.skip_prk_steps is True
    assert "skip_prk_steps" not in with_overrides(live, {"skip_prk_steps": True})["_use_default_values"]


def test_default_spacings_differ_like_diffusers():
    assert DDIMScheduler({}).config["timestep_spacing"] == "leading"
    assert DPMSolverMultistepScheduler({}).config["timestep_spacing"] == "linspace"
    assert DDIMScheduler(SD15).config["steps_offset"] == 1
    assert DPMSolverMultistepScheduler({}).config["steps_offset"] == 0


UNSUPPORTED = [
    ("ddim", {"prediction_type": "flow_prediction"}),
    ("ddim", {"timestep_spacing": "karras"}),
    ("ddim", {"beta_schedule": "sigmoid"}),
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
    ("dpmpp-2m", {"variance_type": "fixed_large"}),
    ("dpmpp-2m", {"prediction_type": "flow_prediction"}),
    ("dpmpp-2m", {"final_sigmas_type": "denoise_to_zero"}),
    ("dpmpp-2m-karras", {"use_beta_sigmas": True}),
    ("euler", {"use_beta_sigmas": True}),
    ("euler", {"use_exponential_sigmas": True}),
    ("euler", {"interpolation_type": "log_linear"}),
    ("euler", {"timestep_type": "continuous"}),
    ("euler", {"final_sigmas_type": "denoise_to_zero"}),
    ("euler", {"prediction_type": "flow_prediction"}),
    ("euler-a", {"prediction_type": "sample"}),
    ("euler-a", {"beta_schedule": "sigmoid"}),
    ("pndm", {"prediction_type": "sample"}),
    ("pndm", {"timestep_spacing": "karras"}),
    ("unipc", {"thresholding": True}),
    ("unipc", {"use_karras_sigmas": True}),
    ("unipc", {"use_flow_sigmas": True}),
    ("unipc", {"use_beta_sigmas": True}),
    ("unipc", {"predict_x0": False}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_type": "bh1"}),
    ("unipc", {"lower_order_final": False}),
    ("unipc", {"prediction_type": "flow_prediction"}),
    ("lcm", {"thresholding": True}),
    ("lcm", {"prediction_type": "flow_prediction"}),
    ("ddpm", {"beta_schedule": "sigmoid"}),
    ("ddpm", {"variance_type": "learned"}),
]  # thresholding (ddim, ddpm, dpmpp-2m) and ddpm's learned_range are supported: tests/test_if.py


@pytest.mark.parametrize("name,extra", UNSUPPORTED, ids=[f"{n}-{k}={v}" for n, e in UNSUPPORTED for k, v in e.items()])
def test_unsupported_options_raise_one_line_naming_the_option(name, extra):
    (key, value), = extra.items()
    with pytest.raises(FdError, match=f"is not supported by fd's {name} scheduler; ") as caught:
        make_scheduler(name, {**SD15, **extra})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{key}=")


def test_every_scheduler_refuses_some_option():
    assert {name for name, _ in UNSUPPORTED} == set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_before_set_timesteps_raises(name):
    sched = make_scheduler(name, SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(FdError, match="run set_timesteps"):
        sched.step(x, 999, x, generator=np.random.default_rng(0))


@pytest.mark.parametrize("steps", [0, -3, 1001])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_count_out_of_range_raises(name, steps):
    with pytest.raises(FdError, match="num_inference_steps"):
        make_scheduler(name, SD15).set_timesteps(steps)


def test_lcm_boundary_scalings_match_diffusers_near_zero():
    # At the schedule's timesteps (t >= 19) c_skip ~ 0 and c_out ~ 1 barely move a step; check them where they do.
    ours, ref = make_scheduler("lcm", SD15), diffusers_scheduler("lcm", SD15)
    for t in (0, 1, 2, 5, 19, 999):
        want = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        np.testing.assert_allclose(ours._boundary_scalings(t), [float(w) for w in want], rtol=1e-6)


def test_lcm_refuses_more_steps_than_its_distillation_schedule():
    with pytest.raises(FdError, match="runs at most 50 steps"):
        make_scheduler("lcm", SD15).set_timesteps(51)


def test_karras_schedule_that_repeats_its_first_timestep_is_refused():
    with pytest.raises(FdError, match="start with timestep 998 twice"):
        make_scheduler("dpmpp-2m-karras", {"beta_schedule": "squaredcos_cap_v2"}).set_timesteps(4)


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-a", "unipc", "lcm"])
def test_out_of_order_and_extra_steps_raise(name):
    sched = make_scheduler(name, SD15)
    sched.set_timesteps(3)
    x, gen = np.zeros(SHAPE, np.float32), np.random.default_rng(0)
    sched.step(x, sched.timesteps[0], x, generator=gen)
    with pytest.raises(FdError, match="step in order"):
        sched.step(x, sched.timesteps[2], x, generator=gen)
    for t in sched.timesteps[1:]:
        sched.step(x, t, x, generator=gen)
    with pytest.raises(FdError, match="run set_timesteps again"):
        sched.step(x, sched.timesteps[-1], x, generator=gen)
    sched.set_timesteps(3)  # resets the history
    assert sched.step_index is None


def test_dpm_leading_schedule_past_last_timestep_raises():
    # 999 leading steps with steps_offset 1 would ask the model for t = 1000; diffusers clamps its sigma.
    with pytest.raises(FdError, match="reaches t=1000, outside the model's 0..999"):
        make_scheduler("dpmpp-2m", {**SD15, "timestep_spacing": "leading"}).set_timesteps(999)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_steps_need_a_generator_and_follow_its_seed(name):
    def run(seed):
        sched = make_scheduler(name, SD15)
        sched.set_timesteps(4)
        x = np.ones(SHAPE, np.float32)
        gen = None if seed is None else np.random.default_rng(seed)
        for t in sched.timesteps:
            x = sched.step(np.zeros(SHAPE, np.float32), t, x, generator=gen)
        return x
    assert np.array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2), atol=1e-3)
    with pytest.raises(FdError, match="pass generator="):
        run(None)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_vp_scale_is_the_sample_over_the_variance_preserving_latent(name):
    """vp_scale(t) * scale_model_input(x, t) == x: 1 for VP schedulers, sqrt(1 + sigma_t^2) for Euler's."""
    sched = make_scheduler(name, SD15)
    sched.set_timesteps(10)
    x = np.full(SHAPE, 2.0, np.float32)
    t = sched.timesteps[0]
    scale = float(sched.vp_scale(t))
    np.testing.assert_allclose(scale * sched.scale_model_input(x, t), x, rtol=1e-6)
    if name.startswith("euler"):
        assert scale == pytest.approx((1 + float(sched.sigmas[0]) ** 2) ** 0.5, rel=1e-6) and scale > 10
    else:
        assert scale == 1.0


def test_registry_names_and_diffusers_classes():
    assert set(SCHEDULERS) == {"ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-a", "pndm", "unipc", "lcm",
                               "ddpm"}
    assert CHOICES == (*SCHEDULERS, "flow-euler", "model")  # flow-matching samplers: tests/test_flow_match.py
    assert set(STOCHASTIC) == {"euler-a", "lcm", "ddpm"}
    for name, spec in REGISTRY.items():
        assert type(diffusers_scheduler(name, SD15)).__name__ == spec.diffusers_class
    assert make_scheduler("dpmpp-2m", {**SD15, "use_karras_sigmas": True}).config["use_karras_sigmas"] is False


@pytest.mark.parametrize("config,name", [
    (SD15, "pndm"), (SD21, "ddim"), (SDXL, "euler"),
    ({**SD15, "_class_name": "EulerAncestralDiscreteScheduler"}, "euler-a"),
    ({**SD15, "_class_name": "DPMSolverMultistepScheduler"}, "dpmpp-2m"),
    ({**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp-2m-karras"),
    ({**SD15, "_class_name": "UniPCMultistepScheduler"}, "unipc"),
    ({**SD15, "_class_name": "LCMScheduler"}, "lcm"),
    ({**SD15, "_class_name": "DDPMScheduler"}, "ddpm"),
])
def test_model_scheduler_is_the_class_the_config_names(config, name):
    assert scheduler_for_model(config) == name
    assert type(make_scheduler("model", config)) is REGISTRY[name].fd_class


@pytest.mark.parametrize("config,message", [
    ({**SD15, "_class_name": "LMSDiscreteScheduler"}, "the model's scheduler is LMSDiscreteScheduler, which fd does "
                                                      "not offer: choose --scheduler ddim, "),
    ({"beta_schedule": "scaled_linear"}, "not named in its scheduler config"),
    ({**SD15, "skip_prk_steps": False}, "the model's PNDMScheduler sets skip_prk_steps=False, which fd does not run"),
])
def test_model_scheduler_fd_does_not_run_is_refused(config, message):
    with pytest.raises(FdError, match=message):
        make_scheduler("model", config)


def test_unknown_scheduler_name_raises():
    with pytest.raises(FdError, match="unknown scheduler 'heun'; choose one of: ddim, dpmpp-2m, .*, model"):
        make_scheduler("heun", SD15)


def test_runtime_does_not_import_torch_or_diffusers():
    code = (
        "import sys, numpy as np, runtime.schedulers as s\n"
        "for name in s.SCHEDULERS:\n"
        "    x = np.zeros((1, 4, 2, 2), np.float32); sc = s.make_scheduler(name, {}); sc.set_timesteps(5)\n"
        "    sc.step(x, sc.timesteps[0], sc.scale_model_input(x, sc.timesteps[0]), generator=np.random.default_rng(0))\n"
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
