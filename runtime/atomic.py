"""Atomic file writes: readers see the old file or the new one, never a half-written one.

`check_writable` probes an output path before any slow work, so a user never waits for a result
that cannot be saved; `write_atomic` turns a failed write into one FdError line.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from fd.runtime.errors import FdError


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise FdError unless a file could be written at `path` now; creates nothing that stays.

    `what` names the option in the message (e.g. "--out"). Permission bits are not trusted (root
    ignores them, read-only mounts and /proc do not): a temporary file or folder is made and removed.
    """
    try:
        _check_writable(Path(path), what)
    except OSError as exc:  # a name too long, a path through a file, ...
        raise FdError(_os_problem(what, path, exc)) from None


def check_target(path: Path, what: str) -> None:
    """Only a regular file (or nothing) may be replaced: never a symlink (its target would stay, the link would
    go), a device such as /dev/null, a FIFO or a socket."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a file in the way is said by the caller)
        return
    if stat.S_ISLNK(mode):
        raise FdError(f"{what} {path} is a symbolic link: fd writes only regular files; give the path of the file "
                      "itself (or a new name)")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FdError(f"{what} {path} is a device, FIFO or socket, not a regular file: give the path of a file to "
                      "write")


def _os_problem(what: str, path, exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        longest = max((len(part.encode("utf-8", "surrogateescape")) for part in Path(path).parts), default=0)
        return (f"{what} {str(path)[:60]}… cannot be written: its name is too long ({longest} bytes in one part; "
                "file systems allow 255): choose a shorter name")
    return f"{what} {path} cannot be written ({exc.strerror or exc}): choose another path"


def _check_writable(path: Path, what: str) -> None:
    check_target(path, what)
    if path.is_dir():
        raise FdError(f"{what} {path} is a folder: give the path of a file to write (it may be inside that folder)")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:  # write_atomic makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise FdError(f"{what} {path} cannot be written: {folder} is a file, not a folder; choose another path")
    try:
        if folder == path.absolute().parent:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name[:100]}.probe.")
            os.close(handle)
            os.unlink(probe)
        else:
            shutil.rmtree(tempfile.mkdtemp(dir=folder, prefix=".fd-probe."))
    except OSError as exc:
        raise FdError(f"{what} {path} cannot be written: {folder} does not take new files "
                      f"({exc.strerror or exc}); choose a writable folder") from None


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call write(binary_file) on a temporary file beside `path`, then rename it into place. Only a regular file
    is ever replaced (check_target)."""
    path = Path(path)
    try:
        check_target(path, "output")
        path.parent.mkdir(parents=True, exist_ok=True)
        # the temporary name is cut short: a name near the 255-byte limit still gets one
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=path.suffix[:20])
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise FdError(_os_problem("cannot write", path, exc)) from None
        raise FdError(f"cannot write {path}: {exc.strerror or exc}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
        check_target(path, "output")  # again: a link or device put there while `write` ran
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, folder replaced meanwhile: one line, nothing left behind
            if exc.errno == errno.ENAMETOOLONG:
                raise FdError(_os_problem("cannot write", path, exc)) from None
            raise FdError(f"cannot write {path}: {exc.strerror or exc}; free space or choose another path") from None
        raise
