"""DeepFloyd IF's UNet → prompt terms + encoder + decoder: the FasterDiffusion split of IF's pixel-space UNet.

IF's UNet2DConditionModel differs from Stable Diffusion's in what it computes from the conditions, not in its
blocks' order, so the split is the same (encoder: conv_in, down blocks, mid block; decoder: up blocks, norm,
act, conv_out) and what is new is computed once per prompt, outside the loop:

  IFPromptTerms   (T5 embeddings[, noise level]) → (encoder_hidden_states, added_embedding)
                  encoder_hid_proj (T5 width → cross-attention width), the pooled-text term of
                  addition_embed_type "text" (TextTimeEmbedding over the raw T5 states) and, on stage II,
                  class_embed_type "timestep" (the noise level of the upscaled image through the time sinusoid)
  IFEncoder       (sample, timestep, encoder_hidden_states, added_embedding[, upscaled]) → (mid, skip_00, …);
                  stage II's UNet input is the sample and the noised upscaled stage-I image side by side
  IFDecoder       (timestep, encoder_hidden_states, added_embedding, mid, skip_00, …) → all output channels
                  (IF-I and IF-II: 3 noise + 3 learned-variance channels; the pipeline needs both)

Each half's time embedding is time_embedding(time_proj(t)) + added_embedding, then the GELU activation, in
diffusers' order (diffusers adds the class term, then the text term; the sum is taken once per prompt here).
The blocks themselves (ResNets with scale-shift norm, added-KV attention) need nothing: they read temb and the
projected text as diffusers passes them. IFPipeline passes no attention mask to the UNet (only to T5).
"""
from __future__ import annotations

import torch
from torch import nn

from fd.builder.split import cross_kwargs, decode_up
from fd.runtime.errors import FdError


def if_unsupported_features(unet) -> list[str]:
    """IF-UNet features the split does not carry, each named as in the UNet's config."""
    cfg, found = unet.config, []
    if cfg.get("addition_embed_type") != "text":
        found.append(f"addition_embed_type={cfg.get('addition_embed_type')!r} (IF's is 'text')")
    if cfg.get("encoder_hid_dim") is None or cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
        found.append(f"encoder_hid_dim_type={cfg.get('encoder_hid_dim_type')!r} (IF's projects T5: 'text_proj')")
    if cfg.get("class_embed_type") not in (None, "timestep"):
        found.append(f"class_embed_type={cfg.get('class_embed_type')!r}")
    for name in ("class_embeddings_concat", "time_cond_proj_dim", "num_class_embeds"):
        if cfg.get(name):
            found.append(f"{name}={cfg.get(name)!r}")
    if cfg.get("attention_type", "default") != "default":
        found.append(f"attention_type={cfg.get('attention_type')!r}")
    if getattr(unet, "mid_block", None) is None:
        found.append("no mid block")
    return found


def check_if_unet(unet) -> None:
    found = if_unsupported_features(unet)
    if found:
        raise FdError(f"this IF UNet uses {', '.join(found)}, which fd's IF split does not support: fd supports "
                      "DeepFloyd IF stage I and stage II UNets")




class IFPromptTerms(nn.Module):
    """(text_embeddings: raw T5 states, float32[, noise_level: float32 per row]) → (projected text, added term)."""

    def __init__(self, unet):
        super().__init__()
        check_if_unet(unet)
        self.add_embedding, self.encoder_hid_proj = unet.add_embedding, unet.encoder_hid_proj
        self.noise_level = unet.config.class_embed_type == "timestep"
        if self.noise_level:
            self.time_proj, self.class_embedding = unet.time_proj, unet.class_embedding

    def forward(self, text_embeddings, *noise_level):
        dtype = self.encoder_hid_proj.weight.dtype
        text = text_embeddings.to(dtype)  # T5 runs in float32 in every folder; the UNet in the folder's precision
        added = self.add_embedding(text)
        if self.noise_level:
            (level,) = noise_level
            added = self.class_embedding(self.time_proj(level).to(dtype)).to(dtype) + added
        return self.encoder_hid_proj(text), added


class _IFHalf(nn.Module):
    def __init__(self, unet):
        super().__init__()
        check_if_unet(unet)
        self.unet = unet

    def embedding(self, timestep, added_embedding):
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(timestep).to(added_embedding.dtype)) + added_embedding
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


class IFEncoder(_IFHalf):
    """(sample, timestep[B], encoder_hidden_states, added_embedding[, upscaled]) → (mid, skip_00, …, skip_NN)."""

    def forward(self, sample, timestep, encoder_hidden_states, added_embedding, *upscaled):
        unet = self.unet
        if upscaled:  # stage II: IFSuperResolutionPipeline's cat([sample, upscaled], dim=1)
            sample = torch.cat([sample, upscaled[0].to(sample.dtype)], dim=1)
        emb = self.embedding(timestep, added_embedding)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        hidden = unet.conv_in(sample)
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, block_skips = block(hidden_states=hidden, temb=emb, **cross_kwargs(block, encoder_hidden_states))
            skips += block_skips
        return (unet.mid_block(hidden, emb, **cross_kwargs(unet.mid_block, encoder_hidden_states)), *skips)


class IFDecoder(_IFHalf):
    """(timestep[B], encoder_hidden_states, added_embedding, mid, skip_00, …) → every output channel; row r
    uses timestep[r]."""

    def forward(self, timestep, encoder_hidden_states, added_embedding, mid, *skips):
        unet = self.unet
        emb = self.embedding(timestep, added_embedding)
        return decode_up(unet, mid, skips, emb, lambda block: cross_kwargs(block, encoder_hidden_states))


def run_split(unet, sample, timestep, text_embeddings, noise_level=None) -> torch.Tensor:
    """prompt terms → encoder → decoder in torch on the UNet's own input (stage II: 6 channels)."""
    terms = IFPromptTerms(unet)(text_embeddings, *(() if noise_level is None else (noise_level,)))
    images = sample.shape[1] // 2 if noise_level is not None else sample.shape[1]
    cache = IFEncoder(unet)(sample[:, :images], timestep, *terms, *((sample[:, images:],) if noise_level is not None
                                                                     else ()))
    return IFDecoder(unet)(timestep, *terms, *cache)
