"""Model → diffusers components: resolve an alias, hub id, local folder or generated name, find its family
(builder/families/), and load what fd exports on the CPU.

Only what fd exports is loaded (tokenizers, text encoders, UNet, VAE, scheduler config); the safety
checker and feature extractor of a full pipeline folder are never touched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fd.builder.families import FAMILIES, family_for_folder, family_generating
from fd.builder.loading import TINY_SEED, quiet_libraries
from fd.runtime.errors import FdError

def load_components(model: str, config: str | None = None, allow_pickle: bool = False):
    """Resolve MODEL (alias, hub id, local folder, generated name or single-file checkpoint) and load its
    components on the CPU. `config`: the config folder of a single-file checkpoint (builder/single_file.py)."""
    from fd.builder.single_file import is_single_file, load_single_file  # it loads through load_folder below
    generator = family_generating(model)
    aliases = {alias: hub_id for family in FAMILIES.values() for alias, hub_id in family.aliases.items()}
    if config is not None and not is_single_file(model):
        raise FdError(f"--config is for single-file checkpoints (--model FILE.safetensors); {model} is not one: "
                      "drop --config")
    if is_single_file(model):
        comps = load_single_file(model, config, allow_pickle)
    elif generator is not None:
        comps = generator()
        comps.source = {"model": model, "kind": "generated", "seed": TINY_SEED,
                        "note": "random weights from a config in fd's code; its images are noise",
                        **comps.source}  # a trained generated model (digits) names its own folder and note
    elif model in composite_aliases():  # several hub models combined (animatediff: SD1.5 + a motion adapter)
        family, repo_ids = composite_aliases()[model]
        folders = [_hub_snapshot(repo_id, model) for repo_id in repo_ids]
        quiet_libraries()
        comps = family.load_alias(*folders)
        comps.source = {"model": model, "kind": "hub", "repo_ids": list(repo_ids),
                        "revisions": [Path(folder).name for folder in folders], "paths": folders}
    elif Path(model).expanduser().exists() or looks_like_path(model):
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise FdError(f"--model {model}: {'it is a file, not a folder' if path.exists() else 'no such folder'} "
                          f"({path}): give a local diffusers pipeline folder, a single-file .safetensors "
                          "checkpoint, a hub id such as org/name, "
                          f"or a model name ({', '.join(known_names())})")
        comps = load_folder(str(path), what=f"local folder {path}")
        comps.source = {"model": model, "kind": "local", "path": str(path)}
    else:
        repo_id = aliases.get(model, model)
        if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
            raise FdError(f"unknown model '{model}': use a model name ({', '.join(known_names())}), "
                          "a hub id such as org/name, or a local diffusers pipeline folder")
        folder = _hub_snapshot(repo_id, model)
        comps = load_folder(folder, what=f"hub model {repo_id}")
        comps.source = {"model": model, "kind": "hub", "repo_id": repo_id,
                        "revision": Path(folder).name, "path": folder}
    comps.source["weights_sha256"] = weights_fingerprint(comps)
    return comps


def known_names() -> list[str]:
    return [name for family in FAMILIES.values() for name in [*family.aliases, *family.generated]] + \
        list(composite_aliases())


def composite_aliases() -> dict:
    """alias → (family, hub ids): models made of several hub models (the family's load_alias combines them)."""
    return {alias: (family, repo_ids) for family in FAMILIES.values()
            for alias, repo_ids in getattr(family, "composite_aliases", {}).items()}


def load_folder(folder: str, what: str):
    """A diffusers pipeline folder, loaded by the family its model_index.json names."""
    family = family_for_folder(Path(folder), what)
    quiet_libraries()
    for sub in family.subfolders:
        if not (Path(folder) / sub).is_dir():
            raise FdError(f"{what} has no '{sub}' folder: pass a complete diffusers {family.pipeline_classes[0]} "
                          f"folder (with {'/, '.join(family.subfolders)}/)")
    scheduler_config = _read_scheduler_config(Path(folder), what)  # before the slow weight loading
    comps = family.load_folder(folder, what)
    comps.scheduler_config, comps.family = scheduler_config, family.name
    return comps


def looks_like_path(model: str) -> bool:
    """A local path rather than a hub id: it starts like a path (./ ../ / ~), has more than one slash
    (hub ids are org/name), or its first part is a folder here. A bare org/name stays a hub id."""
    return (model.startswith((".", "/", "~")) or model.count("/") > 1
            or ("/" in model and Path(model.split("/")[0]).is_dir()))


def _hub_snapshot(repo_id: str, model: str) -> str:
    """The cached snapshot folder of a hub model; fd never downloads (builds run offline)."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, local_files_only=True,
                                 allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except Exception:
        raise FdError(f"model '{model}' ({repo_id}) is not in the local Hugging Face cache and fd does not "
                      "download: fetch it on a connected machine (`hf download " + repo_id + "`) and copy "
                      "the cache here, or pass a local diffusers pipeline folder") from None


def _read_scheduler_config(folder: Path, what: str) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FdError(f"{what} has no scheduler/scheduler_config.json: copy the complete model folder, "
                      "scheduler config included")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FdError(f"{path} is not readable JSON ({exc}): copy it again from the model's source") from None
    if not isinstance(config, dict):
        raise FdError(f"{path} is not a scheduler config (a JSON object): copy it again from the model's source")
    return config


def weights_fingerprint(comps) -> str:
    """sha256 over every exported module's parameters, so a manifest pins the exact weights."""
    digest = hashlib.sha256()
    for name, module in comps.torch_modules().items():
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


