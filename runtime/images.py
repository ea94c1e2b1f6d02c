"""Input images (ControlNet conditioning, img2img start) read and prepared exactly as diffusers prepares them.

diffusers' VaeImageProcessor.preprocess, for a PIL image: resize to the generation size (PIL, Lanczos;
a no-op at that size), then convert to RGB, then float32 / 255 in NCHW. The ControlNet pipelines stop
there ([0, 1], `do_normalize=False`); the img2img pipelines map to [-1, 1] (2x - 1). numpy and PIL only.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fd.runtime.errors import FdError


def load_image(source, flag: str) -> Image.Image:
    """An image from a path (or a PIL image, passed through), each problem one FdError line naming `flag`."""
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise FdError(f"{flag} must be a path to an image file or a PIL image, not {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise FdError(f"{flag} {path} is a folder: give an image file (PNG, JPEG, …)")
    if not path.exists():
        raise FdError(f"{flag} {path}: no such file: give an image file (PNG, JPEG, …)")
    try:
        with Image.open(path) as image:
            image.load()  # read now: a truncated or unreadable file fails here, not mid-generation
            return image.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        # SyntaxError: PIL's parsers raise it for some malformed headers
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FdError(f"{flag} {path} is not an image PIL can read ({reason}): give a PNG or JPEG file") from None


def prepare_image(image: Image.Image, height: int, width: int, normalize: bool) -> np.ndarray:
    """(1, 3, height, width) float32: in [0, 1], or in [-1, 1] when `normalize` (what the VAE encoder takes)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    array = array.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(2.0 * array - 1.0 if normalize else array, dtype=np.float32)
