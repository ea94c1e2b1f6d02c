"""What the transformer families (DiT, PixArt) share on the build side: the split at a block.

The paper treats DiT-XL/2's first 18 of 28 transformer blocks as the encoder and the last 10 plus the final
layer as the decoder; the cache is the token tensor after the last encoder block (rows x tokens x width).
A family file (dit.py, pixart.py) supplies the two halves; the split point, the size rule and the cache's
tensor record are the same for both.
"""
from __future__ import annotations

from fd.builder.families.base import BuildFamily, Components
from fd.builder.specs import tensor
from fd.runtime.errors import FdError

PAPER_SPLIT_BLOCK, PAPER_DEPTH = 18, 28  # DiT-XL/2: blocks 0-17 encoder, 18-27 + final layer decoder
CACHE_NAME = "tokens"


def default_split_block(depth: int) -> int:
    """The paper's 18-of-28 split scaled to `depth` blocks, keeping at least one block on each side."""
    return min(max(round(PAPER_SPLIT_BLOCK * depth / PAPER_DEPTH), 1), depth - 1)


class TransformerFamily(BuildFamily):
    """A family whose denoiser is a patch transformer (comps.transformer), split at block `split_block`."""

    supports_dynamic_shape = False  # the token count (and its position embedding) is fixed at build time

    def depth(self, comps: Components) -> int:
        """The number of blocks, in execution order (FLUX: double-stream then single-stream blocks)."""
        return len(comps.transformer.transformer_blocks)

    def check_supported(self, comps: Components) -> None:
        if self.depth(comps) < 2:
            raise FdError("this transformer has fewer than 2 blocks, so it cannot be split into an encoder and a "
                          "decoder: fd needs at least 2")

    def default_split(self, comps: Components) -> int:
        """The split block when --split-block is not given."""
        return default_split_block(self.depth(comps))

    def set_split_block(self, comps: Components, split_block: int | None) -> None:
        depth = self.depth(comps)
        split = self.default_split(comps) if split_block is None else split_block
        if not 1 <= split < depth:
            raise FdError(f"--split-block {split} does not fit this {depth}-block transformer: use 1 to {depth - 1} "
                          f"(default {self.default_split(comps)})")
        comps.options["split_block"] = split  # recorded in the manifest (family_options)

    def split_block(self, comps: Components) -> int:
        split = comps.options.get("split_block")
        return self.default_split(comps) if split is None else split

    def size_rule(self, comps: Components) -> tuple[int, int, int]:
        config = comps.transformer.config
        return config.in_channels, config.patch_size, config.sample_size

    def cache_tensors(self, shapes: list[tuple], dtype: str) -> list[dict]:
        (tokens,) = shapes  # one tensor: the tokens after the last encoder block
        return [tensor(CACHE_NAME, dtype, list(tokens))]
