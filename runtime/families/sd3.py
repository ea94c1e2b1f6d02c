"""Stable Diffusion 3 / 3.5, as diffusers' StableDiffusion3Pipeline conditions its transformer:

- three text encoders, each with its own tokenizer: CLIP-L and CLIP-G (77 tokens; their penultimate hidden
  states side by side, zero-padded to T5's width inside the CLIP-G graph) and T5 (256 tokens, no mask), whose
  states follow the CLIP ones on the sequence axis: `encoder_hidden_states` (77 + 256 tokens);
- `pooled_projections`: the two CLIP pooled projections side by side;
- guided rows are [negative…, positive…], the negative prompt "" when none is given (the pipeline's default);
- the decoder reads only `pooled_projections` (the text tokens are in the cache, as `context`).
"""
from __future__ import annotations

from fd.runtime.families.base import PromptRequest
from fd.runtime.families.flow import FlowFamily


class StableDiffusion3(FlowFamily):
    name = "sd3"
    text_graphs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    conditions = ("encoder_hidden_states", "pooled_projections")
    default_guidance_scale = 7.0  # StableDiffusion3Pipeline's default

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        clip_l, clip_g, t5 = tokenizers
        texts = self.rows(request, "" if request.negative_prompt is None else request.negative_prompt)
        first = runner.run("text_encoder", {"input_ids": clip_l(texts)})
        second = runner.run("text_encoder_2", {"input_ids": clip_g(texts)})
        third = runner.run("text_encoder_3", {"input_ids": t5(texts)})
        clip = runner.concat([first["hidden_states"], second["hidden_states"]], axis=-1, key="prompt.clip_states")
        return {"encoder_hidden_states": runner.concat([clip, third["text_embeddings"]], axis=1,
                                                       key="prompt.encoder_hidden_states"),
                "pooled_projections": runner.concat([first["text_embeds"], second["text_embeds"]], axis=-1,
                                                    key="prompt.pooled_projections")}
