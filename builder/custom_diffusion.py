"""Custom Diffusion weights baked into the UNet's attention projections (fd-build --custom-diffusion FILE).

A Custom Diffusion file (diffusers' save_attn_procs: `<attention>.processor.to_k_custom_diffusion.weight`,
`to_v_…`, and with train_q_out also `to_q_…` and `to_out_custom_diffusion.0.weight/.bias`) holds replacements,
not updates: diffusers' CustomDiffusionAttnProcessor computes the attention with them instead of the layer's own
to_k / to_v (/ to_q / to_out[0]). Copying them into those layers gives the same forward pass, with the UNet's
own attention processor. Its modifier token (`<new1>`) is a textual-inversion embedding: --textual-inversion.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fd.builder.adapt import read_tensors
from fd.runtime.errors import FdError

# file's name after `<attention>.processor.` → the attention layer's parameter it replaces
REPLACES = {"to_k_custom_diffusion.weight": "to_k.weight", "to_v_custom_diffusion.weight": "to_v.weight",
            "to_q_custom_diffusion.weight": "to_q.weight", "to_out_custom_diffusion.0.weight": "to_out.0.weight",
            "to_out_custom_diffusion.0.bias": "to_out.0.bias"}


def bake_custom_diffusion(comps, path: Path, allow_pickle: bool = False) -> int:
    """Copy the file's projections into the UNet; returns how many attention layers changed."""
    if comps.unet is None:
        raise FdError(f"--custom-diffusion {path.name}: Custom Diffusion is for the UNet families (sd, sdxl), not "
                      f"{comps.family}: drop --custom-diffusion")
    tensors, _ = read_tensors(path, allow_pickle, "--custom-diffusion")
    parameters = dict(comps.unet.named_parameters())
    layers = set()
    replacements = []
    for key, value in tensors.items():
        attention, sep, name = key.partition(".processor.")
        target = f"{attention}.{REPLACES.get(name, '')}"
        if not sep or name not in REPLACES:
            raise FdError(f"--custom-diffusion {path.name}: unknown key {key}: not a Custom Diffusion attention weight")
        if target not in parameters:
            raise FdError(f"--custom-diffusion {path.name}: it replaces unet.{target}, which this model does not "
                          "have: use weights trained for this model")
        if tuple(value.shape) != tuple(parameters[target].shape):
            raise FdError(f"--custom-diffusion {path.name}: unet.{target} is {tuple(parameters[target].shape)} here, "
                          f"the file's is {tuple(value.shape)}: the weights are for another model")
        replacements.append((parameters[target], value))
        layers.add(attention)
    if not replacements:
        raise FdError(f"--custom-diffusion {path.name}: the file holds no weights")
    with torch.no_grad():
        for parameter, value in replacements:
            parameter.copy_(value.to(parameter.dtype))
    return len(layers)
