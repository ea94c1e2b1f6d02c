"""SDXL on the torch side: its components, the tiny and SDXL-shaped generated models, folder I/O, and the
two text-encoder graphs.

SDXL conditions its UNet on two CLIP text encoders: the penultimate hidden states of both, concatenated
on the feature axis, are the cross-attention text; the second encoder's pooled projection (`text_embeds`)
and six size/crop ids (`time_ids`) feed the UNet's added "text_time" embedding.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fd.builder.families.base import BuildFamily, CastOutputs, Components
from fd.builder.loading import TINY_SEED, load_weights, make_tiny_tokenizer
from fd.builder.specs import Axis, tensor
from fd.runtime.errors import FdError

TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)

# SDXL base 1.0's scheduler config (scheduler/scheduler_config.json).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "interpolation_type": "linear", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    "clip_sample": False,
}
SDXL_VAE_SCALING_FACTOR = 0.13025
SUBFOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")


def text_time_sizes(unet, text_encoder_2) -> dict[str, int]:
    """Widths of the added conditions: {"text_embeds": pooled width, "time_ids": 6}.

    The UNet's add_embedding reads text_embeds then one sinusoid per time id; a model whose widths do not
    add up that way (e.g. the refiner's 5 ids with an aesthetic score) is refused.
    """
    cfg = unet.config
    pooled = text_encoder_2.config.projection_dim
    per_id = cfg.addition_time_embed_dim
    if per_id is None or cfg.projection_class_embeddings_input_dim != pooled + TIME_IDS * per_id:
        raise FdError(f"this SDXL UNet's added embedding takes {cfg.projection_class_embeddings_input_dim} "
                      f"features, not {pooled} pooled text + {TIME_IDS} time ids x {per_id}: fd supports "
                      "SDXL base-style UNets (not the refiner)")
    return {"text_embeds": pooled, "time_ids": TIME_IDS}


# --- graphs ------------------------------------------------------------------------------------------

class TextEncoderXLGraph(nn.Module):
    """input_ids → penultimate hidden state of SDXL's first text encoder (what SDXL conditions on)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class TextEncoder2XLGraph(nn.Module):
    """input_ids → (penultimate hidden state, pooled projection `text_embeds`) of SDXL's second encoder."""

    def __init__(self, text_encoder_2):
        super().__init__()
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids):
        out = self.text_encoder_2(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


# --- generated models --------------------------------------------------------------------------------

def make_tiny_xl_components(seed: int = TINY_SEED) -> Components:
    """A random-weight pipeline with SDXL's structure at toy width, 128 px native.

    As SDXL: two CLIP text encoders (the second with a projection, its tokenizer padding with "!"),
    3 UNet levels (DownBlock2D, then two cross-attention levels with more transformer layers deeper),
    the "text_time" added embedding, linear projections, an 8x VAE with force_upcast and SDXL's scaling
    factor, and SDXL's Euler scheduler config. Widths differ per encoder so a mixed-up concat shows.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = make_tiny_tokenizer(), _open_clip_style(make_tiny_tokenizer())
    text_dims, pooled_dim, time_dim = (32, 64), 32, 8
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(CLIPTextConfig, tokenizer, text_dims[0], layers=2,
                                              act="quick_gelu", projection=text_dims[0]))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(CLIPTextConfig, tokenizer_2, text_dims[1], layers=3,
                                                              act="gelu", projection=pooled_dim))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=sum(text_dims), addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + TIME_IDS * time_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
        scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True,
    )
    return _components(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, dict(SDXL_SCHEDULER_CONFIG))


def make_sdxl_random_components(seed: int = TINY_SEED) -> Components:
    """SDXL base 1.0's real UNet, VAE and text-encoder configs with random weights (no download).

    For benchmarks: the FLOPs and memory of SDXL (about 3.5 B parameters), images of noise. The tokenizers
    are the tiny one (its ids fit CLIP's 49408-token vocabulary), so prompts tokenize differently.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = make_tiny_tokenizer(), _open_clip_style(make_tiny_tokenizer())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(CLIPTextConfig, tokenizer, 768, layers=12, act="quick_gelu",
                                              projection=768, heads=12, intermediate=3072, vocab=49408))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(
        CLIPTextConfig, tokenizer_2, 1280, layers=32, act="gelu", projection=1280, heads=20, intermediate=5120,
        vocab=49408))
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=SDXL_VAE_SCALING_FACTOR,
        force_upcast=True,
    )
    return _components(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, dict(SDXL_SCHEDULER_CONFIG))


def _clip_config(config_class, tokenizer, hidden: int, *, layers: int, act: str, projection: int, heads: int = 4,
                 intermediate: int | None = None, vocab: int | None = None):
    return config_class(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        projection_dim=projection, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _open_clip_style(tokenizer):
    """Pad with "!" as SDXL's tokenizer_2 does (OpenCLIP pads with id 0, which is "!" in its vocabulary)."""
    tokenizer.add_special_tokens({"pad_token": "!"})
    return tokenizer


# --- folders -----------------------------------------------------------------------------------------

def _components(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler_config,
                force_zeros_for_empty_prompt: bool = True) -> Components:
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), scheduler_config, family="sdxl",
                      tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2.eval(),
                      # no negative prompt: zeros as the unconditional embeddings (diffusers' default for SDXL)
                      options={"force_zeros_for_empty_prompt": bool(force_zeros_for_empty_prompt)})


class StableDiffusionXLFamily(BuildFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    aliases = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
    generated = {"tiny-xl": make_tiny_xl_components, "sdxl-random": make_sdxl_random_components}
    subfolders = SUBFOLDERS

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        parts = load_weights(folder, what, {
            "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection, "unet": UNet2DConditionModel, "vae": AutoencoderKL})
        index = json.loads((Path(folder) / "model_index.json").read_text())
        comps = _components(parts["tokenizer"], parts["tokenizer_2"], parts["text_encoder"], parts["text_encoder_2"],
                            parts["unet"], parts["vae"], {}, index.get("force_zeros_for_empty_prompt", True))
        text_time_sizes(comps.unet, comps.text_encoder_2)  # refuse the refiner's layout in one line
        return comps

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=comps.options["force_zeros_for_empty_prompt"], add_watermarker=False)

    def text_graphs(self, comps, unet_dtype):
        # fp32 inside (as SD's text encoder), outputs cast for the UNet
        return {"text_encoder": CastOutputs(TextEncoderXLGraph(comps.text_encoder.float()), unet_dtype).eval(),
                "text_encoder_2": CastOutputs(TextEncoder2XLGraph(comps.text_encoder_2.float()), unet_dtype).eval()}

    def text_specs(self, comps, unet_dtype):
        def ids(tokenizer):
            return tensor("input_ids", "int64", [Axis("sequence", tokenizer.model_max_length)])

        def hidden(tokenizer, encoder):
            return tensor("hidden_states", unet_dtype, [Axis("sequence", tokenizer.model_max_length),
                                                        encoder.config.hidden_size])
        pooled = text_time_sizes(comps.unet, comps.text_encoder_2)["text_embeds"]
        return {
            "text_encoder": {"inputs": [ids(comps.tokenizer)], "outputs": [hidden(comps.tokenizer, comps.text_encoder)]},
            "text_encoder_2": {"inputs": [ids(comps.tokenizer_2)],
                               "outputs": [hidden(comps.tokenizer_2, comps.text_encoder_2),
                                           tensor("text_embeds", unet_dtype, [pooled])]},
        }

    def conditions(self, comps, unet_dtype):
        sizes = text_time_sizes(comps.unet, comps.text_encoder_2)
        width = comps.text_encoder.config.hidden_size + comps.text_encoder_2.config.hidden_size
        return [tensor("encoder_hidden_states", unet_dtype, [Axis("sequence", comps.tokenizer.model_max_length), width]),
                tensor("text_embeds", unet_dtype, [sizes["text_embeds"]]),
                tensor("time_ids", "float32", [sizes["time_ids"]])]  # sizes like 1024 go through a sinusoid


FAMILY = StableDiffusionXLFamily()
