"""UNet → encoder + decoder: the FasterDiffusion split of a diffusers UNet2DConditionModel.

The encoder (time embedding, conv_in, down blocks, mid block) runs only at key steps; its outputs, the
mid-block output and every down-block skip in order, are the cache. The decoder (its own time embedding,
up blocks, norm, act, conv_out) reads only that cache, the timestep and the conditions, never the latent:
that is what lets a whole window of steps run as one batch with one timestep per row.

SDXL-style UNets (`addition_embed_type == "text_time"`) also take the pooled text embedding and the
size/crop ids. Both halves add that "aug" embedding to their own time embedding, so a decoder row carries
its own conditions exactly as its timestep.

Both modules share the UNet's weights (no copies); composed they equal `unet(...).sample`.
"""
from __future__ import annotations

import torch
from torch import nn

from fd.runtime.errors import FdError

# SDXL's added conditions, in the order the graphs take them: pooled text embedding (B, proj) and
# the size/crop ids (B, 6: original size, crop top-left, target size).
TEXT_TIME_INPUTS = ("text_embeds", "time_ids")


def added_condition_names(unet) -> tuple[str, ...]:
    """The extra inputs both halves take for this UNet: () for SD 1.x/2.x, TEXT_TIME_INPUTS for SDXL."""
    return TEXT_TIME_INPUTS if unet.config.get("addition_embed_type") == "text_time" else ()


def unsupported_features(unet) -> list[str]:
    """UNet features the split does not carry, each named as the user would find it in the config."""
    cfg = unet.config
    found = []
    for name in ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
                 "time_cond_proj_dim"):
        if cfg.get(name) is not None:
            found.append(f"{name}={cfg.get(name)!r}")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        found.append(f"addition_embed_type={cfg.get('addition_embed_type')!r}")
    if cfg.get("attention_type", "default") != "default":  # GLIGEN's gated attention needs boxes as input
        found.append(f"attention_type={cfg.get('attention_type')!r}")
    if getattr(unet, "mid_block", None) is None:
        found.append("no mid block")
    return found


def check_supported(unet) -> None:
    """Refuse UNet features the split does not carry (class labels, other added embeddings, …).

    Attention masks are call-time inputs, not config: the split has no mask input, so masked
    conditioning cannot reach it (the SD and SDXL pipelines pass none).
    """
    found = unsupported_features(unet)
    if found:
        raise FdError(f"this UNet uses {', '.join(found)}, which fd's encoder/decoder split does not support: "
                      "fd supports Stable Diffusion 1.x/2.x and SDXL-style UNets")


def time_embedding(unet, timestep: torch.Tensor, dtype: torch.dtype, text_embeds: torch.Tensor | None = None,
                   time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's timestep embedding for one timestep per batch row (timestep: float [B]).

    With SDXL's conditions, the aug embedding is added before the activation, in diffusers' order.
    """
    t_emb = unet.time_proj(timestep).to(dtype)  # time_proj always returns fp32
    emb = unet.time_embedding(t_emb)
    if added_condition_names(unet):
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type 'text_time') needs text_embeds and time_ids")
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=None,
                                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
    elif text_embeds is not None or time_ids is not None:
        raise ValueError("text_embeds/time_ids given to a UNet without addition_embed_type 'text_time'")
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def cross_kwargs(block, text: torch.Tensor) -> dict:
    return {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}


class UNetEncoder(nn.Module):
    """(sample, timestep[B], text[, text_embeds, time_ids]) → (mid, skip_00, …, skip_NN)."""

    def __init__(self, unet):
        super().__init__()
        check_supported(unet)
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None):
        unet = self.unet
        emb = time_embedding(unet, timestep, sample.dtype, text_embeds, time_ids)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        hidden = unet.conv_in(sample)
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, block_skips = block(hidden_states=hidden, temb=emb, **cross_kwargs(block, encoder_hidden_states))
            skips += block_skips
        mid = unet.mid_block(hidden, emb, **cross_kwargs(unet.mid_block, encoder_hidden_states))
        return (mid, *skips)


class UNetDecoder(nn.Module):
    """(timestep[B], text, mid, (skip_00, …, skip_NN)[, text_embeds, time_ids]) → noise prediction.

    Row r uses timestep[r] and, for SDXL, text_embeds[r] and time_ids[r].
    """

    def __init__(self, unet):
        super().__init__()
        check_supported(unet)
        self.unet = unet

    def forward(self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, mid: torch.Tensor,
                skips: tuple[torch.Tensor, ...], text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None):
        unet = self.unet
        emb = time_embedding(unet, timestep, mid.dtype, text_embeds, time_ids)
        return decode_up(unet, mid, skips, emb, lambda block: cross_kwargs(block, encoder_hidden_states))


def decode_up(unet, hidden: torch.Tensor, skips, emb: torch.Tensor, block_kwargs) -> torch.Tensor:
    """The decoder half's walk, shared by every UNet split (image, IF, video): each up block takes its resnets'
    count of skips from the end of the cache, then the output head. `block_kwargs(block)`: that block's extra
    arguments (cross-attention text, frames)."""
    remaining = tuple(skips)
    for block in unet.up_blocks:
        n = len(block.resnets)
        block_skips, remaining = remaining[-n:], remaining[:-n]
        hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=block_skips, **block_kwargs(block))
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def unet_levels(unet) -> int:
    """Total spatial downsampling of the UNet (2 per down block that downsamples)."""
    return 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
