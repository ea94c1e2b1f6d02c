"""A video folder's clips on disk: an animated GIF (Pillow), an MP4 (where an encoder library is installed: the
`video` extra, imageio-ffmpeg) or a folder of PNG frames. Paths are checked before the engines load; every file is
written atomically (fd.runtime.atomic)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from fd.runtime.atomic import check_writable, write_atomic
from fd.runtime.errors import FdError

CLIP_SUFFIXES = (".gif", ".mp4")
DEFAULT_OUT = "outputs/fd.gif"
DEFAULT_FPS = 8  # AnimateDiff's model cards show 16 frames as a 2-second clip


def frame_name(index: int) -> str:
    return f"frame-{index:03d}.png"


def output_paths(out: str, count: int) -> list[Path]:
    """One clip path per video (numbered -0, -1, … for several), each checked writable. A path without a suffix is
    a folder of PNG frames."""
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix and suffix not in CLIP_SUFFIXES:
        raise FdError(f"--out {out}: a video folder writes a .gif, an .mp4 or a folder of PNG frames (a path "
                      f"without a suffix), not {suffix}")
    if suffix == ".mp4":
        mp4_encoder()
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    for clip in paths:
        check_writable(clip if suffix else clip / frame_name(0), "--out")
    return paths


def mp4_encoder():
    """imageio-ffmpeg (it ships its own ffmpeg binary), or one line naming the extra."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise FdError("--out …mp4 needs an MP4 encoder, which is not installed: pip install "
                      "'fasterdiffusion-engines[video]' (imageio-ffmpeg), or write a .gif or a folder of PNG "
                      "frames") from None
    return imageio_ffmpeg


def write_clip(frames: list, path: Path, fps: int = DEFAULT_FPS) -> None:
    """Write one video's PIL frames as `path`'s kind says (.gif, .mp4, else a folder of PNGs)."""
    suffix = path.suffix.lower()
    if suffix == ".gif":
        write_atomic(path, lambda f: f.write(gif_bytes(frames, fps)))
    elif suffix == ".mp4":
        write_atomic(path, lambda f: f.write(mp4_bytes(frames, fps)))
    else:
        for index, frame in enumerate(frames):
            write_atomic(path / frame_name(index), lambda f, frame=frame: frame.save(f, format="PNG"))


def gif_bytes(frames: list, fps: int = DEFAULT_FPS) -> bytes:
    """An animated GIF that loops (Pillow); fd-serve returns a video folder's clips so."""
    import io
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def mp4_bytes(frames: list, fps: int) -> bytes:
    """H.264 in yuv420p (what players expect), through imageio-ffmpeg into a scratch file."""
    import numpy as np
    encoder = mp4_encoder()
    width, height = frames[0].size
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "clip.mp4"
        # macro_block_size 2: yuv420p needs even sides; fd's sizes are multiples of 8 already
        writer = encoder.write_frames(str(target), (width, height), fps=fps, codec="libx264",
                                      pix_fmt_out="yuv420p", macro_block_size=2, quality=8)
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"))))
        writer.close()
        return target.read_bytes()
