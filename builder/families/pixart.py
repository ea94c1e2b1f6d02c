"""PixArt-α on the build side: folder loading, the generated `tiny-pixart`, the T5 text graph and the
transformer split at a block, as diffusers' PixArtAlphaPipeline runs PixArtTransformer2DModel.

  text_encoder       (input_ids, attention_mask) → T5's last hidden state (fp32 inside: T5 overflows in fp16)
  denoiser_encoder   (sample, timestep, conditions…) → the tokens after block S−1, as a (h, w, width) grid
                     per row: patch embedding + position, adaLN-single's timestep embedding, the caption
                     projection, blocks 0 … S−1
  denoiser_decoder   (timestep, conditions…, tokens) → blocks S … L−1 and the final layer (scale-shift table,
                     norm, projection, unpatchify) with each row's own timestep embedding; a learned-sigma
                     model's output keeps only its first latent-channel half, as the pipeline does after guidance
                     (guidance is per channel, so guiding the full output then slicing gives the same numbers)

The conditions both halves take are PixArtAlphaPipeline's: the T5 embeddings with their attention mask, plus
`resolution` (height, width) and `aspect_ratio` (height / width) for models with additional conditions (the
1024 models, transformer sample_size 128). The cache is a grid rather than a token list so that the decoder
knows the latent's height and width from its own input, at any built size.
"""
from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import torch
from torch import nn

from fd.builder.families.base import CastOutputs, Components, _cast
from fd.builder.families.transformer import TransformerFamily
from fd.builder.loading import TINY_SEED, load_weights
from fd.builder.specs import Axis, tensor
from fd.runtime.errors import FdError

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline pads and truncates every prompt to 120 T5 tokens
MASKED_BIAS = -10000.0  # what PixArtTransformer2DModel adds to the scores of masked text tokens
ADDED_CONDITIONS = ("resolution", "aspect_ratio")

# PixArt-XL-2's scheduler (scheduler/scheduler_config.json): DPM-Solver++ 2M on DDPM's linear betas.
PIXART_SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
    "lambda_min_clipped": -float("inf"), "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None,
}
_TINY_WORDS = "a photo of an astronaut riding horse on the moon cat dog painting".split()


# --- generated models --------------------------------------------------------------------------------

def make_tiny_t5_tokenizer():
    """A T5-style Unigram tokenizer written locally: <pad>=0, </s>=1 appended to every prompt, <unk>=2,
    Metaspace word starts, pieces for a few words and single characters for the rest of lowercase text."""
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab += [("▁" + word, -1.0) for word in _TINY_WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def make_tiny_pixart_components(seed: int = TINY_SEED, *, sample_size: int = 16, patch_size: int = 2,
                                vae_levels: int = 4, heads: int = 2) -> Components:
    """A random-weight pipeline with PixArt-α's structure at toy width, 128 px native: a 6-block
    PixArtTransformer2DModel (adaLN-single, caption projection, cross-attention with the T5 mask, learned
    sigma: 8 output channels for 4 latent ones), a 2-layer T5 v1.1 encoder (gated GELU), an 8x VAE and
    PixArt's DPM-Solver++ config. `sample_size` 128 gives the 1024 models' resolution / aspect-ratio
    conditions (tests pair it with a larger patch and a shallower VAE to stay small, and 3 heads: those
    conditions need a width divisible by 3)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = make_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=6,
        cross_attention_dim=16 * heads, caption_channels=32, sample_size=sample_size, patch_size=patch_size,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32)[:vae_levels],
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels, sample_size=128)
    return _components(tokenizer, text_encoder, transformer, vae, dict(PIXART_SCHEDULER_CONFIG))


def _components(tokenizer, text_encoder, transformer, vae, scheduler_config) -> Components:
    return Components(tokenizer, text_encoder.eval(), None, vae.eval(), scheduler_config, family="pixart",
                      transformer=transformer.eval())


# --- graphs ------------------------------------------------------------------------------------------

class T5EncoderGraph(nn.Module):
    """(input_ids, attention_mask) → T5's last hidden state, as PixArtAlphaPipeline.encode_prompt calls it."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        return self.text_encoder(input_ids, attention_mask=attention_mask)[0]


class _PixArtHalf(nn.Module):
    """What both halves compute from the conditions: adaLN-single's timestep embedding (per row), the
    projected caption and the cross-attention mask as the bias PixArtTransformer2DModel adds. Each half holds
    only the transformer's parts it runs (a torch.export program keeps every parameter its module holds)."""

    def __init__(self, transformer, blocks):
        super().__init__()
        self.adaln_single, self.caption_projection = transformer.adaln_single, transformer.caption_projection
        self.blocks = nn.ModuleList(blocks)
        self.added_conditions, self.width = transformer.use_additional_conditions, transformer.inner_dim
        self.patch, self.latent_channels = transformer.config.patch_size, transformer.config.in_channels

    def prepare(self, timestep, encoder_hidden_states, encoder_attention_mask, added, dtype):
        rows = timestep.shape[0]
        # the pipeline casts resolution / aspect ratio to the transformer's dtype before their sinusoid
        kwargs = dict(zip(ADDED_CONDITIONS, (a.to(dtype) for a in added))) if self.added_conditions else None
        emb, embedded_timestep = self.adaln_single(timestep, kwargs, batch_size=rows, hidden_dtype=dtype)
        text = encoder_hidden_states
        if self.caption_projection is not None:
            text = self.caption_projection(text).reshape(rows, -1, self.width)
        bias = (1 - encoder_attention_mask.to(dtype)) * MASKED_BIAS
        return emb, embedded_timestep, text, bias.unsqueeze(1)

    def run_blocks(self, hidden, emb, text, bias):
        for block in self.blocks:
            hidden = block(hidden, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=emb)
        return hidden


class PixArtEncoder(_PixArtHalf):
    """(sample, timestep, conditions…) → (tokens after block S−1 as rows x h x w x width,)."""

    def __init__(self, transformer, split: int):
        super().__init__(transformer, transformer.transformer_blocks[:split])
        self.pos_embed = transformer.pos_embed

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, *added):
        hidden = self.pos_embed(sample)
        emb, _, text, bias = self.prepare(timestep, encoder_hidden_states, encoder_attention_mask, added, hidden.dtype)
        hidden = self.run_blocks(hidden, emb, text, bias)
        return (hidden.reshape(hidden.shape[0], sample.shape[-2] // self.patch, sample.shape[-1] // self.patch, -1),)


class PixArtDecoder(_PixArtHalf):
    """(timestep, conditions…, tokens) → the noise prediction of the first `latent_channels` output channels."""

    def __init__(self, transformer, split: int):
        super().__init__(transformer, transformer.transformer_blocks[split:])
        self.scale_shift_table, self.norm_out, self.proj_out = (transformer.scale_shift_table, transformer.norm_out,
                                                                transformer.proj_out)
        self.out_channels = transformer.out_channels

    def forward(self, timestep, encoder_hidden_states, encoder_attention_mask, *rest):
        *added, tokens = rest
        rows, height, width, inner = tokens.shape
        emb, embedded_timestep, text, bias = self.prepare(timestep, encoder_hidden_states, encoder_attention_mask,
                                                          added, tokens.dtype)
        hidden = self.run_blocks(tokens.reshape(rows, height * width, inner), emb, text, bias)
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        hidden = self.proj_out(self.norm_out(hidden) * (1 + scale) + shift)
        patch, channels = self.patch, self.out_channels
        hidden = hidden.reshape(rows, height, width, patch, patch, channels)
        out = torch.einsum("nhwpqc->nchpwq", hidden).reshape(rows, channels, height * patch, width * patch)
        return out[:, :self.latent_channels]


# --- the family --------------------------------------------------------------------------------------

class PixArtAlphaFamily(TransformerFamily):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline",)
    aliases = {"pixart": "PixArt-alpha/PixArt-XL-2-512x512"}
    generated = {"tiny-pixart": make_tiny_pixart_components}
    subfolders = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer
        tokenizer = Path(folder) / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file() and importlib.util.find_spec("sentencepiece") is None:
            # the hub's PixArt folders ship T5's spiece.model alone; transformers reads it with sentencepiece
            raise FdError(f"{what} has its T5 tokenizer as a SentencePiece model ({tokenizer}/spiece.model), which "
                          "needs the sentencepiece package: pip install sentencepiece")
        parts = load_weights(folder, what, {"tokenizer": T5Tokenizer, "text_encoder": T5EncoderModel,
                                            "transformer": PixArtTransformer2DModel, "vae": AutoencoderKL})
        parts["tokenizer"].model_max_length = MAX_SEQUENCE_LENGTH  # the pipeline's length, not T5's 512
        return _components(parts["tokenizer"], parts["text_encoder"], parts["transformer"], parts["vae"], {})

    def check_supported(self, comps: Components) -> None:
        super().check_supported(comps)
        config = comps.transformer.config
        if config.out_channels not in (config.in_channels, 2 * config.in_channels):
            raise FdError(f"this PixArt transformer outputs {config.out_channels} channels for {config.in_channels} "
                          "latent ones; fd supports PixArt-α models that predict the noise (same count) or noise "
                          "and variance (twice as many)")
        if config.caption_channels is not None and config.caption_channels != comps.text_encoder.config.d_model:
            raise FdError(f"this PixArt transformer projects {config.caption_channels}-wide captions but its T5 "
                          f"encoder gives {comps.text_encoder.config.d_model}: use the text encoder the model "
                          "was trained with")

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import PixArtAlphaPipeline
        return PixArtAlphaPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                                   transformer=comps.transformer, scheduler=scheduler)

    diffusers_denoiser = "transformer"

    def diffusers_call(self, pipe, prompts, latents, *, steps, guidance_scale, height, width, **extra):
        """PixArtAlphaPipeline as fd runs PixArt: the negative prompt "" (fd's default; None crashes the pipeline), no
        caption cleaning (fd lower-cases and strips only) and no resolution binning (fd generates at the size asked
        for). It ignores callback_on_step_end, so the final latents come from the older `callback`."""
        final = {}
        out = pipe(prompts, negative_prompt="", height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance_scale, latents=latents, output_type="np", clean_caption=False,
                   use_resolution_binning=False, callback=lambda _i, _t, z: final.update(latents=z), **extra)
        return out.images, final.get("latents")

    def denoiser_halves(self, comps: Components, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        transformer, split = _cast(comps.transformer, dtype), self.split_block(comps)
        return PixArtEncoder(transformer, split), PixArtDecoder(transformer, split)

    def text_graphs(self, comps, unet_dtype):
        # fp32 inside in every precision (T5 overflows in fp16), the output cast for the transformer
        return {"text_encoder": CastOutputs(T5EncoderGraph(comps.text_encoder.float()), unet_dtype).eval()}

    def text_specs(self, comps, unet_dtype):
        length, width = comps.tokenizer.model_max_length, comps.text_encoder.config.d_model
        return {"text_encoder": {
            "inputs": [tensor("input_ids", "int64", [Axis("sequence", length)]), _mask("attention_mask", length)],
            "outputs": [tensor("text_embeddings", unet_dtype, [Axis("sequence", length), width])]}}

    def conditions(self, comps, unet_dtype):
        length, width = comps.tokenizer.model_max_length, comps.text_encoder.config.d_model
        text = [tensor("encoder_hidden_states", unet_dtype, [Axis("sequence", length), width]),
                _mask("encoder_attention_mask", length)]
        if not comps.transformer.use_additional_conditions:
            return text
        # sizes like 1024 go through a sinusoid: float32 inputs, cast inside as the pipeline casts them
        return [*text, tensor("resolution", "float32", [2]), tensor("aspect_ratio", "float32", [1])]


def _mask(name: str, length: int) -> dict:
    """A token mask: 1 for the prompt's tokens, 0 for padding (the build's random checks draw 0 or 1)."""
    record = tensor(name, "int64", [Axis("sequence", length)])
    record["range"] = [0, 1]
    return record


FAMILY = PixArtAlphaFamily()
