"""FLOPs per sample of the UNet encoder and decoder, counted by PyTorch's FLOP counter at build time.

fd-bench turns them into the FLOP floor: the speedup that skipping the encoder allows at best.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


# On CPU tensors scaled_dot_product_attention runs a kernel the counter has no formula for (it would count
# 0 FLOPs and leave attention out of the split); count it as the attention it is.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}  # shapes


def unet_flops(modules: dict, specs: dict) -> dict[str, int]:
    """FLOPs of one sample (one CFG row) through the encoder and through the decoder."""
    def ones(spec):
        feeds = []
        for tensor in spec["inputs"]:
            shape = [1 if d == "batch" else d for d in tensor["shape"]]
            dtype = torch.float16 if tensor["dtype"] == "float16" else torch.float32
            feeds.append(torch.full(shape, 0.5, dtype=dtype) if tensor["name"] != "timestep" else torch.tensor([500.0]))
        return feeds

    counts = {}
    with torch.no_grad():
        for name in ("denoiser_encoder", "denoiser_decoder"):
            with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
                modules[name](*ones(specs[name]))
            counts[name] = int(counter.get_total_flops())
    return counts
