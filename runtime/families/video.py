"""Text to video (AnimateDiff, ModelScope text-to-video): the prompt stage is Stable Diffusion's (CLIP's last hidden
state, "" when no negative prompt is given, as both video pipelines' encode_prompt); the manifest's `frames` makes
the latents (videos, C, F, h, w) and the VAE's output a clip (runtime/video.py)."""
from __future__ import annotations

from fd.runtime.families.sd import StableDiffusion


class AnimateDiff(StableDiffusion):
    name = "animatediff"
    default_guidance_scale = 7.5  # AnimateDiffPipeline's
    noise_injection_tau = 500  # SD1.5's UNet underneath: the paper's SD setting


class TextToVideo(StableDiffusion):
    name = "t2v"
    default_guidance_scale = 9.0  # TextToVideoSDPipeline's
    noise_injection_tau = 500  # SD's betas and timesteps; the paper states no video tau, so SD's
