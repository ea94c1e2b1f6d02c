"""Stable Diffusion XL, as diffusers' StableDiffusionXLPipeline conditions its UNet:

- two CLIP text encoders, each with its own tokenizer (and pad token); the UNet reads their penultimate
  hidden states side by side, and the pooled projection of the second as `text_embeds`;
- no negative prompt and `force_zeros_for_empty_prompt`: the unconditional rows are zeros, not "";
- size conditioning `time_ids` = original size + crop top-left + target size, the same on every row.
"""
from __future__ import annotations

import numpy as np

from fd.runtime.families.base import Family, PromptRequest


class StableDiffusionXL(Family):
    name = "sdxl"
    text_graphs = ("text_encoder", "text_encoder_2")
    conditions = ("encoder_hidden_states", "text_embeds", "time_ids")
    default_guidance_scale = 7.5  # StableDiffusionXLPipeline's (default 5.0), kept at fd's 7.5 as before
    noise_injection_tau = 500

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        zero_negative = request.negative_prompt is None and options.get("force_zeros_for_empty_prompt", True)
        texts = (list(request.prompts) if zero_negative or not request.guided
                 else self.rows(request, request.negative_prompt))
        hidden, pooled = self._embed(runner, tokenizers, texts)
        if zero_negative and request.guided:
            hidden = runner.concat([runner.zeros_like(hidden), hidden], key="prompt.encoder_hidden_states")
            pooled = runner.concat([runner.zeros_like(pooled), pooled], key="prompt.text_embeds")
        time_ids = np.array([*(request.original_size or (request.height, request.width)),
                             *request.crops_coords_top_left, request.height, request.width], np.float32)
        rows = 2 * len(request.prompts) if request.guided else len(request.prompts)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": runner.upload_input("denoiser_encoder", "time_ids", np.tile(time_ids, (rows, 1)))}

    @staticmethod
    def _embed(runner, tokenizers, texts: list[str]):
        tokenizer, tokenizer_2 = tokenizers
        first = runner.run("text_encoder", {"input_ids": tokenizer(texts)})
        second = runner.run("text_encoder_2", {"input_ids": tokenizer_2(texts)})
        hidden = runner.concat([first["hidden_states"], second["hidden_states"]], axis=-1, key="prompt.joined_states")
        return hidden, second["text_embeds"]
