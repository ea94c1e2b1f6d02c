"""Model → diffusers components: resolve an alias, hub id, local folder or `tiny` into loaded modules.

Only what fd exports is loaded (tokenizer, text encoder, UNet, VAE, scheduler config); the safety
checker and feature extractor of a full Stable Diffusion folder are never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import FdError

ALIASES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
}
TINY = "tiny"
SD15_RANDOM = "sd15-random"
TINY_SEED = 0
GENERATED = (TINY, SD15_RANDOM)  # made from configs in code, random weights, fixed seed


@dataclass
class Components:
    """The loaded pieces of a Stable Diffusion pipeline that fd builds engines from."""

    tokenizer: object
    text_encoder: object
    unet: object
    vae: object
    scheduler_config: dict
    source: dict = field(default_factory=dict)  # what was loaded, for the manifest

    def torch_modules(self):
        return {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}


def load_components(model: str) -> Components:
    """Resolve MODEL (alias, hub id, local folder or `tiny`) and load its components on the CPU."""
    if model in GENERATED:
        comps = make_tiny_components() if model == TINY else make_sd15_random_components()
        comps.source = {"model": model, "kind": "generated", "seed": TINY_SEED,
                        "note": "random weights from a config in fd's code; its images are noise"}
    elif Path(model).expanduser().exists() or looks_like_path(model):
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise FdError(f"--model {model}: {'it is a file, not a folder' if path.exists() else 'no such folder'} "
                          f"({path}): give a local diffusers pipeline folder, a hub id such as org/name, "
                          f"or an alias ({', '.join([*ALIASES, *GENERATED])})")
        comps = _load_folder(str(path), what=f"local folder {path}")
        comps.source = {"model": model, "kind": "local", "path": str(path)}
    else:
        repo_id = ALIASES.get(model, model)
        if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
            raise FdError(f"unknown model '{model}': use an alias ({', '.join([*ALIASES, *GENERATED])}), "
                          "a hub id such as org/name, or a local diffusers pipeline folder")
        folder = _hub_snapshot(repo_id, model)
        comps = _load_folder(folder, what=f"hub model {repo_id}")
        comps.source = {"model": model, "kind": "hub", "repo_id": repo_id,
                        "revision": Path(folder).name, "path": folder}
    comps.source["weights_sha256"] = weights_fingerprint(comps)
    return comps


def looks_like_path(model: str) -> bool:
    """A local path rather than a hub id: it starts like a path (./ ../ / ~), has more than one slash
    (hub ids are org/name), or its first part is a folder here. A bare org/name stays a hub id."""
    return (model.startswith((".", "/", "~")) or model.count("/") > 1
            or ("/" in model and Path(model.split("/")[0]).is_dir()))


def _hub_snapshot(repo_id: str, model: str) -> str:
    """The cached snapshot folder of a hub model; fd never downloads (builds run offline)."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, local_files_only=True,
                                 allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except Exception:
        raise FdError(f"model '{model}' ({repo_id}) is not in the local Hugging Face cache and fd does not "
                      "download: fetch it on a connected machine (`hf download " + repo_id + "`) and copy "
                      "the cache here, or pass a local diffusers pipeline folder") from None


def _load_folder(folder: str, what: str) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_libraries()
    for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if not (Path(folder) / sub).is_dir():
            raise FdError(f"{what} has no '{sub}' folder: pass a diffusers Stable Diffusion pipeline folder "
                          "(with tokenizer/, text_encoder/, unet/, vae/, scheduler/)")
    for sub in ("text_encoder", "unet", "vae"):
        if not any(next((Path(folder) / sub).glob(pattern), None) for pattern in ("*.safetensors", "*.bin")):
            raise FdError(f"{what} has no weights in {sub}/ (no .safetensors or .bin file): "
                          "copy the complete model folder, weights included")
    scheduler_config = _read_scheduler_config(Path(folder), what)  # before the slow weight loading
    for sub in ("text_encoder", "unet", "vae"):
        _check_safetensors(Path(folder) / sub)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # RuntimeError / UnpicklingError / EOFError: a damaged .bin (torch pickle) file
        raise FdError(f"cannot load the weights of {what}: {_first_line(exc)} "
                      "(is the folder complete, with its .safetensors files?)") from None
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), scheduler_config)


def _read_scheduler_config(folder: Path, what: str) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FdError(f"{what} has no scheduler/scheduler_config.json: copy the complete model folder, "
                      "scheduler config included")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FdError(f"{path} is not readable JSON ({exc}): copy it again from the model's source") from None
    if not isinstance(config, dict):
        raise FdError(f"{path} is not a scheduler config (a JSON object): copy it again from the model's source")
    return config


def _check_safetensors(folder: Path) -> None:
    """Open every .safetensors header, so a truncated or damaged file is named (the loaders only say "header")."""
    from safetensors import SafetensorError, safe_open
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise FdError(f"{path} is damaged or incomplete ({_first_line(exc)}): copy the file again "
                          "from the model's source") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _quiet_libraries() -> None:
    """Keep diffusers/transformers chatter off stderr, where fd promises one line per error."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)  # failures come back as FdError
    transformers.utils.logging.set_verbosity(transformers.utils.logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()


def weights_fingerprint(comps: Components) -> str:
    """sha256 over every exported module's parameters, so a manifest pins the exact weights."""
    digest = hashlib.sha256()
    for name, module in comps.torch_modules().items():
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# --- tiny: an SD-shaped pipeline small enough for CI --------------------------------------------------

# SD1.5's own scheduler config (PNDM with the scaled-linear betas); the runtime builds DDIM / DPM++ from it.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}
_TINY_WORDS = "a photo of an astronaut riding horse on the moon cat dog painting".split()


def make_tiny_components(seed: int = TINY_SEED) -> Components:
    """A random-weight pipeline with SD1.5's structure (4 UNet levels, 12 skips, 8x VAE) at toy width."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), dict(SD_SCHEDULER_CONFIG))


def make_sd15_random_components(seed: int = TINY_SEED) -> Components:
    """SD1.5's real UNet, VAE and CLIP ViT-L/14 text configs with random weights (no download).

    For benchmarks: the FLOPs and memory of SD1.5, images of noise. The tokenizer is the tiny one (its
    ids fit CLIP's 49408-token vocabulary), so prompts tokenize to different ids than real SD1.5.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), dict(SD_SCHEDULER_CONFIG))


def make_tiny_tokenizer():
    """A CLIP BPE tokenizer with the full byte alphabet and merges for a few words, written locally."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in _TINY_WORDS:  # merge each word left to right: "c a", "ca t</w>"
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        # transformers 5 needs model_max_length set explicitly for max-length padding to work.
        return CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"),
                             model_max_length=77)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-character map, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def save_pipeline_folder(comps: Components, folder: str) -> None:
    """Write components as a diffusers pipeline folder (what `--model DIR` and diffusers load)."""
    import diffusers
    scheduler_class = getattr(diffusers, comps.scheduler_config.get("_class_name", "DDIMScheduler"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=scheduler_class.from_config(comps.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
