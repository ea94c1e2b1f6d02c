"""Stable Diffusion 3 / 3.5 on the build side: folder loading, the generated `tiny-sd3` and `sd3.5-medium-random`,
the three text graphs, and SD3Transformer2DModel split at a block, as diffusers' StableDiffusion3Pipeline runs it.

  text_encoder       CLIP-L: input_ids → (penultimate hidden state, pooled projection)
  text_encoder_2     CLIP-G: input_ids → (penultimate hidden state zero-padded on the feature axis so that
                     [CLIP-L | CLIP-G | zeros] is T5's width, as the pipeline pads; pooled projection)
  text_encoder_3     T5: input_ids → last hidden state (fp32 inside: T5 overflows in fp16)
  denoiser_encoder   (sample, timestep, encoder_hidden_states, pooled_projections) → (tokens, context): patch
                     embedding, timestep + pooled-text embedding, context embedder, joint blocks 0 … S−1
  denoiser_decoder   (timestep, pooled_projections, tokens, context) → the velocity: joint blocks S … L−1 with
                     each row's own timestep + pooled-text embedding, norm_out, proj_out, unpatchify

The runtime joins the text graphs' outputs as the pipeline does: the CLIP states side by side (77 tokens),
then the T5 tokens (256) on the sequence axis; the pooled projections side by side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fd.builder.families.base import CastOutputs, Components, _cast
from fd.builder.families.flow import FlowTransformerFamily, token_grid, unpatchify
from fd.builder.families.pixart import T5EncoderGraph, make_tiny_t5_tokenizer
from fd.builder.families.sdxl import _clip_config, _open_clip_style
from fd.builder.loading import TINY_SEED, load_weights, make_tiny_tokenizer
from fd.builder.specs import Axis, tensor
from fd.runtime.errors import FdError

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's T5 length (max_sequence_length)
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
SUBFOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3",
              "transformer", "vae", "scheduler")


# --- graphs ------------------------------------------------------------------------------------------

class ClipGraph(nn.Module):
    """input_ids → (penultimate hidden state right-padded with `pad` zero features, pooled projection)."""

    def __init__(self, text_encoder, pad: int = 0):
        super().__init__()
        self.text_encoder, self.pad = text_encoder, pad

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return F.pad(out.hidden_states[-2], (0, self.pad)), out.text_embeds


class SD3Encoder(nn.Module):
    """(sample, timestep, encoder_hidden_states, pooled_projections) → (image tokens grid, text tokens) after
    block S−1."""

    def __init__(self, transformer, split: int):
        super().__init__()
        self.pos_embed, self.time_text_embed = transformer.pos_embed, transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.blocks = transformer.transformer_blocks[:split]
        self.patch = transformer.config.patch_size

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        height, width = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        hidden = self.pos_embed(sample)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        for block in self.blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        return token_grid(hidden, height, width), context


class SD3Decoder(nn.Module):
    """(timestep, pooled_projections, tokens, context) → the velocity (rows, C, h·p, w·p)."""

    def __init__(self, transformer, split: int):
        super().__init__()
        self.time_text_embed = transformer.time_text_embed
        self.blocks = transformer.transformer_blocks[split:]
        self.norm_out, self.proj_out = transformer.norm_out, transformer.proj_out
        self.patch, self.out_channels = transformer.config.patch_size, transformer.out_channels

    def forward(self, timestep, pooled_projections, tokens, context):
        rows, height, width, inner = tokens.shape
        temb = self.time_text_embed(timestep, pooled_projections)
        hidden = tokens.reshape(rows, height * width, inner)
        for block in self.blocks:  # the last block is "context pre-only": it returns no context
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        hidden = self.proj_out(self.norm_out(hidden, temb))
        return unpatchify(hidden, height, width, self.patch, self.out_channels)


# --- generated models --------------------------------------------------------------------------------

def _sd3_components(seed: int, clip: tuple, t5: dict, transformer: dict, vae: dict,
                    length: int = MAX_SEQUENCE_LENGTH) -> Components:
    """Components with SD3's structure: CLIP-L and CLIP-G (both with projections, CLIP-G padding with "!"),
    T5 v1.1 (gated GELU), an SD3 transformer, a 16-channel VAE with SD3's scaling and shift, shift-3 flow Euler."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    tokenizer, tokenizer_2 = make_tiny_tokenizer(), _open_clip_style(make_tiny_tokenizer())
    tokenizer_3 = make_tiny_t5_tokenizer()
    tokenizer_3.model_max_length = length
    torch.manual_seed(seed)
    (l_width, l_layers, l_heads), (g_width, g_layers, g_heads), vocab = clip
    text_encoder = CLIPTextModelWithProjection(_clip_config(
        CLIPTextConfig, tokenizer, l_width, layers=l_layers, act="quick_gelu", projection=l_width, heads=l_heads,
        vocab=vocab))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(
        CLIPTextConfig, tokenizer_2, g_width, layers=g_layers, act="gelu", projection=g_width, heads=g_heads,
        vocab=vocab))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=t5.pop("vocab", len(tokenizer_3)), feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0, **t5))
    model = SD3Transformer2DModel(in_channels=16, out_channels=16, patch_size=2, joint_attention_dim=t5["d_model"],
                                  pooled_projection_dim=l_width + g_width, **transformer)
    autoencoder = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False, **SD3_VAE, **vae)
    return Components(tokenizer, text_encoder.eval(), None, autoencoder.eval(), dict(SD3_SCHEDULER_CONFIG),
                      family="sd3", tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2.eval(),
                      tokenizer_3=tokenizer_3, text_encoder_3=text_encoder_3.eval(), transformer=model.eval())


def make_tiny_sd3_components(seed: int = TINY_SEED) -> Components:
    """SD3.5's structure at toy width, 128 px native: a 6-block SD3 transformer 32 wide (4 heads of 8) with
    SD3.5's RMS qk-norm and a dual-attention first block, patch 2 on a 16x16 latent (64 image tokens), CLIP-L
    32 wide and CLIP-G 48 wide, a 2-layer T5 80 wide (256 tokens, as the pipeline), an 8x VAE."""
    return _sd3_components(
        seed, clip=((32, 2, 4), (48, 2, 4), None),
        t5=dict(d_model=80, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        transformer=dict(sample_size=16, num_layers=6, attention_head_dim=8, num_attention_heads=4,
                         caption_projection_dim=32, pos_embed_max_size=16, qk_norm="rms_norm",
                         dual_attention_layers=(0,)),
        vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=128))


def make_sd35_medium_random_components(seed: int = TINY_SEED, blocks: int = 24, dual: int = 13,
                                       length: int = MAX_SEQUENCE_LENGTH) -> Components:
    """stabilityai/stable-diffusion-3.5-medium's transformer and VAE configs with random weights (24 blocks 1536
    wide, dual attention in blocks 0-12, RMS qk-norm; 16-channel VAE), for benchmarks: its images are noise. The
    text encoders are cut to 2 layers (their widths kept: CLIP-L 768, CLIP-G 1280, T5 4096) to fit 24 GiB,
    and the tokenizers are the tiny ones."""
    return _sd3_components(
        seed, clip=((768, 2, 12), (1280, 2, 20), 49408),
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, relative_attention_num_buckets=32,
                vocab=32128),
        transformer=dict(sample_size=128, num_layers=blocks, attention_head_dim=64, num_attention_heads=24,
                         caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(dual))),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
        length=length)


def make_sd35_medium_random_cpu_components(seed: int = TINY_SEED) -> Components:
    """sd3.5-medium-random cut to 4 blocks (dual attention in blocks 0-1, about SD3.5-medium's 13 of 24) and a
    16-token T5, for a timed CPU benchmark at 128²: at full depth a 128² step with guidance costs ~0.5 TFLOP, which
    a shared 2-core CPU cannot repeat for five fd-bench arms (benchmarks/RESULTS.md, the SD3/FLUX section)."""
    return make_sd35_medium_random_components(seed, blocks=4, dual=2, length=16)


# --- the family --------------------------------------------------------------------------------------

class StableDiffusion3Family(FlowTransformerFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    aliases = {"sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
               "sd3.5-large": "stabilityai/stable-diffusion-3.5-large"}
    generated = {"tiny-sd3": make_tiny_sd3_components, "sd3.5-medium-random": make_sd35_medium_random_components,
                 "sd3.5-medium-random-cpu": make_sd35_medium_random_cpu_components}
    subfolders = SUBFOLDERS
    decoder_conditions = ("pooled_projections",)

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
        parts = load_weights(folder, what, {
            "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "tokenizer_3": T5TokenizerFast,
            "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
            "text_encoder_3": T5EncoderModel, "transformer": SD3Transformer2DModel, "vae": AutoencoderKL})
        parts["tokenizer_3"].model_max_length = MAX_SEQUENCE_LENGTH  # the pipeline's length, not T5's 512
        return Components(parts["tokenizer"], parts["text_encoder"], None, parts["vae"], {}, family=self.name,
                          tokenizer_2=parts["tokenizer_2"], text_encoder_2=parts["text_encoder_2"],
                          tokenizer_3=parts["tokenizer_3"], text_encoder_3=parts["text_encoder_3"],
                          transformer=parts["transformer"])

    def check_supported(self, comps: Components) -> None:
        super().check_supported(comps)
        clip = comps.text_encoder.config.hidden_size + comps.text_encoder_2.config.hidden_size
        joint = comps.transformer.config.joint_attention_dim
        if comps.text_encoder_3.config.d_model != joint or clip > joint:
            raise FdError(f"this SD3 transformer takes {joint}-wide text, but its T5 gives "
                          f"{comps.text_encoder_3.config.d_model} and its CLIPs {clip}: use the text encoders the "
                          "model was trained with")

    def denoiser_halves(self, comps: Components, dtype: torch.dtype):
        transformer, split = _cast(comps.transformer, dtype), self.split_block(comps)
        return SD3Encoder(transformer, split), SD3Decoder(transformer, split)

    def text_graphs(self, comps, unet_dtype):
        pad = comps.transformer.config.joint_attention_dim - comps.text_encoder.config.hidden_size \
            - comps.text_encoder_2.config.hidden_size
        return {"text_encoder": CastOutputs(ClipGraph(comps.text_encoder.float()), unet_dtype).eval(),
                "text_encoder_2": CastOutputs(ClipGraph(comps.text_encoder_2.float(), pad), unet_dtype).eval(),
                "text_encoder_3": CastOutputs(T5UnmaskedGraph(comps.text_encoder_3.float()), unet_dtype).eval()}

    def text_specs(self, comps, unet_dtype):
        clip_length, t5_length = comps.tokenizer.model_max_length, comps.tokenizer_3.model_max_length
        joint, l_width = comps.transformer.config.joint_attention_dim, comps.text_encoder.config.hidden_size

        def ids(length):
            return tensor("input_ids", "int64", [Axis("sequence", length)])

        def clip(width, pooled):
            return [tensor("hidden_states", unet_dtype, [Axis("sequence", clip_length), width]),
                    tensor("text_embeds", unet_dtype, [pooled])]
        return {
            "text_encoder": {"inputs": [ids(clip_length)],
                             "outputs": clip(l_width, comps.text_encoder.config.projection_dim)},
            "text_encoder_2": {"inputs": [ids(clip_length)],
                               "outputs": clip(joint - l_width, comps.text_encoder_2.config.projection_dim)},
            "text_encoder_3": {"inputs": [ids(t5_length)],
                               "outputs": [tensor("text_embeddings", unet_dtype, [Axis("sequence", t5_length), joint])]},
        }

    def conditions(self, comps, unet_dtype):
        length = comps.tokenizer.model_max_length + comps.tokenizer_3.model_max_length
        return [tensor("encoder_hidden_states", unet_dtype, [Axis("sequence", length),
                                                              comps.transformer.config.joint_attention_dim]),
                tensor("pooled_projections", unet_dtype, [comps.transformer.config.pooled_projection_dim])]

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import StableDiffusion3Pipeline
        return StableDiffusion3Pipeline(
            transformer=comps.transformer, scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
            text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3)

    diffusers_denoiser = "transformer"

    def diffusers_call(self, pipe, prompts, latents, *, steps, guidance_scale, height, width, **extra):
        """StableDiffusion3Pipeline as fd runs SD3: negative prompt "" (the pipeline's default), T5 at the folder's
        length."""
        final = {}

        def keep_latents(_pipe, _i, _t, kwargs):
            final["latents"] = kwargs["latents"]
            return kwargs
        out = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=latents, output_type="np", callback_on_step_end=keep_latents,
                   max_sequence_length=pipe.tokenizer_3.model_max_length, **extra)
        return out.images, final.get("latents")


class T5UnmaskedGraph(T5EncoderGraph):
    """input_ids → T5's last hidden state without an attention mask, as StableDiffusion3Pipeline calls it."""

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


FAMILY = StableDiffusion3Family()
