"""DeepFloyd IF's oracles for tests/test_if.py, written here and not in fd: diffusers' IFPipeline and
IFSuperResolutionPipeline as fd's comparisons call them, IFPipeline's seeded noise, and an independent
FasterDiffusion reference on diffusers' own IF UNet forward (hooks capture conv_in, every down block and the mid
block at key steps and replace their outputs at the other steps, so the decoder half never reads the current
sample; diffusers recomputes the prompt terms at every call; diffusers' schedulers step)."""
from __future__ import annotations

import numpy as np
import torch

from fd.builder.families import FAMILIES

GUIDANCE = 7.0  # IFPipeline's default, and fd's for this family
INJECTION = (0.003, 500)  # fd's default for IF


def diffusers_scheduler(name: str, config: dict):
    """diffusers' scheduler as IFPipeline runs it: DDIM must drop the variance channels (variance_type
    fixed_small, so the pipeline slices them off); DDPM and DPM++ keep IF's learned_range."""
    import diffusers
    classes = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
               "dpmpp-2m": diffusers.DPMSolverMultistepScheduler}
    return classes[name].from_config({**config, "variance_type": "fixed_small"} if name == "ddim" else config)


def if_pipeline(comps, scheduler):
    pipe = FAMILIES["if"].diffusers_pipeline(comps, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded_noise(seed: int, batch: int, side: int, steps: int):
    """What IFPipeline's generator(seed) draws: the initial image noise, then one draw per DDPM step with t > 0."""
    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn((batch, 3, side, side), generator=generator)
    return initial.numpy(), [torch.randn((batch, 3, side, side), generator=generator).numpy() for _ in range(steps)]


def forward_capturing(unet, sample, timesteps, text, **kwargs):
    """diffusers' own UNet forward, keeping conv_in's, every down block's and the mid block's outputs."""
    cache, hooks = {}, []
    hooks.append(unet.conv_in.register_forward_hook(lambda m, a, out: cache.update(conv_in=out)))
    for k, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, k=k: cache.update({("down", k): out})))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: cache.update(mid=out)))
    try:
        unet(sample, timesteps, encoder_hidden_states=text, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return cache


def forward_from_cache(unet, cache, shape, timesteps, text, **kwargs):
    """diffusers' own UNet forward with those outputs replaced by the cached ones (the encoder half runs on zeros
    and is discarded: nothing of the current sample is read); the up blocks see this call's timesteps."""
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: cache["conv_in"])]
    for k, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, k=k: cache[("down", k)]))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: cache["mid"]))
    try:
        return unet(torch.zeros(shape), timesteps, encoder_hidden_states=text, **kwargs).sample
    finally:
        for hook in hooks:
            hook.remove()


def reference_fd(comps, prompts, scheduler_name, steps, seed, key_steps, noise_injection=INJECTION,
                 decode_with_key_timestep=False, variance_rows="cond"):
    """FasterDiffusion in its plainest form on diffusers' IF UNet and scheduler: the encoder half at key steps,
    every step decoded from the latest cache with its own timestep (one call per step), guidance on the noise
    channels with the conditional rows' variance (as IFPipeline), z ← z + α·ε before each step with t < τ, then
    the scheduler's step with the generator IFPipeline would use. The last two arguments are wrong variants."""
    scheduler = diffusers_scheduler(scheduler_name, comps.scheduler_config)
    pipe = if_pipeline(comps, scheduler)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(list(prompts), True, device="cpu", clean_caption=False)
        text = torch.cat([negative, embeds])
        noise = torch.randn((len(prompts), 3, 16, 16), generator=generator)
        z = noise.clone()
        scheduler.set_timesteps(steps)
        keys = set(key_steps) | {0}
        learned = scheduler.config.get("variance_type") in ("learned", "learned_range")
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([z, z])
            if i in keys:
                t_key = t
                cache = forward_capturing(comps.unet, scheduler.scale_model_input(rows, t), t.repeat(len(rows)), text)
            t_decode = t_key if decode_with_key_timestep else t
            prediction = forward_from_cache(comps.unet, cache, rows.shape, t_decode.repeat(len(rows)), text)
            uncond, cond = prediction.chunk(2)
            eps = uncond[:, :3] + GUIDANCE * (cond[:, :3] - uncond[:, :3])
            if learned:
                eps = torch.cat([eps, (cond if variance_rows == "cond" else uncond)[:, 3:]], dim=1)
            if noise_injection is not None and t < noise_injection[1]:
                z = z + noise_injection[0] * noise
            z = scheduler.step(eps, t, z, generator=generator, return_dict=False)[0]
    return z.numpy()


def sr_noise(seed, steps):
    """IFSuperResolutionPipeline's draws from generator(seed): the initial noise, the upscaling noise, then one
    per DDPM step."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn((2, 3, 32, 32), generator=generator).numpy()  # noqa: E731
    return draw(), draw(), [draw() for _ in range(steps)]
