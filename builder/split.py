"""UNet → encoder + decoder: the FasterDiffusion split of a diffusers UNet2DConditionModel.

The encoder (time embedding, conv_in, down blocks, mid block) runs only at key steps; its outputs, the
mid-block output and every down-block skip in order, are the cache. The decoder (its own time embedding,
up blocks, norm, act, conv_out) reads only that cache, the timestep and the text embeddings, never the
latent: that is what lets a whole window of steps run as one batch with one timestep per row.

Both modules share the UNet's weights (no copies); composed they equal `unet(...).sample`.
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.errors import FdError


def check_supported(unet) -> None:
    """Refuse UNet features the split does not carry (SDXL's added embeddings, class labels, …)."""
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type, "num_class_embeds": cfg.num_class_embeds,
        "addition_embed_type": cfg.addition_embed_type, "encoder_hid_dim": cfg.encoder_hid_dim,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
    }
    used = [name for name, value in unsupported.items() if value is not None]
    if used or unet.mid_block is None:
        what = ", ".join(used) if used else "no mid block"
        raise FdError(f"this UNet uses {what}, which fd's encoder/decoder split does not support yet: "
                      "fd supports Stable Diffusion 1.x/2.x-style UNets")


def time_embedding(unet, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The UNet's timestep embedding for one timestep per batch row (timestep: float [B])."""
    t_emb = unet.time_proj(timestep).to(dtype)  # time_proj always returns fp32
    emb = unet.time_embedding(t_emb)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def _cross_kwargs(block, text: torch.Tensor) -> dict:
    return {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}


class UNetEncoder(nn.Module):
    """(sample, timestep[B], text) → (mid, skip_00, …, skip_NN)."""

    def __init__(self, unet):
        super().__init__()
        check_supported(unet)
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        unet = self.unet
        emb = time_embedding(unet, timestep, sample.dtype)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        hidden = unet.conv_in(sample)
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, block_skips = block(hidden_states=hidden, temb=emb, **_cross_kwargs(block, encoder_hidden_states))
            skips += block_skips
        mid = unet.mid_block(hidden, emb, **_cross_kwargs(unet.mid_block, encoder_hidden_states))
        return (mid, *skips)


class UNetDecoder(nn.Module):
    """(timestep[B], text, mid, (skip_00, …, skip_NN)) → noise prediction. Row r uses timestep[r]."""

    def __init__(self, unet):
        super().__init__()
        check_supported(unet)
        self.unet = unet

    def forward(self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, mid: torch.Tensor,
                skips: tuple[torch.Tensor, ...]):
        unet = self.unet
        emb = time_embedding(unet, timestep, mid.dtype)
        hidden, remaining = mid, tuple(skips)
        for block in unet.up_blocks:
            n = len(block.resnets)
            block_skips, remaining = remaining[-n:], remaining[:-n]
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=block_skips,
                           **_cross_kwargs(block, encoder_hidden_states))
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def unet_levels(unet) -> int:
    """Total spatial downsampling of the UNet (2 per down block that downsamples)."""
    return 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
