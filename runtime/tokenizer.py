"""Prompt → token ids (and attention mask) with the model's own tokenizer: CLIP, or T5 for PixArt (the `tokenizers`
library, no transformers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fd.runtime.errors import FdError


class PromptTokenizer:
    """Pads every prompt to the text encoder's fixed length, as diffusers' pipelines do."""

    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_token_id: int,
                 expansions: dict[str, str] | None = None):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for bad files
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FdError(f"cannot read the tokenizer {tokenizer_json}: {reason}: "
                          "rebuild the engine folder with fd-build --force") from None
        vocabulary = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= pad_token_id < vocabulary:  # the text encoder's embedding would index out of its table
            raise FdError(f"the manifest's pad_token_id {pad_token_id} is not in the tokenizer {tokenizer_json}'s "
                          f"vocabulary of {vocabulary} tokens: rebuild the engine folder with fd-build --force")
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        # textual inversion's multi-vector tokens: "<t>" → "<t> <t>_1 …" (fd-build --textual-inversion)
        self.expansions = dict(expansions or {})

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.with_mask(prompts)[0]

    def with_mask(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask): the mask is 1 on each prompt's own tokens and 0 on the padding, as the
        transformers tokenizer's attention_mask (T5 and PixArt read it; CLIP models do not)."""
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(prompts), self.max_length), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            # with the model's special tokens (CLIP: start and end)
            tokens = self.tokenizer.encode(expand_tokens(prompt, self.expansions)).ids
            if len(tokens) > self.max_length:
                # diffusers silently truncates; fd refuses rather than drop words the user wrote.
                raise FdError(f"prompt {prompt[:40]!r}… is {len(tokens)} tokens long; the text encoder takes at most "
                              f"{self.max_length} (special tokens included): shorten it")
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask


def expand_tokens(prompt: str, expansions: dict[str, str]) -> str:
    """Each multi-vector textual-inversion token as all its tokens, as diffusers' maybe_convert_prompt writes it."""
    for token, replacement in expansions.items():
        prompt = prompt.replace(token, replacement)
    return prompt
