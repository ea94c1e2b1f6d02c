"""The engine folder's manifest.json: what was built, for what, and the checks that load it.

The builder writes it; the runtime reads it and trusts nothing else about the folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.atomic import write_atomic
from runtime.errors import FdError

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPONENTS = ("text_encoder", "unet_encoder", "unet_decoder", "vae_decoder")
BACKENDS = ("onnxruntime", "tensorrt", "torch")


def load_manifest(engine_dir: str | os.PathLike) -> dict:
    """Read and sanity-check an engine folder's manifest; every problem is one FdError line."""
    folder = Path(engine_dir)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FdError(f"engine folder {folder} does not exist: build one with `fd-build --model tiny --out {folder}`")
    if not path.is_file():
        raise FdError(f"{folder} has no {MANIFEST_NAME}: it is not an fd engine folder (build one with fd-build)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FdError(f"{path} is unreadable ({exc}): rebuild the engine folder with fd-build --force") from None
    version = manifest.get("manifest_version")
    if not isinstance(version, int):
        raise FdError(f"{path} has no manifest_version: rebuild the engine folder with fd-build --force")
    if version > MANIFEST_VERSION:
        raise FdError(f"{folder} was built by a newer fd (manifest version {version}, this fd reads up to "
                      f"{MANIFEST_VERSION}): upgrade fd, or rebuild the folder with this fd-build")
    if version < MANIFEST_VERSION:
        raise FdError(f"{folder} was built by an older fd (manifest version {version}): rebuild it with fd-build --force")
    missing = [name for name in COMPONENTS if name not in manifest.get("components", {})]
    if missing:
        raise FdError(f"{path} lists no {', '.join(missing)}: rebuild the engine folder with fd-build --force")
    for name, comp in manifest["components"].items():
        if not (folder / comp["file"]).is_file():
            raise FdError(f"{folder} is missing {comp['file']} ({name}): rebuild the engine folder with fd-build --force")
    return manifest


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))
