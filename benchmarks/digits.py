"""The `digits` model: Stable Diffusion's structure at toy size, trained here on scikit-learn's handwritten digits.

A yardstick for fd's image quality, not part of the runtime (fd.runtime never imports it): `fd-build --model
digits` calls `trained_folder()`, which trains on first use and then reuses the cached diffusers folder.

- Data: `sklearn.datasets.load_digits` (1,797 8x8 images, 17 grey levels, read from the installed package),
  a fixed stratified split; the held-out part is never trained on. Each digit is upscaled to 32x32 (bilinear),
  brightness = value / 16 (ink bright on a dark ground), grey repeated in 3 channels, in [-1, 1] as SD's VAE.
- VAE: an AutoencoderKL with 3 levels, i.e. 4x down to a 4x8x8 latent. 8x down (4x4 latents) would squeeze
  the 8x8 source digits through 16 positions and leave the UNet no spatial room; at 4x the latent grid is
  the digits' own 8x8 grid. `scaling_factor` = 1 / std of the training latents (how SD's 0.18215 was set).
- UNet: UNet2DConditionModel with cross-attention down, mid and up blocks, epsilon prediction on SD's
  scaled_linear betas, 10% prompt dropout (the "" prompt, for classifier-free guidance), EMA weights saved.
- Text: a 2-layer CLIP text encoder from a config (frozen random weights, seeded) on "a handwritten digit
  zero" … "nine"; the tokenizer is fd's locally written CLIP BPE one (these words spell out in bytes).
- Scheduler: SD's DDIM scheduler config.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fd.runtime.errors import FdError

SEED = 0
IMAGE_SIZE = 32
HELD_OUT_FRACTION = 0.3  # of each digit, never trained on (the classifier's test set and FD-digits' reference)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten digit {word}" for word in WORDS)
UNCONDITIONAL = ""  # what prompt dropout trains, and the pipelines' negative prompt
PROMPT_DROPOUT = 0.1
DDIM_SCHEDULER_CONFIG = {  # SD1.5's scheduler values as a DDIMScheduler (what its pipelines run with DDIM)
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "trained_betas": None,
}
CACHE_ENV = "FD_DIGITS_CACHE"  # where trained folders go (default: cache_root())


@dataclass(frozen=True)
class TrainConfig:
    """How long and how hard each part trains (the full model's defaults fit ~10 minutes on 2 CPU cores)."""

    vae_steps: int = 250
    unet_steps: int = 1500
    batch_size: int = 64
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-5
    ema_decay: float = 0.995


FULL = TrainConfig()


@dataclass
class Split:
    train_images: np.ndarray  # float32 (N, 32, 32) in [0, 1]
    train_labels: np.ndarray  # int64 (N,)
    held_out_images: np.ndarray
    held_out_labels: np.ndarray


def load_split() -> Split:
    """The digits, upscaled to 32x32 in [0, 1], split once (stratified, seeded) into training and held-out."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise FdError("the digits model needs scikit-learn: pip install 'fasterdiffusion-engines[bench]'") from None
    data = load_digits()
    images = upscale(data.images.astype(np.float32) / 16.0)
    x_train, x_held, y_train, y_held = train_test_split(images, data.target.astype(np.int64),
                                                        test_size=HELD_OUT_FRACTION, random_state=SEED,
                                                        stratify=data.target)
    return Split(x_train, y_train, x_held, y_held)


def upscale(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) → (N, 32, 32), bilinear, clipped to [0, 1]."""
    up = F.interpolate(torch.from_numpy(images)[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                       align_corners=False)
    return up[:, 0].clamp(0, 1).numpy()


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """Grey [0, 1] (N, 32, 32) → SD's VAE input: 3 equal channels in [-1, 1]."""
    return torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1) * 2 - 1


# --- the components -------------------------------------------------------------------------------------

def make_untrained(seed: int = SEED):
    """Tokenizer, text encoder, UNet and VAE with SD's structure at digit size, random weights from `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fd.builder.loading import make_tiny_tokenizer
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return tokenizer, text_encoder, unet, vae


@torch.no_grad()
def prompt_embeddings(tokenizer, text_encoder) -> torch.Tensor:
    """(11, 77, width): the ten prompts' last hidden states, then the unconditional one (index 10)."""
    ids = tokenizer([*PROMPTS, UNCONDITIONAL], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# --- training -------------------------------------------------------------------------------------------

def train_vae(vae, images: np.ndarray, steps: int, config: TrainConfig = FULL, seed: int = SEED,
              progress=None) -> list[float]:
    """Reconstruction (MSE) + a light KL term, Adam; returns the loss of every step. Deterministic for `seed`."""
    generator = torch.Generator().manual_seed(seed)
    pixels = to_pixels(images)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    vae.train()
    losses, name = [], "VAE"
    for _ in range(steps):
        batch = pixels[torch.randint(len(pixels), (config.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, batch) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update()
            if len(losses) % 50 == 0:
                progress.set_postfix_str(f"{name} loss {np.mean(losses[-50:]):.4f}", refresh=False)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std of every image (unscaled)."""
    dist = vae.encode(to_pixels(images)).latent_dist
    return dist.mean, dist.std


def train_unet(unet, latent_mean, latent_std, labels, embeddings, steps: int, config: TrainConfig = FULL,
               seed: int = SEED, progress=None):
    """Epsilon prediction on SD's betas with prompt dropout; returns (EMA copy of the UNet, loss per step).

    `latent_mean`/`latent_std` are already multiplied by the scaling factor; `embeddings` is prompt_embeddings()."""
    from diffusers import DDPMScheduler
    noise_schedule = DDPMScheduler.from_config(DDIM_SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine down to 10%
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * min(i, steps) / steps)))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    losses, name = [], "UNet"
    for step in range(steps):
        index = torch.randint(len(labels), (config.batch_size,), generator=generator)
        x0 = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        prompt = torch.where(torch.rand(config.batch_size, generator=generator) < PROMPT_DROPOUT,
                             torch.full_like(labels[index], len(PROMPTS)), labels[index])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(noise_schedule.config.num_train_timesteps, (config.batch_size,), generator=generator)
        prediction = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=embeddings[prompt]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # short memory early, when weights move fast
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), unet.parameters()):
                kept.lerp_(live, 1 - decay)
        losses.append(loss.item())
        if progress is not None:
            progress.update()
            if len(losses) % 50 == 0:
                progress.set_postfix_str(f"{name} loss {np.mean(losses[-50:]):.4f}", refresh=False)
    unet.eval()
    return ema, losses


def train_components(config: TrainConfig = FULL, seed: int = SEED, progress=None):
    """Every part trained from `seed`: fd's Components of the digits model (family sd, DDIM config)."""
    from fd.builder.families.base import Components
    # One thread: the same arithmetic (so the same weights) on any machine, and on a shared 2-core machine two
    # threads were measured 10x slower than one (they spin-wait on each other under load).
    torch.set_num_threads(1)
    split = load_split()
    tokenizer, text_encoder, unet, vae = make_untrained(seed)
    train_vae(vae, split.train_images, config.vae_steps, config, seed, progress)
    mean, std = encode_latents(vae, split.train_images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    embeddings = prompt_embeddings(tokenizer, text_encoder)
    ema, _ = train_unet(unet, mean * scaling, std * scaling, split.train_labels, embeddings, config.unet_steps,
                        config, seed + 1, progress)
    return Components(tokenizer, text_encoder, ema, vae.eval(), dict(DDIM_SCHEDULER_CONFIG))


# --- the cache ------------------------------------------------------------------------------------------

def trainer_fingerprint(config: TrainConfig = FULL) -> str:
    """Short hash of this file's code, the training config and the library versions: a change retrains."""
    import diffusers
    import transformers
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{config} {torch.__version__} {diffusers.__version__} {transformers.__version__}".encode())
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    """$FD_DIGITS_CACHE, else models/ in the source checkout (git-ignored), else ~/.cache/fd/models."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    return checkout / "models" if (checkout / "pyproject.toml").is_file() else Path.home() / ".cache/fd/models"


def trained_folder(config: TrainConfig = FULL) -> Path:
    """The diffusers folder of the trained digits model: reused when this trainer's code made it, else trained
    now (a progress bar on stderr) and saved atomically (a folder appears whole or not at all)."""
    from tqdm import tqdm

    from fd.builder.families import save_pipeline_folder
    folder = cache_root() / f"digits-{trainer_fingerprint(config)}"
    if (folder / "model_index.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as exc:
        raise FdError(f"cannot write the digits model under {folder.parent} ({exc.strerror or exc}): set "
                      f"{CACHE_ENV} to a writable folder") from None
    try:
        with tqdm(total=config.vae_steps + config.unet_steps, unit="step", desc="training digits (VAE, then UNet)",
                  mininterval=2) as bar:
            comps = train_components(config, progress=bar)
        comps.family = "sd"
        save_pipeline_folder(comps, str(staging))
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
