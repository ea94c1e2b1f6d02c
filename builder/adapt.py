"""The adapt step of fd-build's chain (load → adapt → split → export → engines): personalize the loaded
components before anything is split or exported, the same way for every family.

- LoRA (`--lora FILE[:SCALE]`, builder/lora.py): low-rank deltas fused into the UNet's and text encoders' weights;
- textual inversion (`--textual-inversion FILE[:TOKEN]`, builder/textual_inversion.py): new tokens in the
  tokenizer and new rows in the text encoder's embedding table, and the prompt expansion the runtime repeats;
- Custom Diffusion (`--custom-diffusion FILE`, builder/custom_diffusion.py): attention projections replaced.

Every option is parsed and every file checked (exists, readable) before the model loads; what needs the model
(key names, shapes, the vocabulary) is checked while adapting, inside the build's staging folder, so a refusal
leaves nothing written. The manifest records each adaptation: file, sha256, scale or tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fd.builder.loading import first_line
from fd.runtime.errors import FdError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class EmbeddingSpec:
    path: Path
    token: str | None = None  # None: the token the file names


@dataclass(frozen=True)
class Adaptations:
    """What fd-build's personalization flags ask for, as given on the command line."""

    loras: tuple[str, ...] = ()  # --lora FILE[:SCALE], fused in order
    textual_inversions: tuple[str, ...] = ()  # --textual-inversion FILE[:TOKEN]
    custom_diffusion: tuple[str, ...] = ()  # --custom-diffusion FILE (its modifier token: --textual-inversion)
    allow_pickle: bool = False  # --allow-pickle: also read .pt/.bin/.ckpt files (torch pickles)

    def lora_specs(self) -> list[LoraSpec]:
        return [parse_lora(text, self.allow_pickle) for text in self.loras]

    def embedding_specs(self) -> list[EmbeddingSpec]:
        specs = [parse_embedding(text, self.allow_pickle) for text in self.textual_inversions]
        tokens = [s.token for s in specs if s.token is not None]
        if len(set(tokens)) < len(tokens):
            raise FdError(f"--textual-inversion names a token twice ({', '.join(tokens)}): give each its own :TOKEN")
        return specs

    def custom_diffusion_paths(self) -> list[Path]:
        return [check_file(text, "--custom-diffusion", self.allow_pickle) for text in self.custom_diffusion]

    def check(self) -> None:
        """Every check that needs no model (run before the build loads anything)."""
        self.lora_specs()
        self.embedding_specs()
        self.custom_diffusion_paths()

    def __bool__(self) -> bool:
        return bool(self.loras or self.textual_inversions or self.custom_diffusion)


@dataclass
class Adapted:
    """What adapting did, for the manifest: one record per file, and each tokenizer's prompt expansions."""

    records: list[dict] = field(default_factory=list)
    expansions: list[dict] = field(default_factory=list)  # per tokenizer: {token: "token token_1 …"}

    def annotate(self, manifest: dict) -> None:
        if self.records:
            manifest["adaptations"] = self.records
        for record, expansions in zip(manifest["tokenizers"], self.expansions):
            if expansions:
                record["expansions"] = expansions


def adapt(comps, adaptations: Adaptations | None, log=print) -> Adapted:
    """Apply every adaptation to `comps` in place (LoRAs first, then embeddings); returns what to record."""
    adapted = Adapted(expansions=[{} for _ in comps.tokenizers])
    if not adaptations:
        return adapted
    from fd.builder.custom_diffusion import bake_custom_diffusion
    from fd.builder.lora import fuse_lora
    from fd.builder.textual_inversion import add_embedding
    for path in adaptations.custom_diffusion_paths():  # replaced projections first: a LoRA may then add to them
        layers = bake_custom_diffusion(comps, path, adaptations.allow_pickle)
        adapted.records.append({"kind": "custom_diffusion", "file": str(path), "sha256": file_sha256(path),
                                "attention_layers": layers})
        log(f"baked Custom Diffusion {path.name} into {layers} attention layers")
    for spec in adaptations.lora_specs():
        modules = fuse_lora(comps, spec.path, spec.scale, adaptations.allow_pickle)
        adapted.records.append({"kind": "lora", "file": str(spec.path), "sha256": file_sha256(spec.path),
                                "scale": spec.scale, "modules": modules})
        log(f"fused LoRA {spec.path.name} (scale {spec.scale}) into {modules} layers")
    for spec in adaptations.embedding_specs():
        token, tokens, encoder_index = add_embedding(comps, spec.path, spec.token, adaptations.allow_pickle)
        if len(tokens) > 1:
            adapted.expansions[encoder_index][token] = " ".join(tokens)
        adapted.records.append({"kind": "textual_inversion", "file": str(spec.path), "sha256": file_sha256(spec.path),
                                "token": token, "vectors": len(tokens)})
        log(f"added token {token} ({len(tokens)} vector{'s' * (len(tokens) > 1)}) from {spec.path.name}")
    return adapted


def parse_lora(text: str, allow_pickle: bool) -> LoraSpec:
    """FILE[:SCALE]: the part after the last colon is the scale when it is a number (fd.runtime.lora's reading,
    which fd-run and fd-serve requests share)."""
    from fd.runtime.lora import split_lora_text
    path, scale = split_lora_text(text)
    return LoraSpec(check_file(path, "--lora", allow_pickle), scale)


def parse_embedding(text: str, allow_pickle: bool) -> EmbeddingSpec:
    """FILE[:TOKEN]: the part after the last colon is the token when FILE without it is an existing file."""
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).expanduser().is_file() and not Path(text).expanduser().is_file():
        if not tail.strip() or tail != tail.strip() or " " in tail:
            raise FdError(f"--textual-inversion {text}: the token {tail!r} must be one word without spaces, "
                          "e.g. <my-style>")
        return EmbeddingSpec(check_file(head, "--textual-inversion", allow_pickle), tail)
    return EmbeddingSpec(check_file(text, "--textual-inversion", allow_pickle))


def check_file(text: str, flag: str, allow_pickle: bool) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise FdError(f"{flag} {text}: no such file: give the path of a .safetensors file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise FdError(f"{flag} {text}: a {suffix} file is a Python pickle, which can run code when loaded: convert "
                      "it to .safetensors, or pass --allow-pickle if you trust its source")
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise FdError(f"{flag} {text}: fd reads .safetensors files (and {', '.join(PICKLE_SUFFIXES)} with "
                      "--allow-pickle)")
    return path.resolve()


def read_tensors(path: Path, allow_pickle: bool, flag: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a weight file; a pickle only with --allow-pickle, and then through
    torch's weights-only unpickler (tensors, dicts, numbers and strings; no code objects)."""
    import torch
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise FdError(f"{flag} {path}: not a readable .safetensors file ({first_line(exc)}): copy it again") \
                from None
    if not allow_pickle:  # check_file refused it already; kept so no path reaches torch.load unasked
        raise FdError(f"{flag} {path}: a pickle file needs --allow-pickle")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many kinds for a damaged or unsafe file
        raise FdError(f"{flag} {path}: cannot read it as a weights-only torch file ({first_line(exc)})") from None
    if isinstance(loaded, torch.Tensor):
        return {"": loaded}, {}
    if not isinstance(loaded, dict):
        raise FdError(f"{flag} {path}: holds a {type(loaded).__name__}, not a dictionary of tensors")
    return loaded, {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
