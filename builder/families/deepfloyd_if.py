"""DeepFloyd IF on the build side: pixel-space cascades of diffusers' IFPipeline (stage I, 64²) and
IFSuperResolutionPipeline (stage II, upscaling stage I's image), their generated toy models, and their graphs:

  text_encoder         (input_ids, attention_mask) → T5's last hidden state (float32 in every precision: T5
                       overflows in fp16); stage I only: a stage-II folder takes stage I's embeddings
  denoiser_conditions  (text_embeddings[, noise_level]) → what the UNet computes from the prompt alone, once
                       per prompt (builder/if_split.py: encoder_hid_proj, the pooled-text term, stage II's
                       noise-level term)
  denoiser_encoder     (sample, timestep, encoder_hidden_states, added_embedding[, upscaled]) → the cache
                       (stage II: the noised upscaled stage-I image beside the sample, as the UNet's 6 channels)
  denoiser_decoder     (timestep, encoder_hidden_states, added_embedding, cache) → all 6 output channels (noise
                       and learned variance: IF's DDPM steps with the variance of the conditional rows)

There is no VAE: the "latents" are the image itself (3 channels, vae scale 1).
"""
from __future__ import annotations

import torch
from torch import nn

from fd.builder.families.base import BuildFamily, Components, DTYPE_NAMES, TORCH_DTYPES, _cache_shapes, _cast
from fd.builder.families.pixart import T5EncoderGraph, _mask, make_tiny_t5_tokenizer
from fd.builder.if_split import IFDecoder, IFEncoder, IFPromptTerms, check_if_unet
from fd.builder.loading import TINY_SEED, load_weights
from fd.builder.specs import Axis, tensor
from fd.builder.split import unet_levels
from fd.runtime.batch import batch_range
from fd.runtime.errors import FdError

MAX_SEQUENCE_LENGTH = 77  # IFPipeline pads and truncates every prompt to 77 T5 tokens
IMAGE_CHANNELS = 3
OUTPUT_SCALE = 0.01  # the generated UNets' output layer, scaled (see tiny_if_unet)

# IF's DDPM settings (cosine betas, the model's learned variance, dynamic thresholding of x0); the generated
# models use them, so every fd scheduler is exercised with thresholding on.
IF_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "learned_range", "prediction_type": "epsilon",
    "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5, "clip_sample": True,
    "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "trained_betas": None,
}
# stage II's second scheduler: how IFSuperResolutionPipeline noises the upscaled image to its noise level
IF_IMAGE_NOISING_CONFIG = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "beta_end": 0.02,
}


def tiny_if_unet(stage_two: bool = False, width: int = 32):
    """IF's UNet at toy width: 3 levels (ResNet, then added-KV cross-attention blocks), scale-shift ResNets with
    the time activation skipped in, GELU time embedding, T5-width text projected to the cross-attention width,
    the pooled-text term, 6 output channels; stage II also takes the upscaled image and its noise level."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(
        sample_size=32 if stage_two else 16, layers_per_block=1, block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=2 * IMAGE_CHANNELS if stage_two else IMAGE_CHANNELS, out_channels=2 * IMAGE_CHANNELS,
        cross_attention_dim=32, encoder_hid_dim=width, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", time_embedding_act_fn="gelu", resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
        mid_block_scale_factor=1.414, **({"class_embed_type": "timestep"} if stage_two else {})).eval()
    # A random UNet's noise prediction reacts to its input with a gain far above a trained one's, and DDIM with
    # x0 clipping or thresholding (IF's config) turns that into chaos: float32 rounding grows exponentially
    # (measured, DDIM-50 from IF's config: 1e-5 in the initial noise → 1.5 in the image at full output scale,
    # 0.04 at 3%). At 1% of the output layer's scale it grows 34x, so fd can be compared with diffusers at all.
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
        unet.conv_out.bias.mul_(OUTPUT_SCALE)
    return unet


def tiny_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)).eval()


def make_tiny_if_components(seed: int = TINY_SEED) -> Components:
    """A random-weight IFPipeline at toy width: a 2-layer T5 v1.1 encoder with a T5-style tokenizer written
    locally, the tiny IF UNet, IF's DDPM config; 16×16 pixels native. **Its images are noise.**"""
    tokenizer = make_tiny_t5_tokenizer()
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    torch.manual_seed(seed)
    text_encoder = tiny_t5(tokenizer)
    return Components(tokenizer, text_encoder, tiny_if_unet(), None, dict(IF_SCHEDULER_CONFIG), family="if")


def make_tiny_if_sr_components(seed: int = TINY_SEED) -> Components:
    """A random-weight IFSuperResolutionPipeline at toy width, upscaling tiny-if's 16² to 32². Like every stage-II
    folder fd builds, it has no text encoder: it conditions on stage I's T5 embeddings (fd-run
    --super-resolution)."""
    torch.manual_seed(seed + 1)
    comps = Components(None, None, tiny_if_unet(stage_two=True), None, dict(IF_SCHEDULER_CONFIG), family="if-sr")
    comps.options["image_noising_scheduler"] = dict(IF_IMAGE_NOISING_CONFIG)
    return comps


# IF-I's UNet layout as diffusers' convert_if.py builds it (4 levels at 64 px: a ResNet level, then three levels
# with added-KV cross-attention, 3 ResNets per level, 64-wide heads, scale-shift norm, GELU, the pooled-text
# term, T5-XXL's 4096-wide states projected, 6 output channels). The widths are fd's (IF-I-XL's own config is
# not in the local sources): 64 x (1, 2, 3, 4), small enough for a CPU benchmark.
IF_RANDOM_UNET_CONFIG = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(64, 128, 192, 256),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=256, encoder_hid_dim=4096,
    attention_head_dim=64, addition_embed_type="text", addition_embed_type_num_heads=64,
    cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
    time_embedding_act_fn="gelu", resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
    mid_block_scale_factor=1.414)


def make_if_random_components(seed: int = TINY_SEED) -> Components:
    """IF-I-shaped random weights for benchmarks (IF_RANDOM_UNET_CONFIG) with a one-layer T5 of XXL's width
    (4096) and the tiny tokenizer: the UNet's FLOPs split as IF-I's, images of noise."""
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel
    tokenizer = make_tiny_t5_tokenizer()
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)).eval()
    unet = UNet2DConditionModel(**IF_RANDOM_UNET_CONFIG).eval()
    return Components(tokenizer, text_encoder, unet, None, dict(IF_SCHEDULER_CONFIG), family="if")


class IFFamily(BuildFamily):
    """Stage I (IFPipeline)."""

    name = "if"
    pipeline_classes = ("IFPipeline",)
    aliases = {"if": "DeepFloyd/IF-I-XL-v1.0"}
    generated = {"tiny-if": make_tiny_if_components, "if-random": make_if_random_components}
    subfolders = ("tokenizer", "text_encoder", "unet", "scheduler")
    stage_two = False
    supports_dynamic_shape = False  # one size per folder (IF-I: 64², IF-II: 256²)

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import UNet2DConditionModel
        from transformers import T5EncoderModel, T5Tokenizer
        classes = {"unet": UNet2DConditionModel}
        if not self.stage_two:
            classes = {"tokenizer": T5Tokenizer, "text_encoder": T5EncoderModel, **classes}
        parts = load_weights(folder, what, classes)
        tokenizer = parts.get("tokenizer")
        if tokenizer is not None:
            tokenizer.model_max_length = MAX_SEQUENCE_LENGTH  # the pipeline's length, not T5's 512
        return Components(tokenizer, parts.get("text_encoder"), parts["unet"], None, {}, family=self.name)

    def check_supported(self, comps: Components) -> None:
        check_if_unet(comps.unet)
        config = comps.unet.config
        wanted = 2 * IMAGE_CHANNELS if self.stage_two else IMAGE_CHANNELS
        if config.in_channels != wanted or config.out_channels != 2 * IMAGE_CHANNELS:
            raise FdError(f"this UNet takes {config.in_channels} and returns {config.out_channels} channels; an IF "
                          f"stage {'II' if self.stage_two else 'I'} UNet takes {wanted} and returns 6 (noise and "
                          "variance)")
        if (config.class_embed_type == "timestep") != self.stage_two:
            raise FdError(f"this UNet {'lacks' if self.stage_two else 'has'} the noise-level class embedding of a "
                          f"stage-II UNet, but its folder is an {self.pipeline_classes[0]}: use a matching folder")

    def vae_scale(self, comps: Components) -> int:
        return 1  # pixel space

    def size_rule(self, comps: Components) -> tuple[int, int, int]:
        return IMAGE_CHANNELS, unet_levels(comps.unet), comps.unet.config.sample_size

    @staticmethod
    def pipeline_scheduler(scheduler):
        """IFPipeline keeps the variance channels when the scheduler's config says learned_range, which only DDPM
        steps with (DPM++ slices them itself): any other scheduler made from IF's config gets variance_type
        fixed_small, so the pipeline drops them (what fd's `--scheduler ddim` means)."""
        learned = scheduler.config.get("variance_type") in ("learned", "learned_range")
        if learned and type(scheduler).__name__ not in ("DDPMScheduler", "DPMSolverMultistepScheduler"):
            return type(scheduler).from_config({**scheduler.config, "variance_type": "fixed_small"})
        return scheduler

    def diffusers_call(self, pipe, prompts, latents, *, steps, guidance_scale, height, width, **extra):
        """IFPipeline as fd runs IF: it takes no latents=, so this instance's prepare_intermediate_images hands it
        fd's initial noise; no caption cleaning (fd lower-cases and strips, as IFPipeline without bs4/ftfy); the
        final sample is its output_type "pt" image, in [-1, 1]."""
        pipe.prepare_intermediate_images = lambda *args, **kwargs: latents.clone()
        sample = pipe(prompts, negative_prompt=None, height=height, width=width, num_inference_steps=steps,
                      guidance_scale=guidance_scale, output_type="pt", clean_caption=False, **extra).images
        return (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy(), sample

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import IFPipeline
        scheduler = self.pipeline_scheduler(scheduler)
        return IFPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, unet=comps.unet,
                          scheduler=scheduler, safety_checker=None, feature_extractor=None, watermarker=None,
                          requires_safety_checker=False)

    def text_width(self, comps: Components) -> int:
        return comps.unet.config.encoder_hid_dim  # T5's d_model (4096 for T5 v1.1 XXL)

    # --- graphs -----------------------------------------------------------------------------------------
    whole_unet_from_conditions = False  # its UNet takes the raw T5 states; its halves take the projected terms

    def denoiser_halves(self, comps: Components, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        unet = _cast(comps.unet, dtype)
        return IFEncoder(unet), IFDecoder(unet)

    def conditions(self, comps: Components, unet_dtype: str) -> list[dict]:
        """The prompt terms both halves read, then (stage II) the upscaled image the encoder alone reads."""
        config = comps.unet.config
        terms = [tensor("encoder_hidden_states", unet_dtype, [Axis("sequence", MAX_SEQUENCE_LENGTH),
                                                              config.cross_attention_dim]),
                 tensor("added_embedding", unet_dtype, [comps.unet.time_embedding.linear_2.out_features])]
        side = config.sample_size
        return terms + ([tensor("upscaled", unet_dtype, [IMAGE_CHANNELS, side, side])] if self.stage_two else [])

    def decoder_reads(self, condition: str) -> bool:
        return condition != "upscaled"

    def graph_modules(self, comps: Components, precision: str) -> dict[str, nn.Module]:
        encoder, decoder = self.denoiser_halves(comps, TORCH_DTYPES[precision])
        modules = {"denoiser_conditions": IFPromptTerms(encoder.unet).eval(), "denoiser_encoder": encoder.eval(),
                   "denoiser_decoder": decoder.eval()}
        if not self.stage_two:  # T5 in float32 in every precision: it overflows in fp16
            modules["text_encoder"] = T5EncoderGraph(comps.text_encoder.float()).eval()
        return modules

    def specs(self, comps: Components, modules: dict, geometry: dict, precision: str, limits) -> dict:
        dtype = DTYPE_NAMES[precision]
        height, width = geometry["height"], geometry["width"]
        length, text_width = MAX_SEQUENCE_LENGTH, self.text_width(comps)
        text = tensor("text_embeddings", "float32", [Axis("sequence", length), text_width])
        terms_in = [text, tensor("noise_level", "float32", [])] if self.stage_two else [text]
        conditions = [c for c in self.conditions(comps, dtype) if self.decoder_reads(c["name"])]
        # stage II: the noised upscaled stage-I image, at the built size (the encoder alone reads it)
        image = [tensor("upscaled", dtype, [IMAGE_CHANNELS, height, width])] if self.stage_two else []
        sample = tensor("sample", dtype, [IMAGE_CHANNELS, height, width])
        shapes = _cache_shapes(modules["denoiser_encoder"], tuple(sample["shape"][1:]), conditions + image, dtype)
        cache = self.cache_tensors(shapes, dtype)
        timestep = tensor("timestep", "float32", [])
        specs = {
            "denoiser_conditions": {"inputs": terms_in, "outputs": conditions},
            "denoiser_encoder": {"inputs": [sample, timestep, *conditions, *image], "outputs": cache},
            "denoiser_decoder": {"inputs": [timestep, *conditions, *cache],
                                 "outputs": [tensor("noise_pred", dtype, [comps.unet.config.out_channels, height,
                                                                          width])]},
        }
        if not self.stage_two:
            specs["text_encoder"] = {
                "inputs": [tensor("input_ids", "int64", [Axis("sequence", length)]), _mask("attention_mask", length)],
                "outputs": [text]}
        for graph, spec in specs.items():
            spec["batch"] = batch_range(graph, limits)
        return specs

    def vae_encoder_graph(self, comps, geometry, precision, limits):
        raise FdError("--img2img needs a VAE; DeepFloyd IF works in pixel space and has none: drop --img2img")


class IFSuperResolutionFamily(IFFamily):
    """Stage II (IFSuperResolutionPipeline): the upscaled stage-I image, noised to a noise level, beside the sample."""

    name = "if-sr"
    pipeline_classes = ("IFSuperResolutionPipeline",)
    aliases = {"if-sr": "DeepFloyd/IF-II-L-v1.0"}
    generated = {"tiny-if-sr": make_tiny_if_sr_components}
    subfolders = ("unet", "scheduler", "image_noising_scheduler")
    stage_two = True

    def load_folder(self, folder: str, what: str) -> Components:
        import json
        from pathlib import Path
        comps = super().load_folder(folder, what)
        path = Path(folder) / "image_noising_scheduler" / "scheduler_config.json"
        try:
            comps.options["image_noising_scheduler"] = json.loads(path.read_text())
        except (OSError, ValueError):
            raise FdError(f"{what}: {path} is missing or not JSON: copy the complete IF stage-II folder") from None
        return comps

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import DDPMScheduler, IFSuperResolutionPipeline
        # no T5: call it with prompt_embeds / negative_prompt_embeds (stage I's), as fd runs stage II
        return IFSuperResolutionPipeline(
            tokenizer=None, text_encoder=None, unet=comps.unet, scheduler=self.pipeline_scheduler(scheduler),
            image_noising_scheduler=DDPMScheduler.from_config(comps.options["image_noising_scheduler"]),
            safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


FAMILY = IFFamily()
SR_FAMILY = IFSuperResolutionFamily()
