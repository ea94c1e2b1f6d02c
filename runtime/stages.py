"""The UNet and VAE stages, written once on the runner for every family.

The family's prompt stage gives `conditions` (text embeddings and, for SDXL, text_embeds and time_ids),
one row per guidance half and image; both UNet halves read all of them. The encoder's outputs are the
cache (manifest["cache"]: mid, then every skip); the decoder reads the cache and never the latent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Cache:
    values: dict  # cache tensor name → runner-native value
    rows: int  # guidance halves x images


def encode_unet(runner, sample: np.ndarray, timestep: float, conditions: dict) -> Cache:
    """The UNet encoder at one key step: its outputs, kept where the runner holds them."""
    rows = len(sample)
    outputs = runner.run("unet_encoder", {"sample": sample, "timestep": np.full(rows, timestep, np.float32),
                                          **conditions})
    return Cache({name: outputs[name] for name in runner.manifest["cache"]}, rows)


def decode_unet(runner, cache: Cache, timesteps: np.ndarray, conditions: dict) -> np.ndarray:
    """One decoder call for len(timesteps) steps from one cache.

    Rows are laid out step-major: row k·R + r is cache row r (R = cache rows) at timesteps[k].
    Returns the noise predictions as float32 of shape (steps, R, C, H, W).
    """
    steps = len(timesteps)
    feeds = {"timestep": np.repeat(np.asarray(timesteps, np.float32), cache.rows)}
    for name, value in {**conditions, **cache.values}.items():
        feeds[name] = runner.concat([value] * steps, key=f"unet_decoder.{name}") if steps > 1 else value
    noise = runner.download(runner.run("unet_decoder", feeds)["noise_pred"]).astype(np.float32)
    return noise.reshape(steps, cache.rows, *noise.shape[1:])


def decode_vae(runner, latent: np.ndarray) -> np.ndarray:
    """Latents (already divided by the VAE scaling factor) → pixels in [-1, 1], float32 NCHW."""
    return runner.download(runner.run("vae_decoder", {"latent": latent})["image"]).astype(np.float32)


def control_unet(runner, graph: str, cache: Cache, sample: np.ndarray, timestep: float, conditions: dict,
                 image: np.ndarray, scale: float) -> Cache:
    """One ControlNet at a key step, on the encoder's own inputs: the cache with its residuals (times `scale`)
    added, which its graph computes where the cache lies (runtime/control.py)."""
    from runtime.control import CONTROLLED
    rows = len(sample)
    outputs = runner.run(graph, {"sample": sample, "timestep": np.full(rows, timestep, np.float32), **conditions,
                                 "controlnet_cond": image, "conditioning_scale": np.full(rows, scale, np.float32),
                                 **cache.values})
    return Cache({name: outputs[CONTROLLED + name] for name in cache.values}, cache.rows)


def encode_vae(runner, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image in [-1, 1] → the mean and std of its latent distribution, float32 (img2img)."""
    outputs = runner.run("vae_encoder", {"image": image})
    return tuple(runner.download(outputs[name]).astype(np.float32) for name in ("mean", "std"))
