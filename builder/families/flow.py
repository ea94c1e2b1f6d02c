"""What the flow-matching MM-DiT families (SD3/SD3.5, FLUX.1) share on the build side.

Both transformers run two token streams, the image tokens and the text ("context") tokens, through joint
blocks that attend over both. Split at block S (counted in execution order), the encoder's cache is both
streams after block S−1: `tokens`, the image tokens as a (h, w, width) grid per row (so the decoder knows
the latent's height and width from its own input), and `context`, the text tokens (L, width). The decoder
runs blocks S … L−1, the final adaptive norm, the projection and unpatchify with each row's own timestep
embedding (and its pooled text, and FLUX-dev's guidance), so a window's steps batch as for UNets. It never
reads the text embeddings themselves: the decoder takes only the conditions in `decoder_conditions`.

Both VAEs shift as well as scale their latents: the pipelines decode latents / scaling_factor + shift_factor.
fd's runtime divides by the scaling factor for every family, so the VAE decoder graph adds the shift.
"""
from __future__ import annotations

import torch
from torch import nn

from fd.builder.families.base import TORCH_DTYPES, Components, VaeDecoderGraph, _cast
from fd.builder.families.transformer import TransformerFamily
from fd.builder.specs import tensor

TOKENS, CONTEXT = "tokens", "context"


class ShiftedVaeDecoderGraph(VaeDecoderGraph):
    """latent / scaling_factor → image in [-1, 1], adding the VAE's shift_factor first (SD3, FLUX.1)."""

    def forward(self, latent):
        shift = self.vae.config.shift_factor or 0.0
        return self.vae.decode(latent + shift, return_dict=False)[0]


def token_grid(hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(rows, h·w, width) image tokens → (rows, h, w, width), the cache's layout."""
    return hidden.reshape(hidden.shape[0], height, width, hidden.shape[-1])


def unpatchify(hidden: torch.Tensor, height: int, width: int, patch: int, channels: int) -> torch.Tensor:
    """(rows, h·w, p·p·c) → (rows, c, h·p, w·p), as SD3Transformer2DModel's forward."""
    hidden = hidden.reshape(hidden.shape[0], height, width, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], channels, height * patch, width * patch)


class FlowTransformerFamily(TransformerFamily):
    """A flow-matching two-stream transformer split at a block; subclasses give the halves and the text side."""

    decoder_conditions: tuple[str, ...] = ()  # the conditions the decoder reads (not the text embeddings)

    def graph_modules(self, comps: Components, precision: str) -> dict[str, nn.Module]:
        modules = super().graph_modules(comps, precision)
        vae = _cast(comps.vae, TORCH_DTYPES[self.vae_precision(comps, precision)])
        modules["vae_decoder"] = ShiftedVaeDecoderGraph(vae).eval()
        return modules

    def specs(self, comps, modules, geometry, precision, limits):
        specs = super().specs(comps, modules, geometry, precision, limits)
        decoder = specs["denoiser_decoder"]
        cache = {TOKENS, CONTEXT}
        decoder["inputs"] = [t for t in decoder["inputs"]
                             if t["name"] in ("timestep", *self.decoder_conditions) or t["name"] in cache]
        return specs

    def cache_tensors(self, shapes: list[tuple], dtype: str) -> list[dict]:
        tokens, context = shapes  # the image tokens (h, w, width) and the text tokens (L, width)
        return [tensor(TOKENS, dtype, list(tokens)), tensor(CONTEXT, dtype, list(context))]
