"""Text to video on the build side: AnimateDiff (`AnimateDiffPipeline`: SD1.5's UNet plus a MotionAdapter, run as
diffusers' UNetMotionModel) and ModelScope's text-to-video (`TextToVideoSDPipeline`, UNet3DConditionModel).

Both condition on CLIP's last hidden state as SD does (the text graph is SD's). What differs is the denoiser: a
video UNet whose halves (builder/video_split.py) take and return latents in diffusers' video layout (rows, C, F, h,
w) with F frames fixed per folder (`fd-build --frames F`, default 16, the manifest's `frames`), and a VAE graph
that decodes every frame of a video.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fd.builder.families.base import Components, _cast
from fd.builder.families.sd import SD_SCHEDULER_CONFIG, StableDiffusionFamily, make_tiny_components
from fd.builder.loading import TINY_SEED, load_weights
from fd.builder.specs import Axis, tensor
from fd.builder.video_split import VideoUNetDecoder, VideoUNetEncoder, VideoVaeDecoder, check_frames, \
    check_video_unet
from fd.runtime.errors import FdError

DEFAULT_FRAMES = 16  # AnimateDiffPipeline's and TextToVideoSDPipeline's num_frames default
# AnimateDiff's documented sampler (DDIM on linear betas, linspace spacing, no clipping), as its model cards use it
ANIMATEDIFF_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "timestep_spacing": "linspace", "prediction_type": "epsilon", "trained_betas": None,
}
# damo-vilab/text-to-video-ms-1.7b's scheduler/scheduler_config.json: DDIM on SD's scaled-linear betas
T2V_SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler"}
del T2V_SCHEDULER_CONFIG["skip_prk_steps"]


def _randomize_zero_init(module: torch.nn.Module, seed: int) -> None:
    """The temporal layers are zero-initialized (a fresh motion module is the identity); give those zeros seeded
    random values, so a generated model's frames interact and a test can tell a missing temporal layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            temporal = any(part in name for part in ("motion_modules", "temp_", "transformer_in"))
            if temporal and parameter.dim() > 0 and not parameter.is_meta and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def motion_unet(unet, adapter):
    """UNetMotionModel.from_unet2d, as AnimateDiffPipeline combines SD's UNet and a motion adapter, without the
    "modules ... kept in float32: []" notice its dtype cast prints (fd promises one line per error on stderr)."""
    import logging

    from diffusers import UNetMotionModel
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return UNetMotionModel.from_unet2d(unet, adapter).eval()
    finally:
        logger.setLevel(level)


def make_tiny_animatediff(seed: int = TINY_SEED) -> Components:
    """`tiny` (SD1.5's structure at toy width) plus a MotionAdapter of the same widths, combined into a
    UNetMotionModel as AnimateDiffPipeline combines them; its videos are noise."""
    from diffusers import MotionAdapter
    comps = make_tiny_components(seed)
    torch.manual_seed(seed + 1)
    adapter = MotionAdapter(block_out_channels=tuple(comps.unet.config.block_out_channels), motion_layers_per_block=2,
                            motion_norm_num_groups=8, motion_num_attention_heads=2, motion_max_seq_length=32)
    _randomize_zero_init(adapter, seed + 2)
    unet = motion_unet(comps.unet, adapter)
    return Components(comps.tokenizer, comps.text_encoder, unet, comps.vae, dict(ANIMATEDIFF_SCHEDULER_CONFIG),
                      family="animatediff")


def make_animatediff_random(seed: int = TINY_SEED) -> Components:
    """For benchmarks: SD1.5's real UNet, VAE and CLIP configs (sd15-random) plus diffusers' MotionAdapter defaults
    (AnimateDiff v2's layout: 2 motion layers per block, a motion mid block, 8 heads, 32 positions), random
    weights: AnimateDiff's FLOPs and memory, videos of noise."""
    from diffusers import MotionAdapter

    from fd.builder.families.sd import make_sd15_random_components
    comps = make_sd15_random_components(seed)
    torch.manual_seed(seed + 1)
    unet = motion_unet(comps.unet, MotionAdapter())
    return Components(comps.tokenizer, comps.text_encoder, unet, comps.vae, dict(ANIMATEDIFF_SCHEDULER_CONFIG),
                      family="animatediff")


def make_tiny_t2v(seed: int = TINY_SEED) -> Components:
    """ModelScope's UNet3DConditionModel (temporal convolutions and attention, transformer_in) at toy width with
    `tiny`'s CLIP and VAE; its videos are noise."""
    from diffusers import UNet3DConditionModel
    comps = make_tiny_components(seed)
    torch.manual_seed(seed + 1)
    unet = UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3)
    _randomize_zero_init(unet, seed + 2)
    return Components(comps.tokenizer, comps.text_encoder, unet.eval(), comps.vae, dict(T2V_SCHEDULER_CONFIG),
                      family="t2v")


class VideoFamily(StableDiffusionFamily):
    """What AnimateDiff and text-to-video share: SD's text graph, the video split, F frames per folder."""

    supports_dynamic_shape = False  # one size (and one frame count) per folder
    image_inputs = False  # no ControlNet / img2img video pipeline is checked against

    def set_frames(self, comps: Components, frames: int | None) -> None:
        frames = DEFAULT_FRAMES if frames is None else frames
        check_frames(comps.unet, frames)
        comps.options["frames"] = frames

    def extra_geometry(self, comps: Components) -> dict:
        return {"frames": comps.options["frames"]}

    def check_supported(self, comps: Components) -> None:
        check_video_unet(comps.unet)

    def denoiser_halves(self, comps: Components, dtype: torch.dtype):
        unet, frames = _cast(comps.unet, dtype), comps.options["frames"]
        return VideoUNetEncoder(unet, frames), VideoUNetDecoder(unet, frames)

    def vae_decoder_graph(self, comps: Components, vae):
        return VideoVaeDecoder(vae, comps.options["frames"])

    def latent_dims(self, geometry: dict) -> list:
        return [geometry["latent_channels"], geometry["frames"], Axis("height", geometry["latent_height"]),
                Axis("width", geometry["latent_width"])]

    def image_dims(self, geometry: dict) -> list:
        return [3, geometry["frames"], Axis("height", geometry["height"]), Axis("width", geometry["width"])]

    def cache_tensors(self, shapes: list[tuple], dtype: str) -> list[dict]:
        from fd.builder.specs import cache_names
        return [tensor(name, dtype, [frames, c, Axis("height", h), Axis("width", w)])
                for name, (frames, c, h, w) in zip(cache_names(len(shapes)), shapes)]

    def diffusers_video(self, pipe, prompts, latents, *, steps, guidance_scale, height, width) -> tuple:
        """The video pipeline as fd runs the folder: its frame count, these latents, no negative prompt. Returns
        (videos as floats in [0, 1], N x F x H x W x 3; the final latents, N x C x F x h x w)."""
        final = {}
        out = pipe(prompts, negative_prompt=None, height=height, width=width, num_frames=latents.shape[2],
                   num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents, output_type="np",
                   **self.latents_callback(final))
        return np.asarray(out.frames), final.get("latents")

    def diffusers_call(self, pipe, prompts, latents, *, steps, guidance_scale, height, width, **extra):
        """fd-bench's diffusers arm: the base contract's images are each video's first frame (what fd's
        GenerationResult.images holds for a video folder, so the fidelity figures compare like with like)."""
        frames, final = self.diffusers_video(pipe, prompts, latents, steps=steps, guidance_scale=guidance_scale,
                                             height=height, width=width)
        return frames[:, 0], final


class AnimateDiffFamily(VideoFamily):
    name = "animatediff"
    pipeline_classes = ("AnimateDiffPipeline",)
    # an alias of two hub models: SD1.5 and the motion adapter, combined (builder/models.py, composite_aliases)
    composite_aliases = {"animatediff": ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                         "guoyww/animatediff-motion-adapter-v1-5-2")}
    generated = {"tiny-animatediff": make_tiny_animatediff, "animatediff-random": make_animatediff_random}
    subfolders = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

    def load_folder(self, folder: str, what: str) -> Components:
        """An AnimateDiffPipeline folder: its unet is a UNetMotionModel, or SD's UNet2DConditionModel with the
        folder's motion_adapter/ (combined as the pipeline combines them)."""
        from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        unet_class = _index_class(Path(folder), "unet")
        if unet_class not in ("UNetMotionModel", "UNet2DConditionModel"):
            raise FdError(f"{what}: its unet is a {unet_class}; an AnimateDiff folder's is a UNetMotionModel or "
                          "UNet2DConditionModel with a motion_adapter/")
        classes = {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "vae": AutoencoderKL,
                   "unet": UNetMotionModel if unet_class == "UNetMotionModel" else UNet2DConditionModel}
        if unet_class == "UNet2DConditionModel":
            if not (Path(folder) / "motion_adapter").is_dir():
                raise FdError(f"{what} has a UNet2DConditionModel unet and no motion_adapter/ folder: copy the "
                              "complete AnimateDiff pipeline folder")
            classes["motion_adapter"] = MotionAdapter
        parts = load_weights(folder, what, classes)
        unet = parts["unet"]
        if "motion_adapter" in parts:
            unet = motion_unet(unet, parts["motion_adapter"])
        return Components(parts["tokenizer"], parts["text_encoder"], unet, parts["vae"], {})

    def load_alias(self, sd_folder: str, adapter_folder: str) -> Components:
        """SD1.5 from the local cache with the AnimateDiff motion adapter, as AnimateDiffPipeline.from_pretrained(
        sd15, motion_adapter=…) builds them; the sampler is AnimateDiff's documented DDIM."""
        from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        what = f"hub model {self.composite_aliases['animatediff'][0]}"
        parts = load_weights(sd_folder, what, {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel,
                                               "unet": UNet2DConditionModel, "vae": AutoencoderKL})
        adapter = MotionAdapter.from_pretrained(adapter_folder, local_files_only=True)
        unet = motion_unet(parts["unet"], adapter)
        return Components(parts["tokenizer"], parts["text_encoder"], unet, parts["vae"],
                          dict(ANIMATEDIFF_SCHEDULER_CONFIG), family=self.name)

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import AnimateDiffPipeline
        return AnimateDiffPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, motion_adapter=None, scheduler=scheduler)

    @staticmethod
    def latents_callback(final: dict) -> dict:
        def keep(_pipe, _i, _t, kwargs):
            final["latents"] = kwargs["latents"]
            return kwargs
        return {"callback_on_step_end": keep}


class TextToVideoFamily(VideoFamily):
    name = "t2v"
    pipeline_classes = ("TextToVideoSDPipeline",)
    aliases = {"t2v": "damo-vilab/text-to-video-ms-1.7b"}
    generated = {"tiny-t2v": make_tiny_t2v}
    subfolders = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        parts = load_weights(folder, what, {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel,
                                            "unet": UNet3DConditionModel, "vae": AutoencoderKL})
        return Components(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], {})

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import TextToVideoSDPipeline
        return TextToVideoSDPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                     unet=comps.unet, scheduler=scheduler)

    @staticmethod
    def latents_callback(final: dict) -> dict:
        def keep(_i, _t, latents):  # the deprecated pipeline's only hook: callback(step, t, latents)
            final["latents"] = latents
        return {"callback": keep, "callback_steps": 1}


def _index_class(folder: Path, component: str) -> str | None:
    """The class model_index.json names for a component (["diffusers", "UNetMotionModel"] → "UNetMotionModel")."""
    try:
        entry = json.loads((folder / "model_index.json").read_text()).get(component)
    except (OSError, ValueError, AttributeError):
        return None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


ANIMATEDIFF = AnimateDiffFamily()
T2V = TextToVideoFamily()
