"""DeepCache-style feature caching on a diffusers UNet2DConditionModel, as a comparison arm for fd-bench --quality.

The idea (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024): every `interval`-th
UNet call runs in full and keeps the deep features that enter the shallowest up block; the calls in between
run only the shallowest branch (conv_in, the first down block's layers, the last up block and the output
head), reusing the kept deep features in place of everything below. `DeepCache(pipe.unet, interval=3)` wraps
the UNet's forward for the duration of a `with` block (one generation), and puts it back afterwards.

Written for fd from the paper's description; DeepCache's own code is not used (it is not installed here).
Only SD-style UNets (no added embeddings, no ControlNet residuals) are supported.
"""
from __future__ import annotations

import torch

from fd.builder.split import added_condition_names, check_supported, time_embedding
from fd.runtime.errors import FdError


class DeepCache:
    """Context manager: while active, `unet(...)` is a full pass every `interval` calls and a shallow one between."""

    def __init__(self, unet, interval: int = 3):
        if interval < 1:
            raise FdError(f"DeepCache interval {interval} is not allowed: use 1 (no caching) or more")
        check_supported(unet)
        if added_condition_names(unet):
            raise FdError("the DeepCache arm supports SD-style UNets only (this one has added embeddings, as SDXL)")
        self.unet, self.interval = unet, interval
        self.calls = 0
        self.full_calls = 0
        self.deep = None  # what the shallowest up block received at the last full call

    def __enter__(self):
        self.calls, self.full_calls, self.deep = 0, 0, None
        self.unet.forward = self._forward  # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc):
        del self.unet.forward
        self.deep = None
        return False

    def _forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if args or any(value is not None for value in kwargs.values()):
            raise FdError("the DeepCache arm takes no extra UNet inputs (cross_attention_kwargs, residuals, …)")
        full = self.calls % self.interval == 0
        self.calls += 1
        self.full_calls += full
        out = self.run(sample, timestep, encoder_hidden_states, full)
        return _Output(out) if return_dict else (out,)

    def run(self, sample, timestep, encoder_hidden_states, full: bool) -> torch.Tensor:
        """One UNet evaluation: the whole network (keeping the deep features) or the shallowest branch."""
        unet = self.unet
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0]).float()
        emb = time_embedding(unet, timestep, sample.dtype)
        h = unet.conv_in(sample)
        skips = [h]
        first = unet.down_blocks[0]
        if full:
            for block in unet.down_blocks:
                h, res = _down(block, h, emb, encoder_hidden_states)
                skips.extend(res)
            h = _mid(unet.mid_block, h, emb, encoder_hidden_states)
            for block in unet.up_blocks[:-1]:
                res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
                h = _up(block, h, emb, res, encoder_hidden_states)
            self.deep = h
        else:
            if self.deep is None or self.deep.shape[0] != sample.shape[0]:
                raise FdError("DeepCache: a shallow call came before any full one (or with another batch size)")
            # the first down block without its downsampler: the last up block reads only these skips
            for i, resnet in enumerate(first.resnets):
                h = resnet(h, emb)
                if getattr(first, "has_cross_attention", False):
                    h = first.attentions[i](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                skips.append(h)
            h = self.deep
        last = unet.up_blocks[-1]
        h = _up(last, h, emb, skips[-len(last.resnets):], encoder_hidden_states)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


class _Output:
    """What `unet(...)` returns with return_dict=True (only `.sample` is read by the pipelines)."""

    def __init__(self, sample):
        self.sample = sample

    def __getitem__(self, index):
        return (self.sample,)[index]


def _down(block, h, emb, context):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=context)
    return block(hidden_states=h, temb=emb)


def _mid(block, h, emb, context):
    if getattr(block, "has_cross_attention", False):
        return block(h, emb, encoder_hidden_states=context)
    return block(h, emb)


def _up(block, h, emb, res, context):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=tuple(res), encoder_hidden_states=context)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=tuple(res))
