"""An independent PyTorch reference of FasterDiffusion sampling, for tests.

It uses none of fd's runtime (runtime/*) nor fd's UNet split (builder/split.py), only the scheduler
registry's table of which diffusers class a scheduler name means: text conditioning comes from
diffusers' own pipelines (`encode_prompt`), the samplers are diffusers' schedulers, and the
UNet is split here, on the diffusers UNet2DConditionModel, into

  encoder  time embedding, conv_in, down blocks, mid block → cache (mid output, every skip)
  decoder  a fresh time embedding of its own timestep, up blocks consuming the skips, conv_out.

The sampling loop is the plainest correct FasterDiffusion (Li et al., arXiv 2312.09608): the encoder
runs on the current latent at key steps only; every step decodes the latest cache with that step's own
timestep, one decoder call per step (no batching); guidance combine; prior noise injection
z ← z + α·ε before each scheduler step with t < τ, in the variance-preserving frame (ε the unit initial
noise; for σ-space schedulers, whose sample is z·sqrt(1 + σ_t²), x ← x + α·sqrt(1 + σ_t²)·ε); then the
scheduler's step. The encoder's input goes through the scheduler's scale_model_input at key steps.
With a guidance interval (low, high], a step whose σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) lies outside it uses the
conditional prediction alone (both halves are still computed here; only the selection differs).

SD and SDXL (addition_embed_type "text_time": pooled text embeds and size/crop time ids added to the
time embedding in both halves) are covered.

ControlNets (optional) run at key steps only, on the encoder's input, and their residuals, summed over
the ControlNets as diffusers' MultiControlNetModel sums them, are added to the cached skips and mid
output, which the window's steps then decode (the paper's ControlNet case). Image to image (optional)
truncates the schedule and noises given clean latents as diffusers' img2img pipelines do; key steps then
index the steps that run.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

# Schedulers whose sample is the variance-preserving latent z times sqrt(1 + σ_t²) (they live in σ-space).
SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


@dataclass
class Control:
    """One ControlNet with its prepared image (rows x 3 x H x W, as the UNet's rows) and scale."""

    model: object  # diffusers ControlNetModel
    image: torch.Tensor
    scale: float


def control_image(image, height: int, width: int, rows: int) -> torch.Tensor:
    """A PIL control image prepared by diffusers' own processor (as its ControlNet pipelines), one per row."""
    from diffusers.image_processor import VaeImageProcessor
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    return processor.preprocess(image, height=height, width=width).to(torch.float32).repeat(rows, 1, 1, 1)


def add_control(controls, sample, t, cond, mid, skips):
    """The cache with the ControlNets' residuals added (residuals summed first, as MultiControlNetModel)."""
    total_skips, total_mid = None, None
    for control in controls:
        down, mid_residual = control.model(sample, t, encoder_hidden_states=cond.text, controlnet_cond=control.image,
                                           conditioning_scale=control.scale, added_cond_kwargs=cond.added,
                                           return_dict=False)
        if total_skips is None:
            total_skips, total_mid = list(down), mid_residual
        else:
            total_skips = [a + b for a, b in zip(total_skips, down)]
            total_mid = total_mid + mid_residual
    return mid + total_mid, [skip + residual for skip, residual in zip(skips, total_skips)]


def init_latents(vae, image, noise: np.ndarray, images: int) -> torch.Tensor:
    """The clean img2img latents diffusers makes before add_noise: its processor's preparation of the PIL
    `image`, its VAE's latent distribution sampled with the unit `noise`, scaled, repeated per image."""
    from diffusers.image_processor import VaeImageProcessor
    pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(image)
    with torch.no_grad():
        distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        latent = distribution.mean + distribution.std * torch.as_tensor(noise)
    return (latent * vae.config.scaling_factor).repeat(images, 1, 1, 1)


@dataclass
class Conditioning:
    """UNet conditioning with rows [uncond…, cond…] when guided (as diffusers orders them)."""

    text: torch.Tensor
    added: dict | None = None  # SDXL's added_cond_kwargs {"text_embeds", "time_ids"}, same rows


# --- the UNet split ------------------------------------------------------------------------------------

def _check_supported(unet) -> None:
    config = unet.config
    unsupported = {"class_embed_type": config.class_embed_type, "encoder_hid_dim_type": config.encoder_hid_dim_type,
                   "time_cond_proj_dim": config.time_cond_proj_dim, "center_input_sample": config.center_input_sample,
                   "num_class_embeds": config.num_class_embeds}
    bad = {k: v for k, v in unsupported.items() if v}
    if bad or config.addition_embed_type not in (None, "text_time"):
        raise ValueError(f"the reference split does not handle this UNet config: {bad or config.addition_embed_type}")


def embed_time(unet, timesteps: torch.Tensor, cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
    """The embedding every ResNet block receives: the timestep's, plus SDXL's text/time-id embedding."""
    _check_supported(unet)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype))
    if unet.config.addition_embed_type == "text_time":
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.text, added_cond_kwargs=cond.added)
    return emb if unet.time_embed_act is None else unet.time_embed_act(emb)


def _text(block, text: torch.Tensor) -> dict:
    return {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}


def unet_encode(unet, sample: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning):
    """Encoder half: (mid-block output, [conv_in output, every down-block output…])."""
    emb = embed_time(unet, timesteps, cond, sample.dtype)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for block in unet.down_blocks:
        hidden, outputs = block(hidden_states=hidden, temb=emb, **_text(block, cond.text))
        skips.extend(outputs)
    hidden = unet.mid_block(hidden, emb, **_text(unet.mid_block, cond.text))
    return hidden, skips


def unet_decode(unet, mid: torch.Tensor, skips: list, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Decoder half: the noise prediction from a cache, with a time embedding of `timesteps` (one per row)."""
    if any(side % 2 ** unet.num_upsamplers for side in skips[0].shape[-2:]):
        raise ValueError("latent sides must be multiples of the UNet's total upsampling")
    emb = embed_time(unet, timesteps, cond, mid.dtype)
    hidden, remaining = mid, list(skips)
    for block in unet.up_blocks:
        count = len(block.resnets)
        consumed, remaining = tuple(remaining[-count:]), remaining[:-count]
        hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=consumed, **_text(block, cond.text))
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


# --- text conditioning from diffusers' pipelines --------------------------------------------------------

def make_scheduler(name: str, config: dict):
    """diffusers' scheduler for an fd scheduler name: the one table this reference takes from fd (its registry
    says which diffusers class and config overrides a name means; fd's own numpy schedulers are not used)."""
    from fd.runtime.schedulers import diffusers_scheduler
    return diffusers_scheduler(name, config)


@contextmanager
def numpy_step_noise(scheduler, generator: np.random.Generator | None):
    """Make a diffusers scheduler draw its per-step noise (randn_tensor in its module) from a numpy generator,
    so a stochastic sampler can be given exactly the noise fd draws. None leaves it alone."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if generator is None or original is None:
        yield
        return

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(numpy_generator.standard_normal(tuple(shape), dtype=np.float32)).to(dtype=dtype)
    numpy_generator = generator
    module.randn_tensor = draw
    try:
        yield
    finally:
        module.randn_tensor = original


def vp_scale(scheduler) -> float:
    """sqrt(1 + σ²) at the scheduler's current step for σ-space schedulers, else 1: their sample over z."""
    if type(scheduler).__name__ not in SIGMA_SPACE:
        return 1.0
    sigma = float(scheduler.sigmas[scheduler.step_index])
    return (1.0 + sigma * sigma) ** 0.5


def sd_pipeline(components, scheduler):
    """diffusers' StableDiffusionPipeline on fd's Components (tokenizer, text_encoder, unet, vae)."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_conditioning(components, prompts: list[str], negative_prompt: str | None, guided: bool) -> Conditioning:
    pipe = sd_pipeline(components, make_scheduler("ddim", components.scheduler_config))
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), "cpu", 1, guided, negative)
    return Conditioning(torch.cat([uncond, cond]) if guided else cond)


def sdxl_pipeline(parts, scheduler):
    """diffusers' StableDiffusionXLPipeline on an object with tokenizer(_2), text_encoder(_2), unet, vae
    (fd's Components of the sdxl family have them, and options["force_zeros_for_empty_prompt"])."""
    import diffusers
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=getattr(parts, "options", {}).get("force_zeros_for_empty_prompt", True), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_conditioning(parts, prompts: list[str], negative_prompt: str | None, guided: bool, height: int,
                      width: int) -> Conditioning:
    """SDXL's text embeddings, pooled embeddings and time ids (original = target size, no crop), as
    StableDiffusionXLPipeline builds them. negative_prompt=None gives SDXL's zeroed negative embeddings
    when options["force_zeros_for_empty_prompt"] (the default); "" encodes the empty prompt."""
    pipe = sdxl_pipeline(parts, make_scheduler("ddim", parts.scheduler_config))
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            list(prompts), device="cpu", do_classifier_free_guidance=guided, negative_prompt=negative)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                      text_encoder_projection_dim=parts.text_encoder_2.config.projection_dim)
    if guided:
        cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
    return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(cond), 1)})


# --- the sampling loop ---------------------------------------------------------------------------------

def guided_at(scheduler, t, guidance_interval) -> bool:
    """Whether step t is guided: always without an interval, else when low < σ_t <= high."""
    if guidance_interval is None:
        return True
    alpha_bar = scheduler.alphas_cumprod[int(t)].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().item()
    return guidance_interval[0] < sigma <= guidance_interval[1]


def fd_denoise(unet, scheduler, cond: Conditioning, latents, steps: int, guidance_scale: float, key_steps,
               noise_injection=None, decode_with_key_timestep: bool = False, guidance_interval=None, *,
               step_noise: np.random.Generator | None = None, scale_input: bool = True,
               vp_frame: bool = True, controls=(), init_latents=None, strength: float = 1.0) -> np.ndarray:
    """FasterDiffusion sampling from unit noise `latents`; returns the final latents (float32 numpy).

    `decode_with_key_timestep=True` is a deliberately wrong variant (every step of a window decoded with
    its key step's timestep) that tests use to show a comparison can fail. `guidance_interval` (low, high]
    in σ limits guidance to the steps inside it (None: every step). `step_noise` is the numpy generator a
    stochastic scheduler draws its per-step noise from (numpy_step_noise). Two more wrong variants:
    `scale_input=False` feeds the encoder the unscaled latent, `vp_frame=False` injects α·ε into a σ-space
    sample as it is (without sqrt(1 + σ²)). `controls` (Control, …) run at key steps. `init_latents`
    (clean, scaled latents, one per image) start image to image at `strength`: the last
    int(steps x strength) steps run, from init_latents noised with `latents` to the first of them."""
    keys = set(key_steps) | {0}
    guided = guidance_scale > 1.0
    noise = torch.as_tensor(np.asarray(latents, dtype=np.float32))
    z = noise * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init_latents is not None:  # as StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):  # the multistep schedulers count their own steps
            scheduler.set_begin_index(start)
        z = scheduler.add_noise(torch.as_tensor(init_latents), noise, timesteps[:1].repeat(len(noise)))
    rows = 2 * len(noise) if guided else len(noise)
    with torch.no_grad(), numpy_step_noise(scheduler, step_noise):
        for i, t in enumerate(timesteps):
            if i in keys:
                t_key = t
                latent = torch.cat([z, z]) if guided else z
                # scale_model_input also starts the σ-space schedulers' step counter; call it either way.
                scaled = scheduler.scale_model_input(latent, t)
                model_input = scaled if scale_input else latent
                # Timesteps go in as the scheduler has them: Euler's fractional ones stay float.
                mid, skips = unet_encode(unet, model_input, torch.full((rows,), t.item()), cond)
                if controls:
                    mid, skips = add_control(controls, model_input, t, cond, mid, skips)
            t_decode = t_key if decode_with_key_timestep else t
            prediction = unet_decode(unet, mid, skips, torch.full((rows,), t_decode.item()), cond)
            if guided:
                uncond, text = prediction.chunk(2)
                guide = guided_at(scheduler, t, guidance_interval)
                prediction = uncond + guidance_scale * (text - uncond) if guide else text
            if noise_injection is not None and t < noise_injection[1]:
                # z ← z + α·ε on the variance-preserving latent; a σ-space sample is z·sqrt(1 + σ_t²).
                z = z + noise_injection[0] * (vp_scale(scheduler) if vp_frame else 1.0) * noise
            z = scheduler.step(prediction, t, z, return_dict=False)[0]
    return z.float().numpy()


def reference_fd_sample(components, prompts, negative_prompt, latents, scheduler_name: str, steps: int,
                        guidance_scale: float, key_steps, noise_injection=None, max_window: int | None = None,
                        decode_with_key_timestep: bool = False, guidance_interval=None, **variants) -> np.ndarray:
    """FasterDiffusion on SD components (fd's Components: tokenizer, text_encoder, unet, scheduler_config).

    `noise_injection` is (alpha, tau) or None. `max_window` only splits fd's batched decoder calls,
    which all read the same cache, so the result must not depend on it: it is accepted for symmetry with
    fd's policy and ignored here (this reference decodes one step per call)."""
    cond = sd_conditioning(components, prompts, negative_prompt, guidance_scale > 1.0)
    return fd_denoise(components.unet, make_scheduler(scheduler_name, components.scheduler_config), cond, latents,
                      steps, guidance_scale, key_steps, noise_injection, decode_with_key_timestep, guidance_interval,
                      **variants)


def reference_fd_sample_sdxl(parts, prompts, negative_prompt, latents, scheduler_name: str, steps: int,
                             guidance_scale: float, key_steps, noise_injection=None, height: int | None = None,
                             width: int | None = None, guidance_interval=None, controls=()) -> np.ndarray:
    """FasterDiffusion on SDXL parts (tokenizer, tokenizer_2, text_encoder, text_encoder_2 with projection,
    unet, vae, scheduler_config); height/width default to the latents' size times the VAE's scale. SDXL
    ControlNets (`controls`) read the same added conditions as the UNet."""
    scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    height = height or np.shape(latents)[-2] * scale
    width = width or np.shape(latents)[-1] * scale
    cond = sdxl_conditioning(parts, prompts, negative_prompt, guidance_scale > 1.0, height, width)
    return fd_denoise(parts.unet, make_scheduler(scheduler_name, parts.scheduler_config), cond, latents, steps,
                      guidance_scale, key_steps, noise_injection, guidance_interval=guidance_interval,
                      controls=controls)
