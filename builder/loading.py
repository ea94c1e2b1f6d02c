"""What the model families load with: weights from a diffusers folder with one-line errors, and the pieces of
fd's generated models (their seed, a CLIP tokenizer written locally). The families use these; builder/models.py
resolves a --model to a family and uses the families, so neither imports the other in a circle."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

from fd.runtime.errors import FdError

TINY_SEED = 0  # every generated model's weights come from this seed


def load_weights(folder: str, what: str, classes: dict) -> dict:
    """{subfolder: loaded object} for each (subfolder → transformers/diffusers class), with one FdError line
    for missing, damaged or truncated weights. Tokenizers are in `classes` too (they have no weights)."""
    for sub, cls in classes.items():
        if "Tokenizer" in cls.__name__:
            continue
        if not any(next((Path(folder) / sub).glob(pattern), None) for pattern in ("*.safetensors", "*.bin")):
            raise FdError(f"{what} has no weights in {sub}/ (no .safetensors or .bin file): "
                          "copy the complete model folder, weights included")
        check_safetensors(Path(folder) / sub)
    try:
        loaded = {sub: cls.from_pretrained(folder, subfolder=sub, local_files_only=True,
                                           **({"variant": "fp16"} if _only_fp16_variant(Path(folder) / sub) else {}))
                  for sub, cls in classes.items()}
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # RuntimeError / UnpicklingError / EOFError: a damaged .bin (torch pickle) file
        raise FdError(f"cannot load the weights of {what}: {first_line(exc)} "
                      "(is the folder complete, with its .safetensors files?)") from None
    return {sub: obj.eval() if hasattr(obj, "eval") else obj for sub, obj in loaded.items()}


def _only_fp16_variant(sub: Path) -> bool:
    """A folder with only *.fp16.* weight files (a common download) loads with variant="fp16"."""
    files = [p.name for pattern in ("*.safetensors", "*.bin") for p in sub.glob(pattern)]
    return bool(files) and all(".fp16." in name for name in files)


def check_safetensors(folder: Path) -> None:
    """Open every .safetensors header, so a truncated or damaged file is named (the loaders only say "header")."""
    from safetensors import SafetensorError, safe_open
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise FdError(f"{path} is damaged or incomplete ({first_line(exc)}): copy the file again "
                          "from the model's source") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter off stderr, where fd promises one line per error."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)  # failures come back as FdError
    transformers.utils.logging.set_verbosity(transformers.utils.logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()


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
