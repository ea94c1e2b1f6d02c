"""Model families on the runtime side, by the name the manifest records. A new family is one file here and
one line below (and its build side in builder/families/)."""
from __future__ import annotations

from fd.runtime.errors import FdError
from fd.runtime.families.base import Family, PromptRequest
from fd.runtime.families.sd import StableDiffusion
from fd.runtime.families.sdxl import StableDiffusionXL
from fd.runtime.families.dit import DiT
from fd.runtime.families.pixart import PixArtAlpha
from fd.runtime.families.sd3 import StableDiffusion3
from fd.runtime.families.flux import Flux
from fd.runtime.families.deepfloyd_if import DeepFloydIF, DeepFloydIFSuperResolution
from fd.runtime.families.video import AnimateDiff, TextToVideo

FAMILIES: dict[str, Family] = {family.name: family for family in (StableDiffusion(), StableDiffusionXL(), DiT(),
                                                                  PixArtAlpha(), StableDiffusion3(), Flux(),
                                                                  DeepFloydIF(), DeepFloydIFSuperResolution(),
                                                                  AnimateDiff(), TextToVideo())}


def family_of(manifest: dict) -> Family:
    family = FAMILIES.get(manifest.get("family"))
    if family is None:
        raise FdError(f"this engine folder is for the model family {manifest.get('family')!r}, which this fd does "
                      f"not know (it knows {', '.join(FAMILIES)}): upgrade fd, or rebuild the folder with fd-build --force")
    return family


__all__ = ["FAMILIES", "Family", "PromptRequest", "family_of"]
