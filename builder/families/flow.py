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
# The decoder's share of the FLOPs of DiT-XL/2 split at the paper's block 18 of 28 (dit-xl-random, 256²:
# benchmarks/RESULTS.md, "DiT-XL/2-shaped", (a)); the flow families' default split aims at the same share.
DIT_DECODER_SHARE = 0.357


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

    def default_split(self, comps: Components) -> int:
        """The block whose split gives the decoder the FLOP share closest to DiT-XL/2's at the paper's block 18
        (blocks differ in cost: SD3.5's dual-attention blocks, FLUX's double- and single-stream ones)."""
        before, blocks, after = block_flops(self, comps)
        total = before + sum(blocks) + after
        shares = {split: (sum(blocks[split:]) + after) / total for split in range(1, len(blocks))}
        return min(shares, key=lambda split: abs(shares[split] - DIT_DECODER_SHARE))

    def graph_modules(self, comps: Components, precision: str) -> dict[str, nn.Module]:
        modules = super().graph_modules(comps, precision)
        vae = _cast(comps.vae, TORCH_DTYPES[self.vae_precision(comps, precision)])
        modules["vae_decoder"] = ShiftedVaeDecoderGraph(vae).eval()
        return modules

    def decoder_reads(self, condition: str) -> bool:
        return condition in self.decoder_conditions

    def specs(self, comps, modules, geometry, precision, limits):
        specs = super().specs(comps, modules, geometry, precision, limits)
        decoder = specs["denoiser_decoder"]
        conditions = {t["name"] for t in self.conditions(comps, "float32")}
        decoder["inputs"] = [t for t in decoder["inputs"] if t["name"] not in conditions or self.decoder_reads(t["name"])]
        return specs

    def cache_tensors(self, shapes: list[tuple], dtype: str) -> list[dict]:
        tokens, context = shapes  # the image tokens (h, w, width) and the text tokens (L, width)
        return [tensor(TOKENS, dtype, list(tokens)), tensor(CONTEXT, dtype, list(context))]


def block_flops(family, comps: Components) -> tuple[int, list[int], int]:
    """FLOPs of one row at the native size, counted on a shapes-only (meta) copy of the transformer in seconds:
    (before the blocks, each block in execution order, after them)."""
    import dataclasses
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        transformer = type(comps.transformer).from_config(comps.transformer.config)
    meta = dataclasses.replace(comps, transformer=transformer, options={})
    depth = family.depth(meta)
    meta.options["split_block"] = depth - 1  # the decoder half is the last block and what follows it
    encoder, decoder = family.denoiser_halves(meta, torch.float32)
    channels, _, side = family.size_rule(comps)
    specs = family.conditions(comps, "float32")
    conditions = [torch.empty([1 if d == "batch" else d for d in spec["shape"]], device="meta") for spec in specs]
    decoder_conditions = [c for c, spec in zip(conditions, specs) if family.decoder_reads(spec["name"])]
    timestep = torch.empty(1, device="meta")

    def count(module, *args):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = module(*args)
        counts = counter.get_flop_counts()
        root = type(module).__name__
        blocks = [sum(counts.get(f"{root}.blocks.{i}", {}).values()) for i in range(len(module.blocks))]
        return out, int(counter.get_total_flops()), blocks
    cache, encoder_total, encoder_blocks = count(encoder, torch.empty(1, channels, side, side, device="meta"),
                                                 timestep, *conditions)
    _, decoder_total, decoder_blocks = count(decoder, timestep, *decoder_conditions, *cache)
    return encoder_total - sum(encoder_blocks), encoder_blocks + decoder_blocks, decoder_total - sum(decoder_blocks)
