"""Prompt → token ids with the model's own CLIP tokenizer (the `tokenizers` library, no transformers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.errors import FdError


class PromptTokenizer:
    """Pads every prompt to the text encoder's fixed length, as diffusers' pipelines do."""

    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_token_id: int):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for bad files
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FdError(f"cannot read the tokenizer {tokenizer_json}: {reason}: "
                          "rebuild the engine folder with fd-build --force") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            tokens = self.tokenizer.encode(prompt).ids  # with start and end tokens
            if len(tokens) > self.max_length:
                # diffusers silently truncates; fd refuses rather than drop words the user wrote.
                raise FdError(f"prompt {prompt[:40]!r}… is {len(tokens)} tokens long; the text encoder takes at most "
                              f"{self.max_length} (start and end included): shorten it")
            ids[row, :len(tokens)] = tokens
        return ids
