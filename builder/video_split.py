"""Video UNet → encoder + decoder: the FasterDiffusion split of diffusers' UNetMotionModel (AnimateDiff) and
UNet3DConditionModel (ModelScope text-to-video), with the temporal layers intact.

One graph row is one whole video. The halves take the latent in diffusers' video layout (rows, C, F, h, w), one
timestep and one text embedding per row, and fold the frames into the batch inside the graph as diffusers' own
forward does (frame-major within a video: row r, frame f is batch entry r·F + f): the time embedding and the text
are repeated per frame there, so a decoder call over k steps is rows × F frames in one batch.

The cache is the mid-block output and every down-block skip, each kept per video as (rows, F, C, h, w) so its
batch axis stays the row the runtime repeats and slices. The number of frames F is fixed when the graphs are made
(the motion modules' reshapes need it as a constant). Both modules share the UNet's weights.
"""
from __future__ import annotations

import torch
from torch import nn

from fd.builder.split import decode_up
from fd.runtime.errors import FdError


def per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(rows, …) → (rows·F, …), each row repeated F times in place: repeat_interleave, written as expand and reshape
    (what ONNX exports as plain shape ops)."""
    return x[:, None].expand(x.shape[0], frames, *x.shape[1:]).reshape(x.shape[0] * frames, *x.shape[1:])


def fold(video: torch.Tensor) -> torch.Tensor:
    """(rows, C, F, h, w) → (rows·F, C, h, w), as the diffusers forward permutes its sample."""
    rows, channels, frames, height, width = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(rows * frames, channels, height, width)


def unfold(frames_batch: torch.Tensor, frames: int) -> torch.Tensor:
    """(rows·F, C, h, w) → (rows, C, F, h, w)."""
    return frames_batch.reshape(-1, frames, *frames_batch.shape[1:]).permute(0, 2, 1, 3, 4)


def check_video_unet(unet) -> None:
    """Refuse, in one line, what the split does not carry (SDXL-style motion UNets, image prompts, class labels)."""
    cfg = unet.config
    found = [f"{name}={cfg.get(name)!r}" for name in ("addition_embed_type", "encoder_hid_dim_type",
                                                       "class_embed_type", "time_cond_proj_dim")
             if cfg.get(name) is not None]
    if getattr(unet, "encoder_hid_proj", None) is not None:
        found.append("an image projection (IP-Adapter)")
    if getattr(unet, "mid_block", None) is None:
        found.append("no mid block")
    if found:
        raise FdError(f"this video UNet uses {', '.join(found)}, which fd's video split does not support: fd supports "
                      "SD1.5-style AnimateDiff (UNetMotionModel) and ModelScope UNet3DConditionModel UNets")


def check_frames(unet, frames: int) -> None:
    """The motion modules' positional embeddings hold motion_max_seq_length frames at most (AnimateDiff)."""
    longest = unet.config.get("motion_max_seq_length")
    if not 1 <= frames <= (longest or 1024):
        limit = f"1 to {longest} (this motion adapter's motion_max_seq_length)" if longest else "1 to 1024"
        raise FdError(f"--frames {frames} is out of range for this model: use {limit}")


def _time_embedding(unet, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row time embedding (timestep: float [rows]); time_proj returns fp32, the embedding runs in `dtype`."""
    return unet.time_embedding(unet.time_proj(timestep).to(dtype))


def _cross(block, text: torch.Tensor, frames: int) -> dict:
    if getattr(block, "has_cross_attention", False):
        return {"encoder_hidden_states": text, "num_frames": frames}
    return {"num_frames": frames}


def _mid(unet, hidden, emb, text, frames):
    # AnimateDiff adapters without a motion mid block keep SD's UNetMidBlock2DCrossAttn, which takes no num_frames
    if hasattr(unet.mid_block, "motion_modules") or hasattr(unet.mid_block, "temp_convs"):
        return unet.mid_block(hidden, emb, encoder_hidden_states=text, num_frames=frames)
    return unet.mid_block(hidden, emb, encoder_hidden_states=text)


class VideoUNetEncoder(nn.Module):
    """(sample (rows, C, F, h, w), timestep[rows], text (rows, seq, width)) → (mid, skip_00, …), each (rows, F, …)."""

    def __init__(self, unet, frames: int):
        super().__init__()
        check_video_unet(unet)
        self.unet, self.frames = unet, frames

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        unet, frames = self.unet, self.frames
        emb = per_frame(_time_embedding(unet, timestep, sample.dtype), frames)
        text = per_frame(encoder_hidden_states, frames)
        hidden = unet.conv_in(fold(sample))
        if getattr(unet, "transformer_in", None) is not None:  # UNet3D's temporal transformer right after conv_in
            hidden = unet.transformer_in(hidden, num_frames=frames, return_dict=False)[0]
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, block_skips = block(hidden_states=hidden, temb=emb, **_cross(block, text, frames))
            skips += block_skips
        mid = _mid(unet, hidden, emb, text, frames)
        return tuple(t.reshape(-1, frames, *t.shape[1:]) for t in (mid, *skips))


class VideoUNetDecoder(nn.Module):
    """(timestep[rows], text (rows, seq, width), mid, *skips) → noise prediction (rows, C, F, h, w).

    Row r decodes its own video with its own timestep: the window's steps are rows of one call."""

    def __init__(self, unet, frames: int):
        super().__init__()
        check_video_unet(unet)
        self.unet, self.frames = unet, frames

    def forward(self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, mid: torch.Tensor, *skips):
        unet, frames = self.unet, self.frames
        emb = per_frame(_time_embedding(unet, timestep, mid.dtype), frames)
        text = per_frame(encoder_hidden_states, frames)
        hidden = mid.reshape(-1, *mid.shape[2:])
        skips = tuple(s.reshape(-1, *s.shape[2:]) for s in skips)
        return unfold(decode_up(unet, hidden, skips, emb, lambda block: _cross(block, text, frames)), frames)


class VideoVaeDecoder(nn.Module):
    """latent (rows, C, F, h, w), already divided by the scaling factor → video (rows, 3, F, H, W) in [-1, 1]: every
    frame through the image VAE, as the video pipelines' decode_latents."""

    def __init__(self, vae, frames: int):
        super().__init__()
        self.vae, self.frames = vae, frames

    def forward(self, latent: torch.Tensor):
        return unfold(self.vae.decode(fold(latent), return_dict=False)[0], self.frames)
