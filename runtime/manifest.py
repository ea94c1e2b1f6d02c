"""The engine folder's manifest.json: what was built, for what, and the checks that load it.

The builder writes it; the runtime reads it and trusts nothing else about the folder. A folder can be
tampered with or corrupt, so load_manifest checks the manifest's shape (runtime/manifest_schema.py),
that every file it names lies inside the folder, and that its parts agree with each other; each
problem is one FdError line naming the bad key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from fd.runtime import manifest_schema
from fd.runtime.atomic import write_atomic
from fd.runtime.batch import Limits, batch_range
from fd.runtime.calibrated_steps import check_calibrations
from fd.runtime.errors import FdError

# 2: model families (family, family_options, tokenizers), named tensor axes, graphs listed by the family
MANIFEST_VERSION = 3
MANIFEST_NAME = "manifest.json"
REBUILD = "rebuild the engine folder with fd-build --force"


def load_manifest(engine_dir: str | os.PathLike) -> dict:
    """Read and check an engine folder's manifest; every problem is one FdError line."""
    folder = Path(engine_dir)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FdError(f"engine folder {folder} does not exist: build one with `fd-build --model tiny --out {folder}`")
    if not path.is_file():
        raise FdError(f"{folder} has no {MANIFEST_NAME}: it is not an fd engine folder (build one with fd-build)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise FdError(f"{path} is unreadable ({exc}): {REBUILD}") from None
    except RecursionError:  # json's parser recurses once per nesting level; fd's manifests are a few levels deep
        raise FdError(f"{path} is nested too deeply to be an fd manifest: {REBUILD}") from None
    try:
        manifest_schema.check(manifest, dict)
    except manifest_schema.SchemaError as exc:
        raise FdError(f"{path}: {exc}: {REBUILD}") from None
    check_version(manifest, path)
    try:
        files = manifest_schema.check(manifest)
    except manifest_schema.SchemaError as exc:
        raise FdError(f"{path}: {exc}: {REBUILD}") from None
    for key_path, name in files:
        check_file(folder, key_path, name)
    check_no_links_out(folder)
    check_graphs(manifest, path)
    check_cache(manifest, path)
    check_batch_ranges(manifest, path)
    check_calibrations(manifest, path)
    return manifest


def check_version(manifest: dict, path: Path) -> None:
    version = manifest.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FdError(f"{path} has no manifest_version: {REBUILD}")
    if version > MANIFEST_VERSION:
        raise FdError(f"{path.parent} was built by a newer fd (manifest version {version}, this fd reads up to "
                      f"{MANIFEST_VERSION}): upgrade fd, or rebuild the folder with this fd-build")
    if version < MANIFEST_VERSION:
        raise FdError(f"{path.parent} was built by an older fd (manifest version {version}): "
                      "rebuild it with fd-build --force")


def check_file(folder: Path, key_path: str, name: str) -> None:
    """A file the manifest names must be a plain relative path to a file inside the folder."""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise FdError(f"{folder / MANIFEST_NAME}: {key_path} is {name!r}, expected a relative path inside the "
                      f"engine folder: {REBUILD}")
    target = folder / relative
    if not inside(target, folder):
        raise FdError(f"{target} ({key_path}) is a link that leads outside the engine folder: {REBUILD}")
    if not target.is_file():
        raise FdError(f"{folder} is missing {name} ({key_path}): {REBUILD}")


def check_no_links_out(folder: Path) -> None:
    """Files the manifest does not name (an ONNX graph's external weights) are opened too: no links out."""
    for root, dirs, names in os.walk(folder):
        for entry in dirs + names:
            candidate = Path(root, entry)
            if candidate.is_symlink() and not inside(candidate, folder):
                raise FdError(f"{candidate} is a link that leads outside the engine folder: {REBUILD}")


def inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def check_graphs(manifest: dict, path: Path) -> None:
    """The folder holds exactly the graphs of its family, and a tokenizer per text graph."""
    from fd.runtime.families import family_of
    from fd.runtime.control import image_graph_problem, is_image_input_graph
    family = family_of(manifest)
    listed = [name for name in manifest["components"] if not is_image_input_graph(name)]  # optional graphs
    problem = image_graph_problem(manifest)
    if problem:
        raise FdError(f"{path}: {problem}: {REBUILD}")
    if sorted(listed) != sorted(family.graphs):
        raise FdError(f"{path}: components lists {_list(listed)}, a {family.name} folder has {_list(list(family.graphs))}: "
                      f"{REBUILD}")
    if len(manifest["tokenizers"]) != len(family.text_graphs):
        raise FdError(f"{path}: tokenizers lists {len(manifest['tokenizers'])}, a {family.name} folder has "
                      f"{len(family.text_graphs)}: {REBUILD}")
    for index, (tokenizer, graph) in enumerate(zip(manifest["tokenizers"], family.text_graphs)):
        # the tokenizer pads to max_length, and the text graph takes exactly that many token ids
        ids = [t["shape"][1:] for t in manifest["components"][graph]["inputs"] if t["name"] == "input_ids"]
        if ids and ids[0] != [tokenizer["max_length"]]:
            raise FdError(f"{path}: tokenizers[{index}].max_length is {tokenizer['max_length']}, but "
                          f"components.{graph} takes input_ids of shape {ids[0]} per prompt: {REBUILD}")


def check_cache(manifest: dict, path: Path) -> None:
    """The cache is what the UNet encoder returns, in order, and every part of it feeds the decoder."""
    components = manifest["components"]
    outputs = [t["name"] for t in components["denoiser_encoder"]["outputs"]]
    if manifest["cache"] != outputs:
        raise FdError(f"{path}: cache {_list(manifest['cache'])} is not components.denoiser_encoder.outputs "
                      f"{_list(outputs)}: {REBUILD}")
    inputs = {t["name"] for t in components["denoiser_decoder"]["inputs"]}
    missing = [name for name in outputs if name not in inputs]
    if missing:
        raise FdError(f"{path}: cache {_list(missing)} is not among components.denoiser_decoder.inputs: {REBUILD}")


def check_batch_ranges(manifest: dict, path: Path) -> None:
    """The limits a generation is checked against must fit inside every graph's batch range."""
    limits = manifest["limits"]
    for name, spec in manifest["components"].items():
        need, have = batch_range(name, Limits(limits["max_batch_size"], limits["max_window"])), spec["batch"]
        if not have["min"] <= need["min"] <= need["max"] <= have["max"]:
            raise FdError(f"{path}: limits.max_batch_size {limits['max_batch_size']} and limits.max_window "
                          f"{limits['max_window']} need components.{name}.batch from {need['min']} to {need['max']}, "
                          f"the graph was built for {have['min']} to {have['max']}: {REBUILD}")


def _list(names: list) -> str:
    shown = ", ".join(map(str, names[:4])) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
    return f"[{shown}]"


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))
