"""Atomic file writes: readers see the old file or the new one, never a half-written one.

`check_writable` probes an output path before any slow work, so a user never waits for a result
that cannot be saved; `write_atomic` turns a failed write into one FdError line.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fd.runtime.errors import FdError


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise FdError unless a file could be written at `path` now; creates nothing that stays.

    `what` names the option in the message (e.g. "--out"). Permission bits are not trusted (root
    ignores them, read-only mounts and /proc do not): a temporary file or folder is made and removed.
    """
    path = Path(path)
    if path.is_dir():
        raise FdError(f"{what} {path} is a folder: give the path of a file to write (it may be inside that folder)")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:  # write_atomic makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise FdError(f"{what} {path} cannot be written: {folder} is a file, not a folder; choose another path")
    try:
        if folder == path.absolute().parent:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.probe.")
            os.close(handle)
            os.unlink(probe)
        else:
            shutil.rmtree(tempfile.mkdtemp(dir=folder, prefix=".fd-probe."))
    except OSError as exc:
        raise FdError(f"{what} {path} cannot be written: {folder} does not take new files "
                      f"({exc.strerror or exc}); choose a writable folder") from None


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call write(binary_file) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as exc:
        raise FdError(f"cannot write {path}: {exc.strerror or exc}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, folder replaced meanwhile: one line, nothing left behind
            raise FdError(f"cannot write {path}: {exc.strerror or exc}; free space or choose another path") from None
        raise
