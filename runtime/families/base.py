"""What a model family tells the runtime: the graphs of its engine folder and how prompts become the denoiser's
conditioning. Tensor names, dtypes and axes are not here: they are in the manifest, written by the build
side of the same family (builder/families/)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fd.runtime.errors import FdError

DENOISER_GRAPHS = ("denoiser_encoder", "denoiser_decoder", "vae_decoder")


@dataclass(frozen=True)
class PromptRequest:
    prompts: list[str]
    negative_prompt: str | list[str] | None  # None: none given (SDXL then conditions on zeros); a list: one per prompt
    guided: bool  # classifier-free guidance: rows are [unconditional…, conditional…]
    height: int
    width: int
    original_size: tuple[int, int] | None = None  # SDXL size conditioning; None: (height, width)
    crops_coords_top_left: tuple[int, int] = (0, 0)
    guidance_scale: float | None = None  # FLUX.1-dev's embedded guidance reads it
    image_condition: object = None  # DeepFloyd IF stage II: the stage-I image it upscales (runtime/if_cascade.py)


class Family:
    name: str
    text_graphs: tuple[str, ...]
    conditions: tuple[str, ...]  # tensors the prompt stage hands to both denoiser halves (besides sample, timestep)
    class_conditional = False  # prompts are class labels (DiT), not text
    default_guidance_scale = 7.5  # when the caller gives none: the family's diffusers pipeline's default
    noise_injection_tau = 500  # prior noise injection's tau in the default policy (the paper's, per family)
    pixel_space = False  # no VAE: the sample is the image (DeepFloyd IF)
    returns_variance = False  # the decoder returns the model's learned variance too (IF), which DDPM can step with

    @property
    def graphs(self) -> tuple[str, ...]:
        return (*self.text_graphs, *DENOISER_GRAPHS)

    def encode_prompt(self, runner, tokenizers: list, request: PromptRequest, options: dict) -> dict:
        """{condition name: runner-native value} with one row per prompt (two per prompt when guided)."""
        raise NotImplementedError

    def check_prompts(self, tokenizers: list, prompts: list, negative_prompt, options: dict) -> None:
        """Refuse, without running a graph, what encode_prompt would refuse (a server checks each request before
        it joins a batch): here an over-long text, as each tokenizer sees it."""
        negatives = [] if negative_prompt is None else [negative_prompt] if isinstance(negative_prompt, str) \
            else list(negative_prompt)
        texts = self.prompt_texts(list(prompts) + negatives)
        for tokenizer in tokenizers:
            tokenizer(texts)

    def check_image_condition(self, condition, images: int, guided: bool, height: int, width: int,
                              specs: dict) -> None:
        """Request.super_resolution against the folder: only DeepFloyd IF stage-II folders take one."""
        if condition is not None:
            raise FdError(f"--super-resolution input is for DeepFloyd IF stage-II folders; this one is a {self.name} "
                          "folder: give it as --super-resolution STAGE2 after an IF stage-I --engine-dir")

    def check_scheduler(self, sampler) -> None:
        """Refuse, in one line, a scheduler that needs what this family's decoder does not return."""
        if getattr(sampler, "needs_predicted_variance", False) and not self.returns_variance:
            raise FdError(f"variance_type 'learned_range' is not supported by fd's {sampler.name} scheduler on a "
                          f"{self.name} folder: it steps with the model's predicted variance, which fd's denoiser "
                          "does not return here: use ddim or dpmpp-2m")

    def guide(self, prediction: np.ndarray, images: int, guidance_scale: float | None, sampler) -> np.ndarray:
        """What the scheduler steps with: guided rows [uncond…, cond…] combined (guidance_scale None: unguided)."""
        if guidance_scale is None:
            return prediction
        uncond, cond = prediction[:images], prediction[images:]
        return uncond + np.float32(guidance_scale) * (cond - uncond)

    # --- the sampler: what a flow-matching family (runtime/families/flow.py) changes -------------------------
    def classifier_free_guidance(self, guidance_scale: float) -> bool:
        """Whether the guidance scale asks for classifier-free guidance (FLUX.1 embeds it instead)."""
        return guidance_scale > 1.0

    def timestep_options(self, manifest: dict, steps: int, height: int, width: int) -> dict:
        """Extra set_timesteps arguments the family's diffusers pipeline passes (FLUX.1: sigmas and mu)."""
        return {}

    def guidance_sigmas(self, sampler, timesteps) -> np.ndarray:
        """Each step's sigma in the variance-preserving frame, which the guidance interval is given in."""
        from fd.runtime.policy import model_sigmas
        return model_sigmas(sampler.alphas_cumprod, timesteps)

    def prompt_texts(self, texts: list[str]) -> list[str]:
        """The texts as the family tokenizes them (PixArt-α lower-cases and strips them)."""
        return texts

    @staticmethod
    def rows(request: PromptRequest, negative: str | list[str]) -> list[str]:
        """The texts of the prompt rows: [negative…, positive…] when guided, as diffusers orders them; `negative`
        is one text for every prompt or a list with one per prompt."""
        negatives = [negative] * len(request.prompts) if isinstance(negative, str) else list(negative)
        return (negatives if request.guided else []) + list(request.prompts)
