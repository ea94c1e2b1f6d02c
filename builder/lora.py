"""LoRA files → weight updates of the loaded components, fused before export (fd-build --lora FILE[:SCALE]).

diffusers reads the formats (`lora_state_dict` turns kohya/A1111 `lora_unet_…`/`lora_te_…` keys into its own,
and its state-dict utilities turn those into peft's `<module>.lora_A/lora_B`); the fusing is fd's, since
diffusers fuses only through peft. The update of a layer W is, as peft defines it (LoraLayer.get_delta_weight):

    W ← W + scale · (alpha / rank) · B @ A      A = lora_A / lora_down (rank × in), B = lora_B / lora_up (out × rank)

for convolutions with B's 1×1 kernel applied over A's kernel. `alpha / rank` is 1 for diffusers/peft files
without adapter metadata (peft's lora_alpha = r, as diffusers configures it), lora_alpha / rank with metadata,
and each module's own `.alpha` / rank for kohya files (read here, before diffusers' conversion).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fd.builder.adapt import read_tensors
from fd.builder.loading import first_line
from fd.runtime.errors import FdError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraDelta:
    """One parameter's update at scale 1: `component` ("unet", "text_encoder", "text_encoder_2"), the parameter's
    name within it ("down_blocks.0….to_q.weight") and the float32 delta to add."""

    component: str
    parameter: str
    delta: torch.Tensor


def fuse_lora(comps, path: Path, scale: float, allow_pickle: bool = False) -> int:
    """Add `scale` × each update to the weights in place; returns how many layers changed."""
    if comps.unet is None:
        raise FdError(f"--lora {path.name}: LoRA is supported for the UNet families (sd, sdxl); the {comps.family} "
                      "family has no diffusers LoRA loader fd is checked against: drop --lora")
    modules = {"unet": comps.unet, "text_encoder": comps.text_encoder, "text_encoder_2": comps.text_encoder_2}
    tensors = {name: dict(module.state_dict(keep_vars=True)) for name, module in modules.items() if module is not None}
    tables = {name: {key: tuple(t.shape) for key, t in state.items()} for name, state in tensors.items()}
    deltas = lora_deltas(path, comps.family, tables, dict(comps.unet.config), allow_pickle)
    with torch.no_grad():
        for d in deltas:
            target = tensors[d.component][d.parameter]
            target.add_((scale * d.delta).to(target.dtype))
    return len({(d.component, d.parameter.rsplit(".", 1)[0]) for d in deltas})


def lora_deltas(path: Path, family: str, tables: dict[str, dict[str, tuple]], unet_config: dict | None = None,
                allow_pickle: bool = False, flag: str = "--lora") -> list[LoraDelta]:
    """Every parameter update the LoRA file at `path` makes, checked against `tables`: per component, its
    parameters' names and shapes (a loaded model's, or a refittable engine folder's record of them)."""
    raw, metadata = read_tensors(path, allow_pickle, flag)
    if not raw:
        raise FdError(f"{flag} {path.name}: the file holds no tensors")
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in raw):
        raise FdError(f"{flag} {path.name}: a DoRA file (dora_scale / magnitude vectors); fd fuses plain LoRA only")
    if all(key.startswith(KOHYA_PREFIXES) for key in raw):
        raw = _fold_kohya_alphas(raw, path)
    state = _diffusers_state_dict(family, unet_config, raw, path)
    alphas = _metadata_alphas(metadata, path)
    deltas = []
    for prefix in sorted({key.split(".", 1)[0] for key in state}):
        table = tables.get(prefix)
        if table is None:
            hint = " (an SDXL LoRA?)" if prefix == "text_encoder_2" else ""
            raise FdError(f"{flag} {path.name}: it changes '{prefix}', which this {family} model does not "
                          f"have{hint}: use a LoRA made for this model")
        part = {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
        deltas += _component_deltas(prefix, table, _to_peft(prefix, part, path), alphas.get(prefix), path)
    return deltas


def _fold_kohya_alphas(raw: dict, path: Path) -> dict:
    """kohya's per-module `<name>.alpha` → lora_up scaled by alpha / rank (rank: lora_down's first dimension),
    so what diffusers converts needs no alphas and every module keeps its own scale."""
    raw = dict(raw)
    unknown = [k for k in raw if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if unknown:
        raise FdError(f"--lora {path.name}: unknown key {unknown[0]} (kohya LoRA keys end in .lora_down.weight, "
                      ".lora_up.weight or .alpha)")
    for key in [k for k in raw if k.endswith(".alpha")]:
        name = key[:-len(".alpha")]
        down, up = raw.get(f"{name}.lora_down.weight"), raw.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise FdError(f"--lora {path.name}: '{key}' has no lora_down/lora_up weights beside it: the file is "
                          "incomplete or not a LoRA")
        raw[f"{name}.lora_up.weight"] = up.float() * (float(raw.pop(key)) / down.shape[0])
    return raw


def _diffusers_state_dict(family: str, unet_config: dict | None, raw: dict, path: Path) -> dict:
    """diffusers' own reading of the file: keys `unet.…`, `text_encoder.…`, `text_encoder_2.…`."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    if family == "sdxl":  # kohya's SDXL files number the UNet's blocks as the original code does
        loader, options = StableDiffusionXLLoraLoaderMixin, {"unet_config": FrozenDict(unet_config or {})}
    else:
        loader, options = StableDiffusionLoraLoaderMixin, {}
    try:
        state, _ = loader.lora_state_dict(dict(raw), **options)
    except (ValueError, KeyError, IndexError) as exc:
        raise FdError(f"--lora {path.name}: diffusers cannot read its keys ({first_line(exc)}): it is not a "
                      "LoRA in the diffusers/peft or kohya format") from None
    return state


def _metadata_alphas(metadata: dict, path: Path) -> dict:
    """{component: lora_alpha} from diffusers' adapter metadata (written by save_lora_weights), if any."""
    if not metadata.get(METADATA_KEY):
        return {}
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise FdError(f"--lora {path.name}: its {METADATA_KEY} is not JSON: the file is damaged") from None
    alphas = {}
    for key, value in config.items():
        prefix, _, name = key.partition(".")
        if name in ("alpha_pattern", "rank_pattern") and value:
            raise FdError(f"--lora {path.name}: per-module {name} in its metadata is not supported by fd: merge the "
                          "LoRA's alphas into its weights first")
        if name == "lora_alpha":
            alphas[prefix] = float(value)
    return alphas


def _to_peft(prefix: str, part: dict, path: Path) -> dict:
    """A component's keys as peft names them (`<module>.lora_A.weight`), with diffusers' own converters."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)
    if any(".lora_A." in key or ".lora_B." in key for key in part):
        return part
    try:
        if prefix == "unet":
            return convert_unet_state_dict_to_peft(part)
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    except ValueError as exc:
        raise FdError(f"--lora {path.name}: unknown {prefix} keys ({first_line(exc)}), e.g. {next(iter(part))}") \
            from None


def _component_deltas(prefix: str, table: dict, part: dict, lora_alpha: float | None, path: Path) -> list[LoraDelta]:
    pairs: dict[str, dict] = {}
    for key, value in part.items():
        name, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight", "B.bias"):
            raise FdError(f"--lora {path.name}: unknown key {prefix}.{key}: not a LoRA down/up weight")
        pairs.setdefault(name, {})[kind] = value
    text_model = any(key.startswith("text_model.") for key in table)
    deltas = []
    for name, parts in sorted(pairs.items()):
        layer = _layer_name(name, text_model)
        shape = table.get(f"{layer}.weight")
        if shape is None:
            raise FdError(f"--lora {path.name}: it changes {prefix}.{name}, which this model does not have: "
                          "use a LoRA made for this model (family and version)")
        if "A.weight" not in parts or "B.weight" not in parts:
            raise FdError(f"--lora {path.name}: {prefix}.{name} has only one of its down/up weights: the file is "
                          "incomplete")
        down, up = parts["A.weight"].float(), parts["B.weight"].float()
        factor = 1.0 if lora_alpha is None else lora_alpha / down.shape[0]  # alpha / rank
        delta = _delta(down, up, prefix, name, path) * factor
        if tuple(delta.shape) != shape:
            if delta.numel() != math.prod(shape) or shape[2:] != (1,) * (len(shape) - 2):
                raise FdError(f"--lora {path.name}: {prefix}.{name} is {shape} here but the LoRA's "
                              f"update is {tuple(delta.shape)}: the LoRA is for another model")
            delta = delta.reshape(shape)  # a linear update of a 1x1 convolution (SD's proj_in / proj_out)
        deltas.append(LoraDelta(prefix, f"{layer}.weight", delta))
        if "B.bias" in parts:
            if table.get(f"{layer}.bias") != tuple(parts["B.bias"].shape):
                raise FdError(f"--lora {path.name}: {prefix}.{name} has a LoRA bias this layer cannot take")
            deltas.append(LoraDelta(prefix, f"{layer}.bias", parts["B.bias"].float() * factor))
    return deltas


def _layer_name(name: str, text_model: bool) -> str:
    """transformers 5's CLIPTextModel has no `text_model.` level; LoRA files made under 4.x name it: accept both."""
    if name.startswith("text_model.") and not text_model:
        return name[len("text_model."):]
    if text_model and not name.startswith("text_model.") and name.startswith(("encoder.", "embeddings.")):
        return f"text_model.{name}"
    return name


def _delta(down: torch.Tensor, up: torch.Tensor, prefix: str, name: str, path: Path) -> torch.Tensor:
    """B @ A for linear layers; for convolutions A carries the kernel and B is 1×1 (peft's conv LoRA)."""
    if down.ndim == 2 and up.ndim == 2 and up.shape[1] == down.shape[0]:
        return up @ down
    if down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1) and up.shape[1] == down.shape[0]:
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    raise FdError(f"--lora {path.name}: {prefix}.{name}'s down {tuple(down.shape)} and up {tuple(up.shape)} weights "
                  "do not form a low-rank update")
