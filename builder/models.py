"""Model → diffusers components: resolve an alias, hub id, local folder or generated name, find its family
(builder/families/), and load what fd exports on the CPU.

Only what fd exports is loaded (tokenizers, text encoders, UNet, VAE, scheduler config); the safety
checker and feature extractor of a full pipeline folder are never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

from fd.runtime.errors import FdError

TINY_SEED = 0  # every generated model's weights come from this seed


def load_components(model: str):
    """Resolve MODEL (alias, hub id, local folder or generated name) and load its components on the CPU."""
    from fd.builder.families import FAMILIES, family_generating
    generator = family_generating(model)
    aliases = {alias: hub_id for family in FAMILIES.values() for alias, hub_id in family.aliases.items()}
    if generator is not None:
        comps = generator()
        comps.source = {"model": model, "kind": "generated", "seed": TINY_SEED,
                        "note": "random weights from a config in fd's code; its images are noise",
                        **comps.source}  # a trained generated model (digits) names its own folder and note
    elif Path(model).expanduser().exists() or looks_like_path(model):
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise FdError(f"--model {model}: {'it is a file, not a folder' if path.exists() else 'no such folder'} "
                          f"({path}): give a local diffusers pipeline folder, a hub id such as org/name, "
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
    from fd.builder.families import FAMILIES
    return [name for family in FAMILIES.values() for name in [*family.aliases, *family.generated]]


def load_folder(folder: str, what: str):
    """A diffusers pipeline folder, loaded by the family its model_index.json names."""
    from fd.builder.families import family_for_folder
    family = family_for_folder(Path(folder), what)
    _quiet_libraries()
    for sub in family.subfolders:
        if not (Path(folder) / sub).is_dir():
            raise FdError(f"{what} has no '{sub}' folder: pass a complete diffusers {family.pipeline_classes[0]} "
                          f"folder (with {'/, '.join(family.subfolders)}/)")
    scheduler_config = _read_scheduler_config(Path(folder), what)  # before the slow weight loading
    comps = family.load_folder(folder, what)
    comps.scheduler_config, comps.family = scheduler_config, family.name
    return comps


def load_weights(folder: str, what: str, classes: dict) -> dict:
    """{subfolder: loaded object} for each (subfolder → transformers/diffusers class), with one FdError line
    for missing, damaged or truncated weights. Tokenizers are in `classes` too (they have no weights)."""
    for sub, cls in classes.items():
        if "Tokenizer" in cls.__name__:
            continue
        if not any(next((Path(folder) / sub).glob(pattern), None) for pattern in ("*.safetensors", "*.bin")):
            raise FdError(f"{what} has no weights in {sub}/ (no .safetensors or .bin file): "
                          "copy the complete model folder, weights included")
        _check_safetensors(Path(folder) / sub)
    try:
        loaded = {sub: cls.from_pretrained(folder, subfolder=sub, local_files_only=True,
                                           **({"variant": "fp16"} if _only_fp16_variant(Path(folder) / sub) else {}))
                  for sub, cls in classes.items()}
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # RuntimeError / UnpicklingError / EOFError: a damaged .bin (torch pickle) file
        raise FdError(f"cannot load the weights of {what}: {_first_line(exc)} "
                      "(is the folder complete, with its .safetensors files?)") from None
    return {sub: obj.eval() if hasattr(obj, "eval") else obj for sub, obj in loaded.items()}


def _only_fp16_variant(sub: Path) -> bool:
    """A folder with only *.fp16.* weight files (a common download) loads with variant="fp16"."""
    files = [p.name for pattern in ("*.safetensors", "*.bin") for p in sub.glob(pattern)]
    return bool(files) and all(".fp16." in name for name in files)


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


def _check_safetensors(folder: Path) -> None:
    """Open every .safetensors header, so a truncated or damaged file is named (the loaders only say "header")."""
    from safetensors import SafetensorError, safe_open
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise FdError(f"{path} is damaged or incomplete ({_first_line(exc)}): copy the file again "
                          "from the model's source") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _quiet_libraries() -> None:
    """Keep diffusers/transformers chatter off stderr, where fd promises one line per error."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)  # failures come back as FdError
    transformers.utils.logging.set_verbosity(transformers.utils.logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()


def weights_fingerprint(comps) -> str:
    """sha256 over every exported module's parameters, so a manifest pins the exact weights."""
    digest = hashlib.sha256()
    for name, module in comps.torch_modules().items():
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# --- a CLIP tokenizer written locally, for every generated model ---------------------------------------

_TINY_WORDS = "a photo of an astronaut riding horse on the moon cat dog painting".split()


def make_tiny_tokenizer():
    """A CLIP BPE tokenizer with the full byte alphabet and merges for a few words, written locally."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in _TINY_WORDS:  # merge each word left to right: "c a", "ca t</w>"
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        # transformers 5 needs model_max_length set explicitly for max-length padding to work.
        return CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"),
                             model_max_length=77)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-character map, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
