"""Stable Diffusion 1.x / 2.x on the build side: folder loading, the generated models (tiny, tiny-v,
sd15-random), and the text graph (CLIP's last hidden state, which the UNet cross-attends to)."""
from __future__ import annotations

import torch
from torch import nn

from fd.builder.families.base import BuildFamily, CastOutputs, Components
from fd.builder.loading import TINY_SEED, load_weights, make_tiny_tokenizer
from fd.builder.specs import Axis, tensor

# SD1.5's own scheduler config (PNDM with the scaled-linear betas); the runtime builds DDIM / DPM++ from it.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}


def make_tiny_components(seed: int = TINY_SEED) -> Components:
    """A random-weight pipeline with SD1.5's structure (4 UNet levels, 12 skips, 8x VAE) at toy width."""
    return _toy_sd(seed, dict(SD_SCHEDULER_CONFIG), unet=dict(block_out_channels=(32, 32, 64, 64), attention_head_dim=8),
                   text=dict(hidden_act="quick_gelu"))


def _toy_sd(seed: int, scheduler_config: dict, unet: dict, text: dict, pad_token: str | None = None) -> Components:
    """SD's 4-level UNet, 8x VAE and a 2-layer CLIP at toy width; `unet` / `text` set what a version changes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    if pad_token:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **unet,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **text,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), scheduler_config)


# SD1.5's real UNet, VAE and CLIP ViT-L/14 text configs (sd15-random; single-file checkpoints, builder/single_file.py)
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=512,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def make_sd15_random_components(seed: int = TINY_SEED) -> Components:
    """SD1.5's real UNet, VAE and CLIP ViT-L/14 text configs with random weights (no download).

    For benchmarks: the FLOPs and memory of SD1.5, images of noise. The tokenizer is the tiny one (its
    ids fit CLIP's 49408-token vocabulary), so prompts tokenize to different ids than real SD1.5.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **SD15_TEXT_CONFIG,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), dict(SD_SCHEDULER_CONFIG))


# SD 2.1's scheduler config (scheduler/scheduler_config.json): DDIM with v-prediction.
SD2_V_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}


def make_tiny_v_components(seed: int = TINY_SEED) -> Components:
    """SD 2.x's structure (4 UNet levels, 12 skips, 8x VAE, v-prediction) at toy width, 128 px native: upcast
    attention, linear projections, heads growing with the channels (SD2's (5, 10, 20, 20) scaled down), GELU
    text encoder, and a tokenizer padding with "!" as SD 2.x's OpenCLIP one does."""
    return _toy_sd(seed, dict(SD2_V_SCHEDULER_CONFIG),
                   unet=dict(block_out_channels=(16, 32, 64, 64), attention_head_dim=(1, 2, 4, 4),
                             use_linear_projection=True, upcast_attention=True),
                   text=dict(hidden_act="gelu"), pad_token="!")


def make_digits_components(seed: int = TINY_SEED) -> Components:
    """SD's structure trained here on scikit-learn's digits: a yardstick for image quality (fd-bench --quality).
    The trainer is the benchmarks' (fd.benchmarks.digits): it trains on first use and caches the folder."""
    from fd.benchmarks.digits import trained_folder
    from fd.builder.models import load_folder
    folder = trained_folder()
    comps = load_folder(str(folder), f"the digits model at {folder}")
    comps.source = {"path": str(folder.resolve()), "note": "trained by fd.benchmarks.digits on scikit-learn's digits"}
    return comps


class TextEncoderGraph(nn.Module):
    """input_ids → last hidden state (what Stable Diffusion conditions on)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


class StableDiffusionFamily(BuildFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    aliases = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1"}
    generated = {"tiny": make_tiny_components, "tiny-v": make_tiny_v_components,
                 "sd15-random": make_sd15_random_components, "digits": make_digits_components}
    subfolders = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        parts = load_weights(folder, what, {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel,
                                            "unet": UNet2DConditionModel, "vae": AutoencoderKL})
        return Components(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], {})

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=comps.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def text_graphs(self, comps, unet_dtype):
        # fp32 in every precision: it runs once per image, and the legacy exporter makes an invalid graph
        # (mixed LayerNorm types) of transformers 5's CLIP in fp16; the output is cast for the UNet.
        return {"text_encoder": CastOutputs(TextEncoderGraph(comps.text_encoder.float()), unet_dtype).eval()}

    def text_specs(self, comps, unet_dtype):
        length, width = comps.tokenizer.model_max_length, comps.text_encoder.config.hidden_size
        return {"text_encoder": {
            "inputs": [tensor("input_ids", "int64", [Axis("sequence", length)])],
            "outputs": [tensor("text_embeddings", unet_dtype, [Axis("sequence", length), width])]}}

    def conditions(self, comps, unet_dtype):
        length, width = comps.tokenizer.model_max_length, comps.text_encoder.config.hidden_size
        return [tensor("encoder_hidden_states", unet_dtype, [Axis("sequence", length), width])]


FAMILY = StableDiffusionFamily()
