"""DeepFloyd IF, as diffusers' IFPipeline (stage I) and IFSuperResolutionPipeline (stage II) condition their UNets.

- Pixel space: no VAE; the sample is the image in [-1, 1] (3 channels), the final sample is the image.
- Prompts are lower-cased and stripped: IFPipeline's text preprocessing. Its default, clean_caption=True, needs
  the bs4 and ftfy packages; without them (as in fd's environment) diffusers itself falls back to exactly this.
  Then T5-tokenized to 77 tokens with their attention mask (T5 reads the mask; the UNet gets none, as in
  IFPipeline); guided rows are [negative…, positive…], the negative prompt "" when none is given.
- The prompt-only terms of IF's UNet (the projected text and the pooled-text embedding; stage II's noise-level
  embedding) come from the `denoiser_conditions` graph once per generation; both denoiser halves read them.
- The decoder returns noise and learned variance (6 channels). Guidance combines the noise channels; the variance
  is the conditional rows', as IFPipeline takes it. Only a scheduler that steps with it (IF's DDPM,
  variance_type learned_range) gets it; DDIM and DPM++ get the noise alone, as diffusers' DDIM with
  variance_type fixed_small and DPM++ (which slices the first 3 channels) do.
"""
from __future__ import annotations

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.families.base import Family, PromptRequest

IMAGE_CHANNELS = 3


# The schedulers that apply IF's dynamic thresholding (its config needs it) and are checked against diffusers here
THRESHOLDING_SCHEDULERS = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-karras")


def _uses_variance(sampler) -> bool:
    return getattr(sampler, "needs_predicted_variance", False)


class DeepFloydIF(Family):
    name = "if"
    text_graphs = ("text_encoder",)
    conditions = ("encoder_hidden_states", "added_embedding")
    default_guidance_scale = 7.0  # IFPipeline's default
    # fd's choice: SD's tau, the paper's setting for its UNet models (IF trains on 1000 cosine-schedule steps)
    noise_injection_tau = 500
    pixel_space = True
    returns_variance = True

    @property
    def graphs(self) -> tuple[str, ...]:
        return (*self.text_graphs, "denoiser_conditions", "denoiser_encoder", "denoiser_decoder")

    def prompt_texts(self, texts: list[str]) -> list[str]:
        return [text.lower().strip() for text in texts]

    def text_embeddings(self, runner, tokenizers, request: PromptRequest):
        """T5's states for the prompt rows (runner-native), as IFPipeline.encode_prompt computes them."""
        (tokenizer,) = tokenizers
        negative = "" if request.negative_prompt is None else request.negative_prompt
        ids, mask = tokenizer.with_mask(self.prompt_texts(self.rows(request, negative)))
        return runner.run("text_encoder", {"input_ids": ids, "attention_mask": mask})["text_embeddings"]

    def prompt_terms(self, runner, text_embeddings, noise_level: float | None = None) -> dict:
        feeds = {"text_embeddings": text_embeddings}
        if noise_level is not None:
            feeds["noise_level"] = np.full(runner.rows_of(text_embeddings), noise_level, np.float32)
        outputs = runner.run("denoiser_conditions", feeds)
        return {name: outputs[name] for name in self.conditions}

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        return self.prompt_terms(runner, self.text_embeddings(runner, tokenizers, request))

    def check_scheduler(self, sampler) -> None:
        if sampler.name not in THRESHOLDING_SCHEDULERS:
            raise FdError(f"--scheduler {sampler.name} has no dynamic thresholding, which DeepFloyd IF's sampling needs: "
                          f"choose {', '.join(THRESHOLDING_SCHEDULERS)} (or model: IF's DDPM)")

    def guide(self, prediction: np.ndarray, images: int, guidance_scale: float | None, sampler) -> np.ndarray:
        noise, variance = prediction[:, :IMAGE_CHANNELS], prediction[:, IMAGE_CHANNELS:]
        if guidance_scale is not None:
            noise, variance = super().guide(noise, images, guidance_scale, sampler), variance[images:]
        return np.concatenate([noise, variance], axis=1) if _uses_variance(sampler) else noise


class DeepFloydIFSuperResolution(DeepFloydIF):
    """Stage II: no text graph (it reads stage I's T5 embeddings: runtime/if_cascade.py)."""

    name = "if-sr"
    text_graphs = ()
    default_guidance_scale = 4.0  # IFSuperResolutionPipeline's default
    # the noise level IFSuperResolutionPipeline noises the upscaled stage-I image to by default
    default_noise_level = 250

    def check_image_condition(self, condition, images, guided, height, width, specs) -> None:
        if condition is None:
            raise FdError("this engine folder is a DeepFloyd IF stage-II (super-resolution) model: it upscales a "
                          "stage-I image; run fd-run --engine-dir STAGE1 --super-resolution THIS_FOLDER")
        text = next(t for t in specs["denoiser_conditions"]["inputs"] if t["name"] == "text_embeddings")
        condition.check(images, guided, height, width, text)

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        """Stage I's T5 embeddings and the noise level through this UNet's prompt terms, and the noised upscaled
        stage-I image the encoder reads beside the sample (the same image for both guidance halves)."""
        from fd.runtime.if_cascade import noised_upscale
        condition = request.image_condition
        text = runner.upload_input("denoiser_conditions", "text_embeddings", condition.text_embeddings)
        terms = self.prompt_terms(runner, text, float(condition.noise_level))
        image = noised_upscale(condition, request.height, request.width, options["image_noising_scheduler"])
        rows = np.concatenate([image, image]) if request.guided else image
        terms["upscaled"] = runner.upload_input("denoiser_encoder", "upscaled", rows)
        return terms
