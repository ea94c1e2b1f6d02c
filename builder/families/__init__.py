"""Model families on the build side, by name. A new family is one file here and one line below (and its
runtime side in runtime/families/)."""
from __future__ import annotations

import json
from pathlib import Path

from fd.runtime.errors import FdError
from fd.builder.families.base import BuildFamily, Components
from fd.builder.families import deepfloyd_if, dit, flux, pixart, sd, sd3, sdxl, video

FAMILIES: dict[str, BuildFamily] = {family.name: family for family in (sd.FAMILY, sdxl.FAMILY, dit.FAMILY, pixart.FAMILY,
                                                                       sd3.FAMILY, flux.FAMILY, deepfloyd_if.FAMILY,
                                                                       deepfloyd_if.SR_FAMILY, video.ANIMATEDIFF,
                                                                       video.T2V)}


def family_generating(model: str):
    """The function that makes the generated model `model` (tiny, tiny-xl, sd15-random, …), or None."""
    return next((family.generated[model] for family in FAMILIES.values() if model in family.generated), None)


def family_for_folder(folder: Path, what: str) -> BuildFamily:
    """The family a diffusers pipeline folder's model_index.json names (no model_index.json: Stable Diffusion)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return FAMILIES["sd"]
    try:
        pipeline = json.loads(index.read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise FdError(f"{what}: model_index.json is not readable JSON: copy it again from the model's source") from None
    for family in FAMILIES.values():
        if pipeline in family.pipeline_classes:
            return family
    known = ", ".join(cls for family in FAMILIES.values() for cls in family.pipeline_classes)
    raise FdError(f"{what} is a {pipeline} folder, which fd does not build: fd builds {known} folders")


def save_pipeline_folder(comps: Components, folder: str) -> None:
    """Write components as a diffusers pipeline folder of their family (what `--model DIR` and diffusers load)."""
    import diffusers
    scheduler_class = getattr(diffusers, comps.scheduler_config.get("_class_name", "DDIMScheduler"))
    FAMILIES[comps.family].diffusers_pipeline(comps, scheduler_class.from_config(comps.scheduler_config)) \
        .save_pretrained(folder)


__all__ = ["FAMILIES", "BuildFamily", "Components", "family_for_folder", "family_generating", "save_pipeline_folder"]
