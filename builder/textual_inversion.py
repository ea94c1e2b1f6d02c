"""Textual-inversion embeddings → new tokens in the tokenizer and new rows of the text encoder's embedding table
(fd-build --textual-inversion FILE[:TOKEN]), as diffusers' `load_textual_inversion` adds them.

File formats, as diffusers reads them: diffusers' own ({token: vectors}, one key), A1111's pickle
({"string_to_param": {"*": vectors}, "name": token}) and A1111's safetensors ({"emb_params": vectors}, no token
inside: give :TOKEN, else the file's name is used), and SDXL's ({"clip_l": …, "clip_g": …}: one table per encoder).
A file with n vectors adds the tokens `T, T_1, …, T_{n-1}`; a prompt's T then stands for all of them
(diffusers' maybe_convert_prompt), which the runtime repeats from the manifest's tokenizer `expansions`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fd.builder.adapt import read_tensors
from fd.runtime.errors import FdError

SDXL_KEYS = ("clip_l", "clip_g")  # SDXL embeddings: the first (CLIP ViT-L) and second (OpenCLIP bigG) encoder's


def add_embedding(comps, path: Path, token: str | None, allow_pickle: bool = False) -> tuple[str, list[str], int]:
    """Add the file's vectors to every text encoder they are for; returns (token, the tokens added, the index of
    the tokenizer whose prompts expand it; SDXL files add the same tokens to both)."""
    if comps.text_encoder is None or comps.family not in ("sd", "sdxl"):
        raise FdError(f"--textual-inversion {path.name}: embeddings are supported for the CLIP-prompted families "
                      f"(sd, sdxl), not {comps.family}: drop --textual-inversion")
    token, tables = read_embedding(path, token, allow_pickle, len(comps.text_encoders))
    added = []
    for index, vectors in tables.items():
        added = _add(comps.tokenizers[index], comps.text_encoders[index], token, vectors, path)
    return token, added, min(tables)


def read_embedding(path: Path, token: str | None, allow_pickle: bool, encoders: int) -> tuple[str, dict]:
    """(token, {text encoder index: vectors n x width})."""
    tensors, _ = read_tensors(path, allow_pickle, "--textual-inversion")
    if "string_to_param" in tensors:  # A1111 .pt
        param = tensors["string_to_param"]
        if not isinstance(param, dict) or not isinstance(param.get("*"), torch.Tensor):
            raise FdError(f"--textual-inversion {path.name}: its string_to_param has no '*' tensor: not an embedding")
        name = tensors.get("name")
        token, tables = token or (name if isinstance(name, str) else None), {0: param["*"]}
    elif set(tensors) == set(SDXL_KEYS):
        if encoders != 2:
            raise FdError(f"--textual-inversion {path.name}: an SDXL embedding (clip_l and clip_g), this model has "
                          "one text encoder: use an embedding made for it")
        tables = {0: tensors["clip_l"], 1: tensors["clip_g"]}
    elif len(tensors) == 1:
        key, vectors = next(iter(tensors.items()))
        if key in ("emb_params", ""):  # A1111 safetensors, or a bare tensor: no token inside
            token = token or f"<{path.stem}>"
        token, tables = token or key, {0: vectors}
    else:
        names = ", ".join(list(tensors)[:4])
        raise FdError(f"--textual-inversion {path.name}: holds {len(tensors)} tensors ({names}); "
                      "an embedding file holds one (diffusers), string_to_param (A1111) or clip_l and clip_g (SDXL)")
    if not token:
        raise FdError(f"--textual-inversion {path.name}: the file names no token: give one, FILE:<token>")
    for index, vectors in tables.items():
        if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
            raise FdError(f"--textual-inversion {path.name}: its vectors are not a float tensor of n x width")
        tables[index] = vectors.reshape(-1, vectors.shape[-1]).float()
    return token, tables


def _add(tokenizer, text_encoder, token: str, vectors: torch.Tensor, path: Path) -> list[str]:
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise FdError(f"--textual-inversion {path.name}: its vectors are {vectors.shape[1]} wide, this text encoder's "
                      f"embeddings {width}: use an embedding made for this model")
    tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    vocabulary = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocabulary]
    if taken:
        raise FdError(f"--textual-inversion {path.name}: the token {taken[0]} is already in the vocabulary: choose "
                      f"another, FILE:<{token.strip('<>')}-2>")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if any(len(tokenizer.tokenize(t)) != 1 for t in tokens):
        raise FdError(f"--textual-inversion {path.name}: the tokenizer does not keep {token} as one token (is it "
                      "lower case? CLIP lower-cases prompts): choose a lower-case token")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set below
    with torch.no_grad():
        table = text_encoder.get_input_embeddings().weight
        table[ids] = vectors.to(table.dtype)
    return tokens
