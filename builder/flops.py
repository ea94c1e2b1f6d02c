"""FLOPs per sample of the denoiser's halves and of each ControlNet, counted by PyTorch's FLOP counter at
build time.

fd-bench turns them into the FLOP floor: the speedup that skipping the encoder allows at best. A ControlNet
runs where the encoder runs (at key steps only with FasterDiffusion), so its FLOPs count on the encoder's side.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fd.runtime.control import is_controlnet_graph

# On CPU tensors scaled_dot_product_attention runs a kernel the counter has no formula for (it would count
# 0 FLOPs and leave attention out of the split); count it as the attention it is.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}  # shapes
DENOISER_HALVES = ("denoiser_encoder", "denoiser_decoder")


def counted_graphs(modules: dict) -> list[str]:
    """The graphs whose FLOPs the floor needs: the denoiser's halves, then the ControlNets in build order."""
    return [*DENOISER_HALVES, *(name for name in modules if is_controlnet_graph(name))]


def unet_flops(modules: dict, specs: dict) -> dict[str, int]:
    """FLOPs of one sample (one CFG row) through the encoder, the decoder and each ControlNet graph."""
    def ones(spec):
        """One row of every input in its own dtype: floats 0.5, integers (DiT's class labels, PixArt's token mask)
        0, the timestep 500. The count depends on shapes alone; the dtypes keep embedding lookups valid."""
        feeds = []
        for tensor in spec["inputs"]:
            shape = [1 if d == "batch" else d for d in tensor["shape"]]
            dtype = getattr(torch, tensor["dtype"])  # "float32", "float16", "int64"
            if tensor["name"] == "timestep":
                feeds.append(torch.tensor([500.0]))
            elif dtype.is_floating_point:
                feeds.append(torch.full(shape, 0.5, dtype=dtype))
            else:
                feeds.append(torch.zeros(shape, dtype=dtype))
        return feeds

    counts = {}
    with torch.no_grad():
        for name in counted_graphs(modules):
            with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
                modules[name](*ones(specs[name]))
            counts[name] = int(counter.get_total_flops())
    return counts
