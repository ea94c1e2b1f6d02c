"""What every build-side family shares: the loaded components, and the denoiser and VAE graphs.

A family file (sd.py, sdxl.py) adds what differs: how a folder loads, its generated models, its text
graphs and their tensors, and the denoiser's conditioning tensors. The denoiser is a UNet unless the family
overrides the four denoiser methods (transformer families: DiT, PixArt). Everything else (export, checks, TensorRT
profiles, the manifest) reads the specs these produce; the runtime reads them from the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fd.builder.specs import Axis, cache_names, tensor
from fd.builder.split import UNetDecoder, UNetEncoder, added_condition_names, check_supported, unet_levels
from fd.runtime.batch import Limits, batch_range
from fd.runtime.errors import FdError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Components:
    """The loaded pieces of a pipeline that fd builds engines from (SDXL also fills the *_2 fields)."""

    tokenizer: object
    text_encoder: object
    unet: object
    vae: object
    scheduler_config: dict
    source: dict = field(default_factory=dict)  # what was loaded, for the manifest
    family: str = "sd"
    tokenizer_2: object = None
    text_encoder_2: object = None
    options: dict = field(default_factory=dict)  # family options the runtime needs (manifest "family_options")
    transformer: object = None  # transformer families (DiT, PixArt) fill this instead of `unet`
    tokenizer_3: object = None  # SD3's T5
    text_encoder_3: object = None

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if t is not None]

    def torch_modules(self) -> dict:
        modules = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                   "text_encoder_3": self.text_encoder_3, "unet": self.unet, "transformer": self.transformer,
                   "vae": self.vae}
        return {name: module for name, module in modules.items() if module is not None}


class CastOutputs(nn.Module):
    """A module whose floating outputs are cast to the UNet's dtype, so a text encoder that computes in fp32
    hands an fp16 UNet its inputs on the device, with no host round trip at run time."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args):
        out = self.module(*args)
        return tuple(o.to(self.dtype) for o in out) if isinstance(out, tuple) else out.to(self.dtype)


class FlatDecoder(nn.Module):
    """The decoder with every input positional, in the order its spec lists them: timestep, the
    conditions (text, then any added ones), mid, then the skips."""

    def __init__(self, unet):
        super().__init__()
        self.decoder = UNetDecoder(unet)
        self.added = added_condition_names(unet)

    def forward(self, timestep, encoder_hidden_states, *rest):
        added = dict(zip(self.added, rest[:len(self.added)]))
        mid, *skips = rest[len(self.added):]
        return self.decoder(timestep, encoder_hidden_states, mid, tuple(skips), **added)


class VaeDecoderGraph(nn.Module):
    """latent (already divided by the VAE scaling factor) → image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """image in [-1, 1] → the mean and standard deviation of the VAE's latent distribution (img2img).

    The runtime samples mean + std · noise with its own seeded noise, as diffusers' latent_dist.sample does
    with its generator, then multiplies by the scaling factor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        distribution = self.vae.encode(image, return_dict=False)[0]
        return distribution.mean, distribution.std


class BuildFamily:
    """One model family on the build side. Subclasses set the class attributes and the text-side methods."""

    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json "_class_name" values this family loads
    aliases: dict[str, str] = {}  # short name → hub id
    generated: dict = {}  # name → function(seed) → Components (random weights from configs in code)

    def load_folder(self, folder: str, what: str) -> Components:
        raise NotImplementedError

    def text_graphs(self, comps: Components, unet_dtype: torch.dtype) -> dict[str, nn.Module]:
        raise NotImplementedError

    def text_specs(self, comps: Components, unet_dtype: str) -> dict[str, dict]:
        """Inputs and outputs of the text graphs (no batch range: the generic part adds it)."""
        raise NotImplementedError

    def conditions(self, comps: Components, unet_dtype: str) -> list[dict]:
        """The tensors both UNet halves take besides sample / timestep and the cache, in input order."""
        raise NotImplementedError

    def diffusers_pipeline(self, comps: Components, scheduler):
        """diffusers' own pipeline for these components and scheduler: the oracle fd is tested and
        benchmarked against."""
        raise NotImplementedError

    # --- diffusers' pipeline as fd-bench's third arm runs it: each family's call quirks here, not in the bench --
    diffusers_denoiser = "unet"  # the pipeline's attribute holding the denoiser (whose calls the bench counts)
    whole_unet_from_conditions = True  # the UNet's own forward takes the halves' conditions (flop_split counts it)

    def check_diffusers_call(self, pipe, height: int, width: int) -> None:
        """Refuse, in one line and before any run, a size the pipeline cannot generate at."""

    def diffusers_call(self, pipe, prompts: list, latents, *, steps: int, guidance_scale: float, height: int,
                       width: int, **extra) -> tuple:
        """Run `pipe` as fd runs the folder: these prompts, these initial latents (a torch tensor on the pipeline's
        device and dtype), no negative prompt (SD encodes "", SDXL conditions on zeros: force_zeros_for_empty_prompt;
        SDXL's size conditioning defaults to the image size, as fd's). `extra`: the ControlNet pipeline's image
        and scales. Returns (images as floats in [0, 1], N x H x W x 3; the final latents, a torch tensor)."""
        final = {}

        def keep_latents(_pipe, _i, _t, kwargs):
            final["latents"] = kwargs["latents"]
            return kwargs
        out = pipe(prompts, negative_prompt=None, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance_scale, latents=latents, output_type="np", callback_on_step_end=keep_latents,
                   **extra)
        return out.images, final.get("latents")

    def vae_precision(self, comps: Components, precision: str) -> str:
        """A VAE whose config asks for it (SDXL's force_upcast) stays fp32 in fp16 folders: it overflows in fp16."""
        return "fp32" if precision == "fp16" and comps.vae.config.get("force_upcast", False) else precision

    # --- the denoiser: a UNet here; transformer families override these four ------------------------
    supports_dynamic_shape = True  # --dynamic-shape: the cache's spatial axes scale with the image
    image_inputs = True  # --controlnet / --img2img may apply (UNet image families; video families say no)

    def check_supported(self, comps: Components) -> None:
        """Refuse, in one line, a denoiser whose features the split does not carry."""
        check_supported(comps.unet)

    def set_split_block(self, comps: Components, split_block: int | None) -> None:
        """--split-block: a UNet splits at its mid block, so only transformer families take it."""
        if split_block is not None:
            raise FdError(f"--split-block applies to transformer families (DiT, PixArt); a {self.name} UNet is split "
                          "at its mid block: drop --split-block")

    def set_frames(self, comps: Components, frames: int | None) -> None:
        """--frames: only video families (builder/families/video.py) take it."""
        if frames is not None:
            raise FdError(f"--frames applies to video families (animatediff, t2v); a {self.name} model makes "
                          "images: drop --frames")

    def extra_geometry(self, comps: Components) -> dict:
        """Manifest facts beside the image size (video families: their frame count)."""
        return {}

    def latent_dims(self, geometry: dict) -> list:
        """Per-row dimensions of the latent (video families: channels x frames x h x w)."""
        return [geometry["latent_channels"], Axis("height", geometry["latent_height"]),
                Axis("width", geometry["latent_width"])]

    def image_dims(self, geometry: dict) -> list:
        """Per-row dimensions of the VAE decoder's output."""
        return [3, Axis("height", geometry["height"]), Axis("width", geometry["width"])]

    def vae_decoder_graph(self, comps: Components, vae) -> nn.Module:
        return VaeDecoderGraph(vae)

    def denoiser_halves(self, comps: Components, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        """(encoder, decoder) modules in `dtype`: the encoder's outputs are the cache, and the decoder takes
        timestep, the conditions, then the cache, all positional (the order of their specs)."""
        unet = _cast(comps.unet, dtype)
        return UNetEncoder(unet), FlatDecoder(unet)

    def decoder_reads(self, condition: str) -> bool:
        """Whether the decoder takes this condition (SD3/FLUX: not the text tokens, which the cache carries)."""
        return True

    def vae_scale(self, comps: Components) -> int:
        """Pixels per latent side (1 for pixel-space families, which have no VAE)."""
        return 2 ** (len(comps.vae.config.block_out_channels) - 1)

    def size_rule(self, comps: Components) -> tuple[int, int, int]:
        """(latent channels, the latent side's required multiple, the native latent side)."""
        return comps.unet.config.in_channels, unet_levels(comps.unet), comps.unet.config.sample_size

    def cache_tensors(self, shapes: list[tuple], dtype: str) -> list[dict]:
        """Tensor records of the cache from its per-row shapes (mid, then every skip: C x h x w)."""
        return [tensor(name, dtype, [c, Axis("height", h), Axis("width", w)])
                for name, (c, h, w) in zip(cache_names(len(shapes)), shapes)]

    # --- written once for every family ----------------------------------------------------------------
    def graph_modules(self, comps: Components, precision: str) -> dict[str, nn.Module]:
        """Every graph's torch module, on the CPU in the build precision."""
        dtype = TORCH_DTYPES[precision]
        encoder, decoder = self.denoiser_halves(comps, dtype)
        vae = _cast(comps.vae, TORCH_DTYPES[self.vae_precision(comps, precision)])
        return {**self.text_graphs(comps, dtype), "denoiser_encoder": encoder.eval(),
                "denoiser_decoder": decoder.eval(), "vae_decoder": self.vae_decoder_graph(comps, vae).eval()}

    def specs(self, comps: Components, modules: dict, geometry: dict, precision: str, limits: Limits) -> dict:
        """Every graph's tensors, named axes and batch range."""
        unet_dtype = DTYPE_NAMES[precision]
        vae_dtype = DTYPE_NAMES[self.vae_precision(comps, precision)]
        latent = self.latent_dims(geometry)
        conditions = self.conditions(comps, unet_dtype)
        shapes = _cache_shapes(modules["denoiser_encoder"], tuple(d.size if isinstance(d, Axis) else d for d in latent),
                               conditions, unet_dtype)
        cache = self.cache_tensors(shapes, unet_dtype)
        timestep = tensor("timestep", "float32", [])  # fp32 even in fp16 engines: the sinusoid needs it
        image = self.image_dims(geometry)
        specs = {
            **self.text_specs(comps, unet_dtype),
            "denoiser_encoder": {"inputs": [tensor("sample", unet_dtype, latent), timestep, *conditions], "outputs": cache},
            "denoiser_decoder": {"inputs": [timestep, *conditions, *cache],
                             "outputs": [tensor("noise_pred", unet_dtype, latent)]},
            "vae_decoder": {"inputs": [tensor("latent", vae_dtype, latent)], "outputs": [tensor("image", vae_dtype, image)]},
        }
        for graph, spec in specs.items():
            spec["batch"] = batch_range(graph, limits)
        return specs

    def vae_encoder_graph(self, comps: Components, geometry: dict, precision: str, limits: Limits) -> tuple:
        """(module, spec) of the img2img graph `vae_encoder`, in the VAE decoder's precision."""
        vae_precision = self.vae_precision(comps, precision)
        vae_dtype = DTYPE_NAMES[vae_precision]
        image = [3, Axis("height", geometry["height"]), Axis("width", geometry["width"])]
        latent = [geometry["latent_channels"], Axis("height", geometry["latent_height"]),
                  Axis("width", geometry["latent_width"])]
        spec = {"inputs": [tensor("image", vae_dtype, image)],
                "outputs": [tensor("mean", vae_dtype, latent), tensor("std", vae_dtype, latent)],
                "batch": batch_range("vae_encoder", limits)}
        return VaeEncoderGraph(_cast(comps.vae, TORCH_DTYPES[vae_precision])).eval(), spec


DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


def _cache_shapes(encoder: nn.Module, latent: tuple, conditions: list[dict], unet_dtype: str) -> list[tuple]:
    """One tiny encoder pass tells the cache's per-row shapes (mid, then every skip)."""
    def zeros(shape, dtype_name):
        return torch.zeros(1, *shape, dtype=getattr(torch, dtype_name))  # "float16", "int64", …
    with torch.no_grad():
        cache = encoder(zeros(latent, unet_dtype), torch.zeros(1),
                        *(zeros(t["shape"][1:], t["dtype"]) for t in conditions))
    return [tuple(t.shape[1:]) for t in cache]


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast only when needed, without diffusers' "modules ... that should be kept in float32: []" warning
    (ModelMixin.to prints it on every dtype cast, even a no-op one or with that list empty)."""
    import logging
    if next(module.parameters()).dtype == dtype:
        return module
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    if not getattr(module, "_keep_in_fp32_modules", None):
        logger.setLevel(logging.ERROR)
    try:
        return module.to(dtype)
    finally:
        logger.setLevel(level)
