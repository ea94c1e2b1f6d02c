"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden state conditions the UNet."""
from __future__ import annotations

from fd.runtime.families.base import Family, PromptRequest


class StableDiffusion(Family):
    name = "sd"
    text_graphs = ("text_encoder",)
    conditions = ("encoder_hidden_states",)
    default_guidance_scale = 7.5  # StableDiffusionPipeline's
    noise_injection_tau = 500  # the paper's for SD

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        (tokenizer,) = tokenizers
        negative = "" if request.negative_prompt is None else request.negative_prompt  # none: "", as diffusers
        ids = tokenizer(self.rows(request, negative))
        return {"encoder_hidden_states": runner.run("text_encoder", {"input_ids": ids})["text_embeddings"]}
