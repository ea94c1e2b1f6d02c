"""FLUX.1 (dev, schnell), as diffusers' FluxPipeline conditions its transformer:

- CLIP-L's pooled output is `pooled_projections`; T5's states (512 tokens, no mask) are `encoder_hidden_states`;
- no classifier-free guidance: FLUX.1-dev embeds the guidance scale (`guidance`, one per row, default 3.5),
  FLUX.1-schnell ignores it; a negative prompt is refused (FluxPipeline's "true CFG" is not offered);
- the sampler's schedule is the pipeline's: sigmas linspace(1, 1/n, n), shifted by mu from the image's token
  count (the packed 2x2 patches) when the scheduler config shifts dynamically (dev);
- latents are (C, h, w) like every family's: the denoiser graphs pack and unpack FLUX's 2x2 patches.
"""
from __future__ import annotations

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.families.base import PromptRequest
from fd.runtime.families.flow import FlowFamily


class Flux(FlowFamily):
    name = "flux"
    text_graphs = ("text_encoder", "text_encoder_2")
    conditions = ("guidance", "encoder_hidden_states", "pooled_projections")  # guidance: dev only
    default_guidance_scale = 3.5  # FluxPipeline's default (embedded guidance)

    def classifier_free_guidance(self, guidance_scale: float) -> bool:
        return False

    def timestep_options(self, manifest: dict, steps: int, height: int, width: int) -> dict:
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), **super().timestep_options(manifest, steps, height,
                                                                                           width)}

    def check_prompts(self, tokenizers, prompts, negative_prompt, options: dict) -> None:
        if negative_prompt is not None:
            raise FdError("FLUX.1 takes no negative prompt in fd (it uses embedded guidance, not classifier-free "
                          "guidance): drop the negative prompt")
        super().check_prompts(tokenizers, prompts, negative_prompt, options)

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        self.check_prompts(tokenizers, request.prompts, request.negative_prompt, options)
        clip, t5 = tokenizers
        texts = list(request.prompts)
        conditions = {"pooled_projections": runner.run("text_encoder", {"input_ids": clip(texts)})["pooled"],
                      "encoder_hidden_states": runner.run("text_encoder_2", {"input_ids": t5(texts)})[
                          "text_embeddings"]}
        if "guidance" in {t["name"] for t in runner.specs["denoiser_encoder"]["inputs"]}:  # dev; schnell has none
            scale = self.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
            conditions["guidance"] = runner.upload_input("denoiser_encoder", "guidance",
                                                         np.full(len(texts), scale, np.float32))
        return conditions
