"""The denoiser and VAE stages, written once on the runner for every family.

The denoiser is the UNet (or, for transformer families, the transformer) split into the method's two
halves: `denoiser_encoder` runs at key steps only, `denoiser_decoder` reads its cache.

The family's prompt stage gives `conditions` (text embeddings, SDXL's text_embeds and time_ids, DiT's class labels),
one row per guidance half and image; both denoiser halves read all of them. The encoder's outputs are the
cache (manifest["cache"]: a UNet's mid and every skip, a transformer's tokens after its last encoder block);
the decoder reads the cache and never the latent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Cache:
    values: dict  # cache tensor name → runner-native value
    rows: int  # guidance halves x images


def encode_denoiser(runner, sample: np.ndarray, timestep: float, conditions: dict) -> Cache:
    """The denoiser encoder at one key step: its outputs, kept where the runner holds them."""
    rows = len(sample)
    outputs = runner.run("denoiser_encoder", {"sample": sample, "timestep": np.full(rows, timestep, np.float32),
                                          **conditions})
    return Cache({name: outputs[name] for name in runner.manifest["cache"]}, rows)


def conditional_rows(runner, conditions: dict, images: int) -> dict:
    """The conditions' conditional half (their last `images` rows: guided rows are [negative…, positive…])."""
    return {name: runner.take_rows(value, runner.rows_of(value) - images, runner.rows_of(value))
            for name, value in conditions.items()}


def decode_denoiser(runner, cache: Cache, timesteps: np.ndarray, conditions: dict,
                rows: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """One decoder call for len(timesteps) steps from one cache.

    `rows[k]` = (start, stop): the cache rows step k decodes (default: all of them; guidance in a limited
    interval gives the steps outside it the conditional half alone). The call's rows are laid out
    step-major: one step's rows, then the next step's. Returns one float32 array of noise predictions per
    step, of shape (stop - start, C, H, W).
    """
    steps, full = len(timesteps), (0, cache.rows)
    rows, timesteps = list(rows or [full] * steps), list(timesteps)
    while sum(stop - start for start, stop in rows) < runner.min_rows("denoiser_decoder"):
        # below the engine's batch range (TensorRT, torch): repeat the last step; its copy is dropped
        rows.append(rows[-1]), timesteps.append(timesteps[-1])
    counts = [stop - start for start, stop in rows]
    feeds = {"timestep": np.repeat(np.asarray(timesteps, np.float32), counts)}
    decoder_inputs = {t["name"] for t in runner.specs["denoiser_decoder"]["inputs"]}  # SD3/FLUX: not the text
    for name, value in {**conditions, **cache.values}.items():
        if name not in decoder_inputs:
            continue
        spans = {span: value if span == full else runner.take_rows(value, *span) for span in set(rows)}
        pieces = [spans[span] for span in rows]
        feeds[name] = runner.concat(pieces, key=f"denoiser_decoder.{name}") if len(pieces) > 1 else pieces[0]
    noise = runner.download(runner.run("denoiser_decoder", feeds)["noise_pred"]).astype(np.float32)
    return np.split(noise, np.cumsum(counts)[:-1])[:steps]


def decode_vae(runner, latent: np.ndarray) -> np.ndarray:
    """Latents (already divided by the VAE scaling factor) → pixels in [-1, 1], float32 NCHW."""
    return runner.download(runner.run("vae_decoder", {"latent": latent})["image"]).astype(np.float32)


def encode_vae(runner, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image in [-1, 1] → the mean and std of its latent distribution, float32 (img2img)."""
    outputs = runner.run("vae_encoder", {"image": image})
    return tuple(runner.download(outputs[name]).astype(np.float32) for name in ("mean", "std"))
