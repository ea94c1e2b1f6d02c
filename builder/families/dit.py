"""DiT (class-conditional ImageNet diffusion transformers, diffusers' DiTPipeline) on the build side.

The paper's split (Li et al., arXiv 2312.09608, DiT-XL/2): the "encoder" is the patch embedding and blocks
0 … S-1 (S = 18 of 28 by default, transformer.py), its cache the tokens after block S-1; the "decoder" is
blocks S … L-1, the final adaLN layer and unpatchify. Every block is conditioned (adaLN-Zero) on the
timestep and the class label, so each decoder row takes its own timestep and class, and a window's steps
batch exactly as for UNets.

A learned-sigma DiT (out_channels = 2 x in_channels, as every released one) predicts epsilon and a
variance; DiTPipeline guides and steps on the epsilon channels alone, so the decoder returns only those.
Classes are 0 … num_classes-1; num_classes itself is the null class that classifier-free guidance uses.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fd.builder.families.base import Components, _cast
from fd.builder.families.transformer import TransformerFamily
from fd.builder.loading import TINY_SEED, load_weights
from fd.builder.specs import tensor
from fd.runtime.errors import FdError

# The scheduler diffusers' DiT conversion writes (scripts/convert_dit_to_diffusers.py): DDIM on the linear
# betas DiT was trained with, epsilon prediction, no clipping.
DIT_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "clip_sample": False, "set_alpha_to_one": True,
    "steps_offset": 0, "prediction_type": "epsilon",
}
# A few ImageNet classes at their real ids, for the generated models (a real DiT folder has all 1000). The
# random weights do not know them; they exist so that names can be tried.
SAMPLE_ID2LABEL = {
    "0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus",
    "2": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "3": "tiger shark, Galeocerdo cuvieri", "207": "golden retriever", "281": "tabby, tabby cat",
    "388": "giant panda, panda, panda bear, coon bear, Ailuropoda melanoleuca", "980": "volcano",
}
IMAGENET_CLASSES = 1000  # DiTPipeline's null class is 1000 whatever the model says: generated models keep it


# --- the two halves ----------------------------------------------------------------------------------

class DiTEncoder(nn.Module):
    """(sample, timestep, class_labels) → (the tokens after block S-1,): patch embedding + blocks 0 … S-1."""

    def __init__(self, transformer, split: int):
        super().__init__()
        self.pos_embed = transformer.pos_embed
        self.blocks = transformer.transformer_blocks[:split]

    def forward(self, sample, timestep, class_labels):
        labels = class_labels.long()  # an embedding index; generic tools (FLOP counting) may hand floats
        hidden = self.pos_embed(sample)
        for block in self.blocks:
            hidden = block(hidden, timestep=timestep, class_labels=labels)
        return (hidden,)


class DiTDecoder(nn.Module):
    """(timestep, class_labels, tokens) → the epsilon channels of the noise prediction: blocks S … L-1, the
    final adaLN layer (conditioned, as diffusers' forward, through block 0's timestep/class embedding) and
    unpatchify onto a `grid` of (h, w) patches (the native square unless the family sets another size)."""

    def __init__(self, transformer, split: int):
        super().__init__()
        config = transformer.config
        self.blocks = transformer.transformer_blocks[split:]
        self.embed = transformer.transformer_blocks[0].norm1.emb
        self.norm_out, self.proj_out_1, self.proj_out_2 = transformer.norm_out, transformer.proj_out_1, transformer.proj_out_2
        self.patch, self.out_channels, self.latent_channels = config.patch_size, transformer.out_channels, config.in_channels
        side = config.sample_size // config.patch_size
        self.grid = (side, side)

    def forward(self, timestep, class_labels, tokens):
        labels = class_labels.long()
        hidden = tokens
        for block in self.blocks:
            hidden = block(hidden, timestep=timestep, class_labels=labels)
        conditioning = self.embed(timestep, labels, hidden_dtype=hidden.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden = self.proj_out_2(self.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None])
        (h, w), p, c = self.grid, self.patch, self.out_channels
        # tokens (n, h·w, p·p·c) → (n, c, h·p, w·p)
        image = hidden.reshape(-1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h * p, w * p)
        return image[:, :self.latent_channels]  # learned sigma: the variance channels are never used


# --- generated models --------------------------------------------------------------------------------

def _dit_components(seed: int, transformer: dict, vae: dict) -> Components:
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=IMAGENET_CLASSES, norm_type="ada_norm_zero",
                                  norm_elementwise_affine=False, attention_bias=True, **transformer)
    autoencoder = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                **vae)
    return Components(None, None, None, autoencoder.eval(), dict(DIT_SCHEDULER_CONFIG), family="dit",
                      transformer=model.eval(), options=_options(model, dict(SAMPLE_ID2LABEL)))


def make_tiny_dit_components(seed: int = TINY_SEED) -> Components:
    """DiT's structure at toy width: 6 adaLN-Zero blocks 32 wide, patch 2 on an 8x8 latent (16 tokens),
    learned sigma (8 output channels), ImageNet's 1000 classes + the null class, an 8x VAE; 64 px images."""
    return _dit_components(seed, dict(num_layers=6, num_attention_heads=2, attention_head_dim=16, sample_size=8),
                           dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64))


def make_dit_xl_random_components(seed: int = TINY_SEED) -> Components:
    """DiT-XL/2 at 256 px with random weights: 28 blocks 1152 wide (16 heads of 72), patch 2 on a 32x32 latent,
    learned sigma, and the SD VAE's config (DiT uses sd-vae-ft-ema). For benchmarks; its images are noise."""
    return _dit_components(seed, dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
                           dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256))


# --- the family --------------------------------------------------------------------------------------

class DiTFamily(TransformerFamily):
    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    aliases = {"dit": "facebook/DiT-XL-2-256", "dit-512": "facebook/DiT-XL-2-512"}
    generated = {"tiny-dit": make_tiny_dit_components, "dit-xl-random": make_dit_xl_random_components}
    subfolders = ("transformer", "vae", "scheduler")

    def load_folder(self, folder: str, what: str) -> Components:
        from diffusers import AutoencoderKL, DiTTransformer2DModel
        parts = load_weights(folder, what, {"transformer": DiTTransformer2DModel, "vae": AutoencoderKL})
        return Components(None, None, None, parts["vae"], {}, family=self.name, transformer=parts["transformer"],
                          options=_options(parts["transformer"], _read_id2label(Path(folder), what)))

    def check_supported(self, comps: Components) -> None:
        super().check_supported(comps)
        config = comps.transformer.config
        if config.norm_type != "ada_norm_zero" or not config.num_embeds_ada_norm:
            raise FdError(f"this DiT's norm_type is {config.norm_type!r} without class embeddings: fd builds "
                          "class-conditional adaLN-Zero DiTs (norm_type 'ada_norm_zero', num_embeds_ada_norm set)")
        if comps.transformer.out_channels not in (config.in_channels, 2 * config.in_channels):
            raise FdError(f"this DiT predicts {comps.transformer.out_channels} channels for {config.in_channels} latent "
                          f"channels: fd builds DiTs that predict epsilon ({config.in_channels}) or epsilon and sigma "
                          f"({2 * config.in_channels})")

    def denoiser_halves(self, comps: Components, dtype: torch.dtype):
        transformer, split = _cast(comps.transformer, dtype), self.split_block(comps)
        return DiTEncoder(transformer, split), DiTDecoder(transformer, split)

    def specs(self, comps, modules, geometry, precision, limits):
        patch = comps.transformer.config.patch_size  # the decoder unpatchifies onto the built size's grid
        modules["denoiser_decoder"].grid = (geometry["latent_height"] // patch, geometry["latent_width"] // patch)
        return super().specs(comps, modules, geometry, precision, limits)

    def text_graphs(self, comps, unet_dtype):
        return {}

    def text_specs(self, comps, unet_dtype):
        return {}

    def conditions(self, comps, unet_dtype):
        labels = tensor("class_labels", "int64", [])
        labels["range"] = [0, comps.transformer.config.num_embeds_ada_norm]  # inclusive: the last is the null class
        return [labels]

    def diffusers_pipeline(self, comps, scheduler):
        from diffusers import DiTPipeline
        id2label = comps.options.get("id2label") or None
        pipe = DiTPipeline(transformer=comps.transformer, vae=comps.vae, scheduler=scheduler, id2label=id2label)
        if id2label:
            pipe.register_to_config(id2label=id2label)  # so save_pretrained writes it to model_index.json
        return pipe

    diffusers_denoiser = "transformer"

    def check_diffusers_call(self, pipe, height, width):
        side = pipe.transformer.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if (height, width) != (side, side):
            raise FdError(f"DiTPipeline generates only at its transformer's size, {side}x{side}, not {height}x{width}: "
                          "drop --compare diffusers, or compare a folder built at that size")

    def diffusers_call(self, pipe, prompts, latents, *, steps, guidance_scale, height, width, **extra):
        """DiTPipeline as fd runs DiT: the labels as class ids (fd's rule: ids, or id2label names in any case),
        guidance when above 1 (as fd). It has no `latents` argument: its noise draw returns ours, and its VAE
        decode call hands back the final latents; both only for this call."""
        from diffusers.pipelines.dit import pipeline_dit
        from fd.runtime.families.dit import class_id
        options = {"num_classes": pipe.transformer.config.num_embeds_ada_norm,
                   "id2label": dict(pipe.config.get("id2label") or {})}
        final, decode = {}, pipe.vae.decode

        def keep_latents(scaled, *args, **kwargs):
            final["latents"] = scaled * pipe.vae.config.scaling_factor  # the pipeline decodes latents / factor
            return decode(scaled, *args, **kwargs)
        with _replaced(pipeline_dit, "randn_tensor", lambda shape, **_: latents.reshape(shape)), \
                _replaced(pipe.vae, "decode", keep_latents):
            out = pipe([class_id(label, options) for label in prompts], guidance_scale=guidance_scale,
                       num_inference_steps=steps, output_type="np", **extra)
        return out.images, final.get("latents")


@contextmanager
def _replaced(owner, name: str, value):
    """`owner.name` is `value` inside the block only: a module's function, or one object's method (whose own
    attribute is removed again, so the class's method shows through)."""
    own = vars(owner)
    had, before = name in own, own.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, before)
        else:
            delattr(owner, name)


def _options(transformer, id2label: dict) -> dict:
    """What the runtime needs to turn class labels into rows (manifest family_options): the number of classes,
    which is also the null class's id, and the names of the classes."""
    return {"num_classes": int(transformer.config.num_embeds_ada_norm or 0), "id2label": id2label}


def _read_id2label(folder: Path, what: str) -> dict[str, str]:
    """model_index.json's id2label (class id → comma-separated names), or {} when it has none."""
    try:
        id2label = json.loads((folder / "model_index.json").read_text()).get("id2label") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise FdError(f"{what}: model_index.json is not readable JSON: copy it again from the model's source") from None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) and str(k).isdigit() for k, v in id2label.items()):
        raise FdError(f"{what}: model_index.json's id2label is not a map of class ids to names: copy it again from "
                      "the model's source")
    return {str(k): v for k, v in id2label.items()}


FAMILY = DiTFamily()
