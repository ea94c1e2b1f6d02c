"""The one backend interface: four graphs, a device-resident cache, and call counts.

A backend supplies five primitives (`_run`, `upload`, `download`, `repeat`, `synchronize`); the stage
methods the pipeline calls are written once here on top of them. Values between the UNet encoder and
decoder stay in the backend's own array type (device memory on a GPU): the cache never visits the host.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class Backend:
    name = "base"

    def __init__(self, engine_dir, manifest: dict):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.specs = manifest["components"]
        self.calls: Counter[str] = Counter()  # graph executions per component, for tests and reports

    # --- primitives -----------------------------------------------------------------------------------
    def _run(self, component: str, feeds: dict) -> list:
        """Execute one graph on backend-native inputs; return its outputs in spec order."""
        raise NotImplementedError

    def upload(self, array: np.ndarray, dtype: str):
        """Host array → backend-native array of the spec's dtype."""
        raise NotImplementedError

    def download(self, value) -> np.ndarray:
        raise NotImplementedError

    def repeat(self, value, times: int):
        """Stack `times` copies along the batch axis (copy k holds rows k·B … k·B + B − 1)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (so that stage timings are true)."""

    def close(self) -> None:
        """Release sessions, engines and device memory."""

    # --- stages ---------------------------------------------------------------------------------------
    def run(self, component: str, feeds: dict) -> list:
        self.calls[component] += 1
        return self._run(component, feeds)

    def _inputs(self, component: str, arrays: dict):
        """Upload host arrays in the dtypes the component's spec asks for; pass native values through."""
        dtypes = {t["name"]: t["dtype"] for t in self.specs[component]["inputs"]}
        return {name: self.upload(value, dtypes[name]) if isinstance(value, np.ndarray) else value
                for name, value in arrays.items()}

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        (text,) = self.run("text_encoder", self._inputs("text_encoder", {"input_ids": input_ids}))
        return self.download(text).astype(np.float32)

    def encode_unet(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> list:
        """The UNet encoder at one key step; returns the cache (mid + skips), backend-native."""
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}
        return self.run("unet_encoder", self._inputs("unet_encoder", feeds))

    def decode_unet(self, cache: list, timesteps: np.ndarray, text: np.ndarray) -> np.ndarray:
        """One decoder call for len(timesteps) steps from one cache.

        Rows are laid out step-major: row k·R + r is cache row r (R = cache batch) at timesteps[k].
        Returns the noise predictions as float32 of shape (steps, R, C, H, W).
        """
        steps, rows = len(timesteps), len(text)
        feeds = {"timestep": np.repeat(timesteps.astype(np.float32), rows),
                 "encoder_hidden_states": np.concatenate([text] * steps)}
        for name, value in zip(self.manifest["cache"], cache):
            feeds[name] = self.repeat(value, steps) if steps > 1 else value
        (noise,) = self.run("unet_decoder", self._inputs("unet_decoder", feeds))
        noise = self.download(noise).astype(np.float32)
        return noise.reshape(steps, rows, *noise.shape[1:])

    def decode_vae(self, latent: np.ndarray) -> np.ndarray:
        (image,) = self.run("vae_decoder", self._inputs("vae_decoder", {"latent": latent}))
        return self.download(image).astype(np.float32)
