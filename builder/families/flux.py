"""FLUX.1 (dev, schnell) on the build side: folder loading, the generated `tiny-flux` / `tiny-flux-schnell` and
`flux-dev-random`, the two text graphs, and FluxTransformer2DModel split at a block, as diffusers' FluxPipeline
runs it.

  text_encoder       CLIP-L: input_ids → its pooled output (FLUX reads no CLIP token states)
  text_encoder_2     T5: input_ids → last hidden state (fp32 inside: T5 overflows in fp16), 512 tokens
  denoiser_encoder   (sample, timestep, [guidance], encoder_hidden_states, pooled_projections) → (tokens,
                     context): fd packs the (C, h, w) latent into FLUX's 2x2 patches itself, then x_embedder,
                     the timestep (+ guidance) + pooled-text embedding, the context embedder, blocks 0 … S−1
  denoiser_decoder   (timestep, [guidance], pooled_projections, tokens, context) → the velocity as (C, h, w):
                     blocks S … L−1, norm_out, proj_out, unpacked

Blocks are counted in execution order: the double-stream blocks (`transformer_blocks`), then the single-stream
ones (`single_transformer_blocks`); both take and return the two streams, so the cache is the same wherever S
falls. Rotary embeddings: FLUX computes them in float64 from the token ids on every call; the ids depend only on
the built size and the T5 length, so fd computes them once at build with the model's own FluxPosEmbed and stores
them as float32 constants of both graphs (TensorRT has no float64). `guidance` (FLUX.1-dev's embedded guidance
scale, one per row) exists only for models with guidance_embeds; FLUX.1-schnell has none.
"""
from __future__ import annotations

import torch
from torch import nn

from fd.builder.families.base import CastOutputs, Components, _cast
from fd.builder.families.flow import FlowTransformerFamily, token_grid
from fd.builder.families.pixart import make_tiny_t5_tokenizer
from fd.builder.families.sd3 import T5UnmaskedGraph
from fd.builder.families.sdxl import _clip_config
from fd.builder.loading import TINY_SEED, load_weights, make_tiny_tokenizer
from fd.builder.specs import Axis, tensor
from fd.runtime.errors import FdError

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's T5 length for dev (schnell's pipeline call usually passes 256)
TINY_SEQUENCE_LENGTH = 32  # the generated models' T5 length (FluxPipeline takes it as max_sequence_length)
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                 "shift": 1.0, "use_dynamic_shifting": False}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SUBFOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler")


# --- packing, ids and rotary embeddings ----------------------------------------------------------------

def pack(latents: torch.Tensor) -> torch.Tensor:
    """(rows, C, h, w) → (rows, h/2 · w/2, 4C): FLUX's 2x2 patches, as FluxPipeline._pack_latents."""
    rows, channels, height, width = latents.shape
    patches = latents.reshape(rows, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(rows, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(rows, h/2 · w/2, 4C) on an (h/2, w/2) grid → (rows, C, h, w), as FluxPipeline._unpack_latents."""
    rows, _, packed = tokens.shape
    patches = tokens.reshape(rows, height, width, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(rows, packed // 4, height * 2, width * 2)


def rotary_embedding(transformer, text_length: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for [text tokens (ids 0), image tokens (ids (0, row, col))], float32, by the model's own
    FluxPosEmbed on the CPU, as FluxTransformer2DModel computes them from FluxPipeline's ids."""
    height, width = grid
    image_ids = torch.zeros(height, width, 3)
    image_ids[..., 1] += torch.arange(height)[:, None]
    image_ids[..., 2] += torch.arange(width)[None, :]
    ids = torch.cat([torch.zeros(text_length, 3), image_ids.reshape(height * width, 3)])
    with torch.no_grad(), torch.device("cpu"):
        cos, sin = transformer.pos_embed(ids)
    return cos.float(), sin.float()


# --- the two halves ----------------------------------------------------------------------------------

class _FluxHalf(nn.Module):
    """What both halves compute: the per-row timestep (+ guidance) + pooled-text embedding, as the pipeline
    hands the transformer timestep / 1000 (and the transformer multiplies by 1000 again), and the blocks."""

    def __init__(self, transformer, blocks):
        super().__init__()
        self.time_text_embed, self.blocks = transformer.time_text_embed, nn.ModuleList(blocks)
        self.guided = bool(transformer.config.guidance_embeds)
        self.register_buffer("rope_cos", torch.zeros(0), persistent=False)  # set_grid fills both
        self.register_buffer("rope_sin", torch.zeros(0), persistent=False)

    def set_grid(self, transformer, text_length: int, grid: tuple[int, int]) -> None:
        self.rope_cos, self.rope_sin = rotary_embedding(transformer, text_length, grid)

    def embed(self, timestep, guidance, pooled, dtype):
        timestep = (timestep / 1000).to(dtype) * 1000
        if not self.guided:
            return self.time_text_embed(timestep, pooled)
        return self.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)

    def run_blocks(self, hidden, context, temb):
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                    image_rotary_emb=rope)
        return hidden, context


class FluxEncoder(_FluxHalf):
    """(sample, timestep, [guidance], encoder_hidden_states, pooled_projections) → (tokens grid, context)."""

    def __init__(self, transformer, split: int):
        super().__init__(transformer, execution_order(transformer)[:split])
        self.x_embedder, self.context_embedder = transformer.x_embedder, transformer.context_embedder

    def forward(self, sample, timestep, *conditions):
        guidance, text, pooled = conditions if self.guided else (None, *conditions)
        hidden = self.x_embedder(pack(sample))
        temb = self.embed(timestep, guidance, pooled, hidden.dtype)
        hidden, context = self.run_blocks(hidden, self.context_embedder(text), temb)
        return token_grid(hidden, sample.shape[-2] // 2, sample.shape[-1] // 2), context


class FluxDecoder(_FluxHalf):
    """(timestep, [guidance], pooled_projections, tokens, context) → the velocity (rows, C, h, w)."""

    def __init__(self, transformer, split: int):
        super().__init__(transformer, execution_order(transformer)[split:])
        self.norm_out, self.proj_out = transformer.norm_out, transformer.proj_out

    def forward(self, timestep, *rest):
        guidance, pooled, tokens, context = rest if self.guided else (None, *rest)
        rows, height, width, inner = tokens.shape
        temb = self.embed(timestep, guidance, pooled, tokens.dtype)
        hidden, _ = self.run_blocks(tokens.reshape(rows, height * width, inner), context, temb)
        return unpack(self.proj_out(self.norm_out(hidden, temb)), height, width)


def execution_order(transformer) -> list:
    """Every block in the order the forward runs them: double-stream, then single-stream."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


class ClipPooledGraph(nn.Module):
    """input_ids → CLIP's pooled output, as FluxPipeline._get_clip_prompt_embeds."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, output_hidden_states=False).pooler_output


# --- generated models --------------------------------------------------------------------------------

def _flux_components(seed: int, *, guidance: bool, clip: dict, t5: dict, transformer: dict, vae: dict,
                     length: int) -> Components:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    tokenizer, tokenizer_2 = make_tiny_tokenizer(), make_tiny_t5_tokenizer()
    tokenizer_2.model_max_length = length
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(CLIPTextConfig, tokenizer, act="quick_gelu", **clip))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5.pop("vocab", len(tokenizer_2)), feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0, **t5))
    model = FluxTransformer2DModel(in_channels=64, patch_size=1, joint_attention_dim=t5["d_model"],
                                   pooled_projection_dim=clip["hidden"], guidance_embeds=guidance, **transformer)
    autoencoder = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE, **vae)
    config = FLUX_DEV_SCHEDULER_CONFIG if guidance else FLUX_SCHNELL_SCHEDULER_CONFIG
    return Components(tokenizer, text_encoder.eval(), None, autoencoder.eval(), dict(config), family="flux",
                      tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2.eval(), transformer=model.eval())


def _tiny(seed: int, guidance: bool) -> Components:
    return _flux_components(
        seed, guidance=guidance, clip=dict(hidden=32, layers=2, projection=32), length=TINY_SEQUENCE_LENGTH,
        t5=dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        transformer=dict(num_layers=2, num_single_layers=4, attention_head_dim=8, num_attention_heads=4,
                         axes_dims_rope=(2, 2, 4)),
        vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=128))


def make_tiny_flux_components(seed: int = TINY_SEED) -> Components:
    """FLUX.1-dev's structure at toy width, 128 px native: 2 double-stream and 4 single-stream blocks 32 wide
    (4 heads of 8, rotary axes 2+2+4), the guidance embedding, a 16-channel latent packed 2x2 (8x8 = 64 image
    tokens), CLIP-L 32 wide, a 2-layer T5 48 wide at 32 tokens, an 8x VAE with FLUX's scale and shift, and
    FLUX.1-dev's dynamically shifted flow-matching scheduler."""
    return _tiny(seed, guidance=True)


def make_tiny_flux_schnell_components(seed: int = TINY_SEED) -> Components:
    """tiny-flux without the guidance embedding and with FLUX.1-schnell's unshifted scheduler."""
    return _tiny(seed, guidance=False)


def _flux_dev_shaped(seed: int, double: int, single: int, length: int = MAX_SEQUENCE_LENGTH) -> Components:
    return _flux_components(
        seed, guidance=True, clip=dict(hidden=768, layers=2, projection=768, heads=12, vocab=49408),
        length=length,
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, relative_attention_num_buckets=32,
                vocab=32128),
        transformer=dict(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=24,
                         axes_dims_rope=(16, 56, 56)),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024))


def make_flux_dev_random_components(seed: int = TINY_SEED) -> Components:
    """FLUX.1-dev's transformer and VAE configs with random weights: 19 double + 38 single blocks 3072 wide
    (24 heads of 128, rotary axes 16+56+56), 11.9 B parameters (48 GB in fp32: for FLOP counting on the meta
    device, benchmarks/flop_split.py, or a machine with that memory). The text encoders keep their widths
    (CLIP-L 768, T5 4096) with 2 layers each, and the tokenizers are the tiny ones. Its images are noise."""
    return _flux_dev_shaped(seed, 19, 38)


def make_flux_dev_random_shallow_components(seed: int = TINY_SEED) -> Components:
    """flux-dev-random cut to 2 double + 4 single blocks (the same 1:2 ratio, every width kept) so that it fits
    this project's 24 GiB CPU machines: for CPU benchmarks of FLUX-shaped blocks."""
    return _flux_dev_shaped(seed, 2, 4)


CPU_SEQUENCE_LENGTH = 16  # the default prompt's 12 T5 tokens and padding


def make_flux_dev_random_cpu_components(seed: int = TINY_SEED) -> Components:
    """FLUX.1-dev's widths at 1 double + 2 single blocks and a 16-token T5, for a timed CPU benchmark at 128²
    (64 image tokens). FLUX.1-dev costs 74 TFLOP per step at 1024²; on this project's shared 2-core CPU one
    block of these widths takes 1.7-2.9 s at 80 tokens, so six fd-bench arms of a deeper model, a larger image or
    512 T5 tokens do not fit a 30-minute run (benchmarks/RESULTS.md, the SD3/FLUX section)."""
    return _flux_dev_shaped(seed, 1, 2, CPU_SEQUENCE_LENGTH)


# --- the family --------------------------------------------------------------------------------------

class FluxFamily(FlowTransformerFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    aliases = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
    generated = {"tiny-flux": make_tiny_flux_components, "tiny-flux-schnell": make_tiny_flux_schnell_components,
                 "flux-dev-random": make_flux_dev_random_components,
                 "flux-dev-random-shallow": make_flux_dev_random_shallow_components,
                 "flux-dev-random-cpu": make_flux_dev_random_cpu_components}
    subfolders = SUBFOLDERS

    decoder_conditions = ("guidance", "pooled_projections")  # guidance: only models with guidance_embeds have it

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
        parts = load_weights(folder, what, {
            "tokenizer": CLIPTokenizer, "tokenizer_2": T5TokenizerFast, "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel, "transformer": FluxTransformer2DModel, "vae": AutoencoderKL})
        parts["tokenizer_2"].model_max_length = MAX_SEQUENCE_LENGTH  # the pipeline's length
        return Components(parts["tokenizer"], parts["text_encoder"], None, parts["vae"], {}, family=self.name,
                          tokenizer_2=parts["tokenizer_2"], text_encoder_2=parts["text_encoder_2"],
                          transformer=parts["transformer"])

    def depth(self, comps: Components) -> int:
        return len(execution_order(comps.transformer))

    def check_supported(self, comps: Components) -> None:
        super().check_supported(comps)
        config = comps.transformer.config
        if config.in_channels % 4 or config.patch_size != 1:
            raise FdError(f"this FLUX transformer takes {config.in_channels} channels in patches of "
                          f"{config.patch_size}: fd packs 2x2 latent patches itself and needs patch_size 1 and a "
                          "multiple of 4 channels")
        if comps.text_encoder_2.config.d_model != config.joint_attention_dim:
            raise FdError(f"this FLUX transformer takes {config.joint_attention_dim}-wide text, but its T5 gives "
                          f"{comps.text_encoder_2.config.d_model}: use the text encoders the model was trained with")

    def size_rule(self, comps: Components) -> tuple[int, int, int]:
        # 16 latent channels packed 2x2 into 64; the native size is the VAE's (FLUX has no transformer sample size)
        vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        return comps.transformer.config.in_channels // 4, 2, comps.vae.config.sample_size // vae_scale

    def denoiser_halves(self, comps: Components, dtype: torch.dtype):
        transformer, split = _cast(comps.transformer, dtype), self.split_block(comps)
        halves = FluxEncoder(transformer, split), FluxDecoder(transformer, split)
        native = self.size_rule(comps)[2] // 2  # the native token grid; specs() sets the built size's
        for half in halves:
            half.set_grid(comps.transformer, comps.tokenizer_2.model_max_length, (native, native))
        return halves

    def specs(self, comps, modules, geometry, precision, limits):
        grid = (geometry["latent_height"] // 2, geometry["latent_width"] // 2)
        for half in ("denoiser_encoder", "denoiser_decoder"):  # the rotary embedding of the built size
            modules[half].set_grid(comps.transformer, comps.tokenizer_2.model_max_length, grid)
        return super().specs(comps, modules, geometry, precision, limits)

    def text_graphs(self, comps, unet_dtype):
        return {"text_encoder": CastOutputs(ClipPooledGraph(comps.text_encoder.float()), unet_dtype).eval(),
                "text_encoder_2": CastOutputs(T5UnmaskedGraph(comps.text_encoder_2.float()), unet_dtype).eval()}

    def text_specs(self, comps, unet_dtype):
        clip_length, t5_length = comps.tokenizer.model_max_length, comps.tokenizer_2.model_max_length
        return {
            "text_encoder": {"inputs": [tensor("input_ids", "int64", [Axis("sequence", clip_length)])],
                             "outputs": [tensor("pooled", unet_dtype, [comps.text_encoder.config.hidden_size])]},
            "text_encoder_2": {"inputs": [tensor("input_ids", "int64", [Axis("sequence", t5_length)])],
                               "outputs": [tensor("text_embeddings", unet_dtype, [
                                   Axis("sequence", t5_length), comps.text_encoder_2.config.d_model])]},
        }

    def conditions(self, comps, unet_dtype):
        config = comps.transformer.config
        guidance = [tensor("guidance", "float32", [])] if config.guidance_embeds else []
        return [*guidance,
                tensor("encoder_hidden_states", unet_dtype, [Axis("sequence", comps.tokenizer_2.model_max_length),
                                                             config.joint_attention_dim]),
                tensor("pooled_projections", unet_dtype, [config.pooled_projection_dim])]

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import FluxPipeline
        return FluxPipeline(scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
                            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2,
                            tokenizer_2=comps.tokenizer_2, transformer=comps.transformer)

    diffusers_denoiser = "transformer"

    def diffusers_call(self, pipe, prompts, latents, *, steps, guidance_scale, height, width, **extra):
        """FluxPipeline as fd runs FLUX: embedded guidance (no classifier-free guidance), T5 at the folder's
        length, fd's (C, h, w) latents packed as the pipeline takes them and its final latents unpacked."""
        final = {}

        def keep_latents(_pipe, _i, _t, kwargs):
            final["latents"] = kwargs["latents"]
            return kwargs
        rows, channels, h, w = latents.shape
        out = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=pipe._pack_latents(latents, rows, channels, h, w), output_type="np",
                   callback_on_step_end=keep_latents, max_sequence_length=pipe.tokenizer_2.model_max_length, **extra)
        packed = final.get("latents")
        return out.images, None if packed is None else pipe._unpack_latents(packed, height, width,
                                                                            pipe.vae_scale_factor)


FAMILY = FluxFamily()
