"""fd's numpy flow-matching Euler scheduler against diffusers' FlowMatchEulerDiscreteScheduler, step by step.

Configs: SD3-medium's and SD3.5's (static shift 3.0), FLUX.1's (dynamic shift: mu from the image's token count,
with FluxPipeline's own sigmas linspace(1, 1/n, n)) and plain shift 1. Timesteps and sigmas must be equal bit
for bit, and every step's output within 1e-6 of diffusers'.
"""
import numpy as np
import pytest
import torch

from fd.runtime.errors import FdError
from fd.runtime.schedulers import FLOW_SCHEDULERS, diffusers_scheduler, make_scheduler, scheduler_for_model
from fd.runtime.schedulers.flow_match import dynamic_shift_mu

SD3 = {  # stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000, "shift": 3.0,
}
FLUX = {  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
PLAIN = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
SD15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SHAPE = (2, 16, 8, 8)


def flux_timestep_options(steps: int, image_seq_len: int) -> dict:
    """What FluxPipeline hands set_timesteps."""
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": dynamic_shift_mu(image_seq_len, FLUX)}


def run_both(config, steps, options=None, seed=0):
    """Drive ours and diffusers through one sampling loop; return the worst |difference| over all steps."""
    options = options or {}
    ours, ref = make_scheduler("flow-euler", config), diffusers_scheduler("flow-euler", config)
    ours.set_timesteps(steps, **options)
    ref.set_timesteps(steps, **options)
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * ours.init_noise_sigma
    x_ref = torch.from_numpy(x.copy())
    worst = 0.0
    for t, t_ref in zip(ours.timesteps, ref.timesteps):
        velocity = rng.standard_normal(SHAPE, dtype=np.float32)
        np.testing.assert_array_equal(ours.scale_model_input(x, t), x)  # flow pipelines never scale the input
        x = ours.step(velocity, t, x)
        x_ref = ref.step(torch.from_numpy(velocity), t_ref, x_ref, return_dict=False)[0]
        worst = max(worst, float(np.abs(x - x_ref.numpy()).max()))
    return worst


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("config", [SD3, PLAIN, {**SD3, "shift": 1.7}], ids=["sd3", "plain", "shift-1.7"])
def test_static_shift_equals_diffusers(config, steps):
    assert run_both(config, steps) <= 1e-6


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096])  # tiny, 256², 512², 1024² (packed 2x2 tokens)
def test_dynamic_shift_equals_diffusers_with_fluxs_sigmas(steps, image_seq_len):
    assert run_both(FLUX, steps, flux_timestep_options(steps, image_seq_len)) <= 1e-6


def test_mu_is_fluxpipelines_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    for seq_len in (16, 256, 1000, 4096, 9216):
        assert dynamic_shift_mu(seq_len, FLUX) == calculate_shift(seq_len, 256, 4096, 0.5, 1.15)


def test_the_shift_really_moves_the_schedule():
    """Guards against a shift that is silently ignored: SD3's shift 3 and FLUX's mu change the sigmas."""
    plain, shifted = make_scheduler("flow-euler", PLAIN), make_scheduler("flow-euler", SD3)
    plain.set_timesteps(10)
    shifted.set_timesteps(10)
    assert np.abs(plain.sigmas - shifted.sigmas).max() > 0.1
    small, large = make_scheduler("flow-euler", FLUX), make_scheduler("flow-euler", FLUX)
    small.set_timesteps(10, **flux_timestep_options(10, 256))
    large.set_timesteps(10, **flux_timestep_options(10, 4096))
    assert np.abs(small.sigmas - large.sigmas).max() > 0.05


def test_add_noise_is_diffusers_scale_noise():
    ours, ref = make_scheduler("flow-euler", SD3), diffusers_scheduler("flow-euler", SD3)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    t = ours.timesteps[[5, 12]]
    want = ref.scale_noise(torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, t), want, rtol=0, atol=1e-6)


def test_vp_scale_and_model_sigmas_are_the_variance_preserving_frame():
    """x_flow = z_vp / (a + b) with s = b / (a + b): vp_scale = 1/(a + b) = sqrt((1-s)² + s²), sigma = b/a = s/(1-s)."""
    sched = make_scheduler("flow-euler", SD3)
    sched.set_timesteps(10)
    t = sched.timesteps[4]
    s = float(sched.sigmas[4])
    a, b = (1 - s) / np.hypot(1 - s, s), s / np.hypot(1 - s, s)  # a² + b² = 1, b / (a + b) = s
    assert b / (a + b) == pytest.approx(s, rel=1e-12)
    assert float(sched.vp_scale(t)) == pytest.approx(1 / (a + b), rel=1e-6)
    assert float(sched.model_sigmas([t])[0]) == pytest.approx(b / a, rel=1e-6)


def test_registry_and_model_resolution():
    """The default name (ddim) means the model's own sampler on a flow model, as `model` does."""
    from fd.runtime.schedulers import DEFAULT
    assert DEFAULT == "ddim" and type(make_scheduler(DEFAULT, SD3)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(diffusers_scheduler(DEFAULT, FLUX)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert FLOW_SCHEDULERS == ("flow-euler",)
    assert scheduler_for_model(SD3) == "flow-euler" == scheduler_for_model(FLUX)
    assert type(make_scheduler("model", FLUX)).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("name,config,message", [
    ("dpmpp-2m", SD3, "--scheduler dpmpp-2m cannot run a flow-matching model .*: use --scheduler flow-euler"),
    ("flow-euler", SD15, "--scheduler flow-euler is for flow-matching models .*: choose one of ddim"),
])
def test_frames_do_not_mix(name, config, message):
    with pytest.raises(FdError, match=message):
        make_scheduler(name, config)


def test_refusals_are_one_line():
    sched = make_scheduler("flow-euler", FLUX)
    with pytest.raises(FdError, match="pass mu to set_timesteps"):
        sched.set_timesteps(10)
    with pytest.raises(FdError, match="use_karras_sigmas=True is not supported by fd's flow-euler"):
        make_scheduler("flow-euler", {**SD3, "use_karras_sigmas": True})
    with pytest.raises(FdError, match="run set_timesteps"):
        make_scheduler("flow-euler", SD3).step(np.zeros(SHAPE, np.float32), 1000.0, np.zeros(SHAPE, np.float32))
