"""PixArt-α, as diffusers' PixArtAlphaPipeline conditions its transformer:

- prompts are lower-cased and stripped (the pipeline's preprocessing with clean_caption=False; fd does not
  do its optional caption cleaning), then T5-tokenized to 120 tokens with their attention mask;
- guided rows are [negative…, positive…], the negative prompt "" when none is given;
- both denoiser halves read the T5 embeddings and the mask, and models with additional conditions (the
  1024 ones) also `resolution` (height, width) and `aspect_ratio` (height / width) of the image.
"""
from __future__ import annotations

import numpy as np

from fd.runtime.families.base import Family, PromptRequest


class PixArtAlpha(Family):
    name = "pixart"
    text_graphs = ("text_encoder",)
    conditions = ("encoder_hidden_states", "encoder_attention_mask", "resolution", "aspect_ratio")  # last two: 1024
    default_guidance_scale = 4.5  # PixArtAlphaPipeline's default
    # PixArt-α is a DiT trained on DiT's linear betas: the DiT setting of the paper's reference code
    noise_injection_tau = 300

    def prompt_texts(self, texts: list[str]) -> list[str]:
        return [text.lower().strip() for text in texts]  # the pipeline's preprocessing with clean_caption=False

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        (tokenizer,) = tokenizers
        negative = "" if request.negative_prompt is None else request.negative_prompt  # the pipeline's default
        texts = self.prompt_texts(self.rows(request, negative))
        ids, mask = tokenizer.with_mask(texts)
        mask = runner.upload_input("text_encoder", "attention_mask", mask)  # the same mask feeds every graph
        conditions = {"encoder_hidden_states": runner.run("text_encoder", {"input_ids": ids, "attention_mask": mask})
                      ["text_embeddings"], "encoder_attention_mask": mask}
        inputs = {t["name"] for t in runner.specs["denoiser_encoder"]["inputs"]}
        if "resolution" in inputs:  # the model's additional conditions, as the pipeline computes them
            rows = len(texts)
            sizes = {"resolution": np.tile(np.float32([request.height, request.width]), (rows, 1)),
                     "aspect_ratio": np.full((rows, 1), request.height / request.width, np.float32)}
            conditions.update({name: runner.upload_input("denoiser_encoder", name, value)
                               for name, value in sizes.items()})
        return conditions
