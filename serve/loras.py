"""fd-serve's run-time LoRAs: a request names LoRA files by name, from the one folder fd-serve was started with
(--lora-dir), never by a path of the server's.

The front checks that each name is a plain .safetensors file name (no folder part, no leading dot), so no
request can reach outside the folder; the engine replica then finds the name among the folder's entries (what
the operator put there, links included, is what is allowed). Pickles are never read for a client.
"""
from __future__ import annotations

from pathlib import Path

from fd.runtime.errors import FdError

SUFFIX = ".safetensors"
MAX_NAME = 255  # a file name's usual limit
MAX_LORAS = 8  # per request; more is a mistake, and each costs a file read at swap time


def check_lora_name(name: str) -> str | None:
    """Why a requested LoRA name is refused (None: it is a plain .safetensors file name)."""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        return f"is not a file name: give the name of a {SUFFIX} file in the server's LoRA folder (GET /v1/info)"
    if "/" in name or "\\" in name or name.startswith("."):
        return "is not a plain file name: give a name from the server's LoRA folder (GET /v1/info), not a path"
    if not name.endswith(SUFFIX):
        return f"is not a {SUFFIX} file: fd-serve reads LoRAs as {SUFFIX} only"
    return None


class LoraFolder:
    """The folder given to fd-serve --lora-dir: the LoRAs requests may name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise FdError(f"--lora-dir {folder}: no such folder: give the folder that holds the LoRA .safetensors "
                          "files requests may name")

    def names(self) -> list[str]:
        """The LoRA files requests may name, sorted."""
        return sorted(p.name for p in self.folder.iterdir() if check_lora_name(p.name) is None and p.is_file())

    def resolve(self, loras) -> tuple[tuple[str, float], ...]:
        """A request's (name, scale) pairs as (path, scale) pairs in this folder; FdError for any other name."""
        out = []
        for name, scale in loras:
            problem = check_lora_name(name)
            if problem is not None:
                raise FdError(f'LoRA "{name}" {problem}')
            path = self.folder / name
            if not path.is_file():
                raise FdError(f'LoRA "{name}" is not in the server\'s LoRA folder: give one of the names GET /v1/info '
                              "lists")
            out.append((str(path), scale))
        return tuple(out)


def resolve_request_loras(request, folder: LoraFolder | None):
    """The request with its LoRA names resolved in `folder` (fd-serve --lora-dir); unchanged without LoRAs."""
    if not request.loras:
        return request
    if folder is None:
        raise FdError('"loras" given, but this server has no LoRA folder: start fd-serve with --lora-dir FOLDER '
                      "(a folder built with fd-build --refittable), or drop \"loras\"")
    return request.replace(loras=folder.resolve(request.loras))
