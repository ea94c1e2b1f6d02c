"""The engine folder's one way in: everything is written into a hidden folder beside the target, and that
folder is swapped into place only when complete.

- Output problems (a file in the way, a folder that is not an engine folder, a parent that cannot be
  written) are found before any model loads: `staged_folder` checks the target and creates the stage first.
- `--force` replaces only an fd engine folder: one with a readable manifest and nothing fd did not write.
- An interrupt (SIGINT, SIGTERM) or an error before the swap leaves the old folder untouched; the swap
  itself runs with both signals held back, so it is never cut in two.
- Stages and retired folders of builds that were killed (SIGKILL, power loss) are removed by the next build
  to the same target once their process is gone; a stage name is never reused.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from fd.runtime.cli_common import Interrupted, signals_deferred, signals_seen
from fd.runtime.errors import FdError
from fd.runtime.manifest import MANIFEST_NAME

STAGE_TAG, RETIRED_TAG = "building", "old"


def check_target(out: Path, force: bool) -> None:
    """Refuse an --out that fd must not write, before any work starts."""
    if out.name in ("", ".", ".."):
        raise FdError(f"--out {out} names no new folder: give an engine folder path such as engines/my-model")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise FdError(f"--out {out} holds the current folder: give an engine folder path such as engines/my-model")
    existing = next((p for p in [out, *out.parents] if p.exists() or p.is_symlink()), None)
    if existing is not None and existing != out and not existing.is_dir():
        raise FdError(f"--out {out} lies under {existing}, which is a file: choose another --out")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise FdError(f"--out {out} is a file, not an engine folder: choose a folder path that does not exist yet")
    if not force:
        raise FdError(f"{out} already exists: pass --force to replace it, or choose another --out")
    problem = engine_folder_problem(out)
    if problem:
        raise FdError(f"--force replaces only fd engine folders, and {out} {problem}: choose another --out "
                      "(or move that folder away yourself)")


def engine_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole fd engine folder that --force may delete (None: it is one)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"has no readable {MANIFEST_NAME}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("manifest_version"), int):
        return f"has a {MANIFEST_NAME} that is not fd's"
    ours = {MANIFEST_NAME} | {name for file in _files_named(manifest)
                              for name in (file.split("/")[0], file.split("/")[0] + ".data")}
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in ours)
    if foreign:
        return f"holds files fd did not write ({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''})"
    return None


def _files_named(value) -> list[str]:
    """Every string under a "file" key of the manifest (graphs, engines, tokenizers), at any depth."""
    if isinstance(value, dict):
        return [f for key, item in value.items()
                for f in ([item] if key == "file" and isinstance(item, str) else _files_named(item))]
    if isinstance(value, list):
        return [f for item in value for f in _files_named(item)]
    return []


def _leftover(parent: Path, name: str, tag: str) -> list[tuple[Path, int]]:
    """(path, pid) of `.NAME.TAG-PID-…` folders beside the target."""
    pattern = re.compile(rf"\.{re.escape(name)}\.{tag}-(\d+)(-.*)?$")
    found = []
    for entry in parent.glob(f".{name}.{tag}-*") if parent.is_dir() else []:
        match = pattern.match(entry.name)
        if match:
            found.append((entry, int(match.group(1))))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(out: Path) -> None:
    """Remove what killed builds to `out` left behind; restore a retired folder a killed swap orphaned."""
    for retired, pid in _leftover(out.parent, out.name, RETIRED_TAG):
        if not _alive(pid):
            old = retired / "folder"
            if not (out.exists() or out.is_symlink()) and old.is_dir():  # killed between the swap's two renames:
                os.replace(old, out)  # the old folder is the only complete one
            shutil.rmtree(retired, ignore_errors=True)
    for stage, pid in _leftover(out.parent, out.name, STAGE_TAG):
        if not _alive(pid):
            shutil.rmtree(stage, ignore_errors=True)


def _new_stage(out: Path, created: list) -> Path:
    """The stage beside `out`; the parent folders it had to create are added to `created` (innermost first)."""
    created.extend(p for p in [out.parent, *out.parent.parents] if not p.exists())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{STAGE_TAG}-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise FdError(f"cannot write the engine folder {out}: {exc.strerror or exc} ({exc.filename or out.parent}); "
                      "choose an --out in a folder you can write") from None


def _swap_into_place(stage: Path, out: Path, force: bool, committed: list) -> None:
    """The commit point: after it `out` is the new folder; before it, the old one is untouched.
    `committed` gets True once the swap is done (a signal held back over it is raised as the block ends)."""
    retired = None
    try:
        with signals_deferred():
            if signals_seen():  # a library swallowed the interrupt: still never replace the old folder
                raise Interrupted(signals_seen()[0])
            if out.exists() or out.is_symlink():
                problem = "appeared during the build" if not force else engine_folder_problem(out)
                if problem:
                    raise FdError(f"{out} {problem}: nothing was replaced; choose another --out")
                retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.{RETIRED_TAG}-{os.getpid()}-", dir=out.parent))
                os.replace(out, retired / "folder")
            os.replace(stage, out)
            committed.append(True)
    finally:
        if retired is not None:
            if not committed and (retired / "folder").exists():  # the second rename failed: put the old one back
                os.replace(retired / "folder", out)
            shutil.rmtree(retired, ignore_errors=True)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> str | None:
    """What ran out of space, if `exc` (or an error it came from) is a full disk or quota; libraries that write
    (onnx, torch, TensorRT) may wrap the OSError in their own error, keeping its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return f"{exc.strerror or os.strerror(exc.errno)}" + (f" writing {exc.filename}" if exc.filename else "")
        if any(os.strerror(code) in str(exc) for code in DISK_FULL):
            return next(os.strerror(code) for code in DISK_FULL if os.strerror(code) in str(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def staged_folder(out: Path, force: bool):
    """Check `out`, then yield an empty stage beside it; swap it into place if the block completes."""
    check_target(out, force)
    clean_leftovers(out)
    created, committed = [], []
    stage = _new_stage(out, created)
    try:
        yield stage
        _swap_into_place(stage, out, force, committed)
    except BaseException as exc:
        # An interrupt can surface as another error (raised inside a C extension: onnxruntime's import turns
        # it into "ImportError: initialization failed"); after a signal, any failure is the interrupt.
        signum = exc.signum if isinstance(exc, Interrupted) else next(iter(signals_seen()), None)
        if signum is None:
            full = disk_full(exc)
            if full is not None:  # the stage is removed below: the space it took comes back
                raise FdError(f"the disk is full ({full}): the build stopped and {out} is unchanged; free space "
                              f"in {out.parent.absolute()} (or choose another --out) and build again") from None
            raise
        detail = (f"it came as the build finished; {out} holds the new engine folder" if committed else
                  f"the build stopped before it finished; {out} is unchanged")
        raise Interrupted(signum, detail) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not committed:  # a failed build leaves no trace, not even the empty engines/ it made
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
