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


# The image files fd reads (fd-run's paths, fd-serve's base64 bodies): told apart by their first bytes, not a
# name, so no other PIL parser (TIFF, EPS through Ghostscript, ICO, ...) ever sees a client's bytes.
IMAGE_FORMATS = "PNG, JPEG or WEBP"
FORMAT_SIGNATURES = (("PNG", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n")),
                     ("JPEG", lambda head: head.startswith(b"\xff\xd8\xff")),
                     ("WEBP", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP"))
# A control or start image is resized to the generation size: anything larger than 4096 x 4096 is refused from
# its header, before its pixels are decoded (PIL's own bomb check starts at 89 M pixels).
MAX_IMAGE_PIXELS = 4096 * 4096


def image_format(head: bytes) -> str | None:
    """PNG, JPEG or WEBP from a file's first 12 bytes; None for anything else."""
    return next((name for name, matches in FORMAT_SIGNATURES if matches(head)), None)


def read_image(file, name: str, fix: str) -> Image.Image:
    """Decode one PNG, JPEG or WEBP image from a binary file object: its format from its first bytes and its size
    from its header checked before any pixel is decoded. Every problem is one FdError line: `name` then the
    problem then `fix` (what to send instead)."""
    head = file.read(12)
    file.seek(0)
    kind = image_format(head)
    if kind is None:
        raise FdError(f"{name} is not a {IMAGE_FORMATS} image (fd reads only these formats): {fix}")
    try:
        with Image.open(file, formats=[kind]) as image:  # reads the header only
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise FdError(f"{name} is {image.width}x{image.height} pixels; at most {MAX_IMAGE_PIXELS} "
                              "(4096x4096) are accepted: resize it to (about) the image size")
            image.load()  # decode now: a truncated or unreadable file fails here, not mid-generation
            return image.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        # SyntaxError: PIL's parsers raise it for some malformed headers
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FdError(f"{name} is not an image PIL can read ({kind}: {reason}): {fix}") from None


def load_image(source, flag: str) -> Image.Image:
    """An image from a path (or a PIL image, passed through), each problem one FdError line naming `flag`."""
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise FdError(f"{flag} must be a path to an image file or a PIL image, not {type(source).__name__}")
    path = Path(source)
    try:
        if path.is_dir():
            raise FdError(f"{flag} {path} is a folder: give an image file ({IMAGE_FORMATS})")
        if not path.is_file():  # missing, or a device, a FIFO or a socket: nothing to read an image from
            what = "no such file" if not path.exists() else "not a regular file"
            raise FdError(f"{flag} {path}: {what}: give an image file ({IMAGE_FORMATS})")
        with open(path, "rb") as file:
            return read_image(file, f"{flag} {path}", f"give a {IMAGE_FORMATS} file")
    except OSError as exc:  # unreadable, a name too long, ...
        raise FdError(f"{flag} {path} cannot be read ({exc.strerror or exc}): give a readable image file "
                      f"({IMAGE_FORMATS})") from None


def prepare_image(image: Image.Image, height: int, width: int, normalize: bool) -> np.ndarray:
    """(1, 3, height, width) float32: in [0, 1], or in [-1, 1] when `normalize` (what the VAE encoder takes)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    array = array.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(2.0 * array - 1.0 if normalize else array, dtype=np.float32)
