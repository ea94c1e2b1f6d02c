"""ControlNets at key steps only (FasterDiffusion's ControlNet case).

At a key step the UNet encoder fills the cache; then each ControlNet of the folder runs on the same
step's input (scaled latent, timestep, conditions) and its graph adds its scaled residuals to the cache
(builder/controlnet.py: the graph takes the cache and returns `controlled_*`). The window's decoder calls
reuse that cache, so a ControlNet runs exactly once per key step. With every step a key step (--no-fd)
that is diffusers' ControlNet pipeline; several ControlNets add up as its MultiControlNet does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fd.runtime import stages
from fd.runtime.errors import FdError
from fd.runtime.images import load_image, prepare_image

CONTROLLED = "controlled_"  # graph output names: the cache tensor's name with this prefix
REBUILD = "rebuild with fd-build --controlnet ID_OR_FOLDER"


def controlnet_records(manifest: dict) -> list[dict]:
    """The folder's ControlNets, in the order they apply (manifest "controlnets")."""
    return list(manifest.get("controlnets") or [])


@dataclass
class ControlInputs:
    graphs: list[str]
    images: list[np.ndarray]  # one (1, 3, H, W) float32 image in [0, 1] per ControlNet
    scales: list[float]

    def apply(self, runner, cache: stages.Cache, sample: np.ndarray, timestep, conditions: dict) -> stages.Cache:
        """The key step's cache with every ControlNet's residuals added (sample/conditions: the encoder's)."""
        rows = len(sample)  # the control image is the same on every row (both guidance halves, every prompt)
        for graph, image, scale in zip(self.graphs, self.images, self.scales):
            cache = control_denoiser(runner, graph, cache, sample, timestep, conditions,
                                     np.repeat(image, rows, axis=0), scale)
        return cache


def control_denoiser(runner, graph: str, cache: stages.Cache, sample: np.ndarray, timestep: float, conditions: dict,
                     image: np.ndarray, scale: float) -> stages.Cache:
    """One ControlNet at a key step, on the encoder's own inputs: the cache with its residuals (times `scale`)
    added, which its graph computes where the cache lies."""
    rows = len(sample)
    outputs = runner.run(graph, {"sample": sample, "timestep": np.full(rows, timestep, np.float32), **conditions,
                                 "controlnet_cond": image, "conditioning_scale": np.full(rows, scale, np.float32),
                                 **cache.values})
    return stages.Cache({name: outputs[CONTROLLED + name] for name in cache.values}, cache.rows)


def prepare_control(manifest: dict, control_images, scales, height: int, width: int) -> ControlInputs | None:
    """Check and prepare --control-image / --controlnet-scale against the folder's ControlNets (None: none)."""
    records = controlnet_records(manifest)
    images = [] if control_images is None else (
        [control_images] if not isinstance(control_images, (list, tuple)) else list(control_images))
    scales = None if scales is None else ([scales] if not isinstance(scales, (list, tuple)) else list(scales))
    if not records:
        if images:
            raise FdError(f"--control-image given, but this engine folder has no ControlNet: drop it, or {REBUILD}")
        if scales:
            raise FdError("--controlnet-scale given, but this engine folder has no ControlNet: drop it")
        return None
    count = len(records)
    names = ", ".join(str(r.get("source", {}).get("model", r["graph"])) for r in records)
    if not images:
        raise FdError(f"this engine folder was built with {_controlnets(count)} ({names}): give "
                      f"{'--control-image PATH' if count == 1 else f'{count} --control-image PATHs, in that order'}")
    if len(images) != count:
        raise FdError(f"{len(images)} --control-image given, but this engine folder has {_controlnets(count)} "
                      f"({names}): give one per ControlNet, in that order")
    scales = [1.0] * count if not scales else scales
    if len(scales) == 1:
        scales = scales * count
    if len(scales) != count:
        raise FdError(f"{len(scales)} --controlnet-scale values for {_controlnets(count)}: give one for all, or one "
                      "per ControlNet")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise FdError(f"--controlnet-scale {scale} is not allowed: give a finite number (1.0 is the default)")
    prepared = [prepare_image(load_image(image, "--control-image"), height, width, normalize=False) for image in images]
    return ControlInputs([r["graph"] for r in records], prepared, [float(s) for s in scales])


def _controlnets(count: int) -> str:
    return "1 ControlNet" if count == 1 else f"{count} ControlNets"


# --- the folder's optional image-input graphs, checked when the manifest loads -------------------------

def is_image_input_graph(name: str) -> bool:
    """Graphs a folder may hold besides its family's: `vae_encoder` (--img2img) and the ControlNets."""
    return name == "vae_encoder" or name == "controlnet" or (
        name.startswith("controlnet_") and name[len("controlnet_"):].isdigit())


def is_controlnet_graph(name: str) -> bool:
    """A ControlNet's graph (`controlnet`, `controlnet_1`, …): it runs where the denoiser encoder runs."""
    return is_image_input_graph(name) and name != "vae_encoder"


def image_graph_problem(manifest: dict) -> str | None:
    """How the manifest's ControlNet records disagree with its graphs and cache (None: they agree)."""
    components, cache = manifest["components"], manifest["cache"]
    recorded = [r["graph"] for r in controlnet_records(manifest)]  # the schema checked their shape
    graphs = [name for name in components if is_controlnet_graph(name)]
    if sorted(recorded) != sorted(graphs):
        return f"controlnets names graphs {recorded}, components holds ControlNet graphs {graphs}"
    for graph in graphs:
        inputs = {t["name"] for t in components[graph]["inputs"]}
        outputs = [t["name"] for t in components[graph]["outputs"]]
        missing = [name for name in (*cache, "controlnet_cond", "conditioning_scale") if name not in inputs]
        if missing or outputs != [CONTROLLED + name for name in cache]:
            return f"components.{graph} does not take the cache and return it with its residuals added"
    return None
