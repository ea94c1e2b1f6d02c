"""ControlNets on the build side: load each `--controlnet`, check it fits the UNet, and make its graph.

A ControlNet reads what the UNet encoder reads (the step's latent, timestep and conditions) plus a
conditioning image, and returns one residual per cache tensor (every skip and the mid output), which
diffusers adds to the UNet's skips and mid output. FasterDiffusion runs it only at key steps, like the
encoder, and the window's decoder calls reuse the sums.

The graph takes the key step's cache as inputs and returns the cache with the scaled residuals added
(`controlled_mid`, `controlled_skip_00`, …). Doing the add inside the graph needs no new runner
primitive: on every backend the sum is made on the device where the cache already lies, and several
ControlNets simply chain (each adds its residuals to the previous one's output, as MultiControlNet's
residuals add up). The UNet graphs stay as they are.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fd.builder.specs import Axis, tensor
from fd.builder.split import added_condition_names
from fd.runtime.control import CONTROLLED  # prefix of the graph's outputs: the cache with the residuals added
from fd.runtime.errors import FdError

GENERATED = "tiny-controlnet"  # made from the --model's own UNet
SD15_RANDOM = "sd15-random-controlnet"  # made from sd15-random's UNet, whatever the --model: fits any SD1.5 UNet
GENERATED_NAMES = (GENERATED, SD15_RANDOM)
# Config keys that fix a ControlNet's residual shapes and what it reads: they must equal the UNet's.
MATCHING_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                 "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
TINY_CONTROLNET_SEED = 1
TINY_OUTPUT_STD = 0.05  # the random "zero convolutions": large enough that the control image visibly matters


@dataclass
class LoadedControlNet:
    model: object  # diffusers ControlNetModel, eval mode, on the CPU
    source: dict  # for the manifest: what was loaded, and the sha256 of its weights


def graph_names(count: int) -> list[str]:
    """`controlnet` for one ControlNet, `controlnet_0`, `controlnet_1`, … for several (applied in that order)."""
    return ["controlnet"] if count == 1 else [f"controlnet_{i}" for i in range(count)]


def check_controlnet_options(controlnets: list[str]) -> None:
    """Checks that need no model (run before the base model loads): local folders exist and hold a ControlNet."""
    from fd.builder.models import looks_like_path
    for name in controlnets:
        if name in GENERATED_NAMES or not (Path(name).expanduser().exists() or looks_like_path(name)):
            continue
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise FdError(f"--controlnet {name}: {'it is a file, not a folder' if folder.exists() else 'no such folder'}"
                          f": give a local ControlNet folder (config.json and weights), a hub id, or {GENERATED}")
        if not (folder / "config.json").is_file():
            raise FdError(f"--controlnet {name} has no config.json: give a diffusers ControlNetModel folder "
                          "(what ControlNetModel.save_pretrained writes)")


def load_controlnet(name: str, unet) -> LoadedControlNet:
    """`name` (tiny-controlnet, sd15-random-controlnet, a local folder or a hub id in the local cache) as a
    ControlNet for `unet`."""
    from fd.builder.models import _hub_snapshot, looks_like_path
    if name in GENERATED_NAMES:
        model = make_tiny_controlnet(unet if name == GENERATED else sd15_random_unet(unet))
        source = {"model": name, "kind": "generated", "seed": TINY_CONTROLNET_SEED,
                  "note": "random weights made from the UNet's config; it steers noise, not images"}
    elif Path(name).expanduser().exists() or looks_like_path(name):
        path = Path(name).expanduser().resolve()
        model = _from_folder(str(path), f"--controlnet {name}")
        source = {"model": name, "kind": "local", "path": str(path)}
    else:
        if name.count("/") != 1 or any(not part for part in name.split("/")):
            raise FdError(f"unknown --controlnet '{name}': use {GENERATED}, a hub id such as org/name, or a local "
                          "ControlNet folder")
        folder = _hub_snapshot(name, name)
        model = _from_folder(folder, f"hub ControlNet {name}")
        source = {"model": name, "kind": "hub", "repo_id": name, "revision": Path(folder).name, "path": folder}
    check_fits(model, unet, name)
    source["weights_sha256"] = weights_sha256(model)
    return LoadedControlNet(model.eval(), source)


def sd15_random_unet(unet):
    """sd15-random's UNet (SD1.5's config, seeded random weights), which sd15-random-controlnet is made from.
    It is regenerated (some seconds, 3.4 GB for the while) so the ControlNet's weights are the same whatever
    SD1.5-shaped model it is built with; a UNet of another shape is refused first, in one line, from the
    config alone (made on the meta device, nothing allocated)."""
    from fd.builder.families.sd import make_sd15_random_components
    with torch.device("meta"):
        shape_only = make_sd15_random_components().unet
    for key in MATCHING_KEYS:
        mine, theirs = shape_only.config.get(key), unet.config.get(key)
        if _normal(mine) != _normal(theirs):
            raise FdError(f"--controlnet {SD15_RANDOM} is SD1.5-shaped and does not fit this model: its {key} is "
                          f"{mine!r}, the UNet's is {theirs!r}; use {GENERATED}, made from the model's own UNet")
    return make_sd15_random_components().unet


def _from_folder(folder: str, what: str):
    from diffusers import ControlNetModel
    from fd.builder.loading import check_safetensors, first_line, quiet_libraries
    quiet_libraries()
    if not (Path(folder) / "config.json").is_file():
        raise FdError(f"{what} has no config.json: give a diffusers ControlNetModel folder")
    check_safetensors(Path(folder))
    try:
        return ControlNetModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, TypeError) as exc:
        raise FdError(f"cannot load {what} as a diffusers ControlNetModel: {first_line(exc)}") from None


def check_fits(controlnet, unet, name: str) -> None:
    """Refuse, in one line, a ControlNet made for another UNet or one fd cannot run."""
    for key in MATCHING_KEYS:
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if _normal(mine) != _normal(theirs):
            raise FdError(f"--controlnet {name} does not fit this model: its {key} is {mine!r}, the UNet's is "
                          f"{theirs!r}; use a ControlNet trained for this base model")
    if controlnet.config.get("global_pool_conditions"):
        raise FdError(f"--controlnet {name} pools its conditions (global_pool_conditions, guess mode), which fd "
                      "does not run: use a ControlNet without it")
    if controlnet.config.get("conditioning_channels", 3) != 3:
        raise FdError(f"--controlnet {name} takes {controlnet.config.conditioning_channels}-channel conditioning "
                      "images; fd prepares RGB control images (3 channels)")


def _normal(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def make_tiny_controlnet(unet, seed: int = TINY_CONTROLNET_SEED):
    """A random ControlNet made from `unet`'s config and weights (diffusers' ControlNetModel.from_unet) whose
    conditioning embedding and zero-initialised output convolutions get seeded random weights, so that the
    control image changes the image: He-initialised embedding convolutions (the default initialisation
    shrinks the image's signal about 10^4-fold over its eight layers), small random output convolutions."""
    from diffusers import ControlNetModel
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            conv.bias.zero_()
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            for parameter in conv.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * TINY_OUTPUT_STD)
    return controlnet.eval()


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class ControlNetGraph(nn.Module):
    """(sample, timestep, conditions…, controlnet_cond, conditioning_scale, mid, skip_00, …) → the cache with
    this ControlNet's residuals, times the per-row scale, added: controlled_mid, controlled_skip_00, …

    diffusers multiplies the residuals by the scale inside the ControlNet and the UNet adds them to its
    skips and mid output; here the scale is an input (one per row) and the same two operations run in the
    same order."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet = controlnet
        self.added = added_condition_names(unet)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = dict(zip(self.added, rest[:len(self.added)]))
        image, scale, mid, *skips = rest[len(self.added):]
        residuals, mid_residual = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                                  controlnet_cond=image, conditioning_scale=1.0,
                                                  added_cond_kwargs=added or None, return_dict=False)
        scale = scale.to(mid.dtype).reshape(-1, 1, 1, 1)
        return (mid + mid_residual * scale, *(skip + residual * scale for skip, residual in zip(skips, residuals)))


def controlnet_graphs(comps, names: list[str], specs: dict, geometry: dict, precision: str) -> tuple:
    """({graph: module}, {graph: spec}, manifest records) for the ControlNets `names`, in the order given."""
    from fd.builder.families.base import DTYPE_NAMES, TORCH_DTYPES, _cast
    modules, graph_specs, records = {}, {}, []
    encoder = specs["denoiser_encoder"]
    unet_dtype = DTYPE_NAMES[precision]
    image = tensor("controlnet_cond", unet_dtype, [3, Axis("height", geometry["height"]),
                                                   Axis("width", geometry["width"])])
    for graph, name in zip(graph_names(len(names)), names):
        loaded = load_controlnet(name, comps.unet)
        modules[graph] = ControlNetGraph(_cast(loaded.model, TORCH_DTYPES[precision]), comps.unet).eval()
        cache = encoder["outputs"]
        graph_specs[graph] = {
            "inputs": [*encoder["inputs"], image, tensor("conditioning_scale", "float32", []), *cache],
            "outputs": [{**t, "name": CONTROLLED + t["name"]} for t in cache],
            "batch": dict(encoder["batch"]),
        }
        records.append({"graph": graph, "source": loaded.source, "conditioning_channels": 3,
                        "conditioning_size": [geometry["height"], geometry["width"]]})
    return modules, graph_specs, records
