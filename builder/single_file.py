"""Single-file checkpoints (fd-build --model FILE.safetensors: DreamBooth and other fine-tunes as they circulate),
read offline by diffusers' `from_single_file` with a local config folder, then loaded as any pipeline folder.

The config folder is `--config FOLDER` (a diffusers pipeline folder; its weights are not read). A checkpoint
holds no tokenizer and fd downloads nothing, so FOLDER must have tokenizer/; any of unet/, vae/, text_encoder/,
scheduler/ and model_index.json it lacks comes from fd's own SD1.5 configs (those of `sd15-random`).
A `.ckpt` (or .pt/.pth/.bin) is a Python pickle, which can run code when loaded: refused unless --allow-pickle.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fd.runtime.errors import FdError

SAFE = (".safetensors",)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
# what a config folder needs besides tokenizer/, and fd's own SD1.5 stand-in for each
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")


def is_single_file(model: str) -> bool:
    path = Path(model).expanduser()
    return path.is_file() and path.suffix.lower() in SAFE + PICKLES


def load_single_file(model: str, config: str | None, allow_pickle: bool):
    """Components of the checkpoint at `model`, through the family the config folder names."""
    from fd.builder.families import family_for_folder
    from fd.builder.loading import first_line, quiet_libraries
    from fd.builder.models import load_folder
    path = Path(model).expanduser().resolve()
    if path.suffix.lower() in PICKLES and not allow_pickle:
        raise FdError(f"--model {model}: a {path.suffix} file is a Python pickle, which can run code when loaded: "
                      "convert it to .safetensors, or pass --allow-pickle if you trust its source")
    if path.suffix.lower() in SAFE:
        _check_safetensors_file(path)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="fd-single-file-") as tmp:
        configs = config_folder(model, config, Path(tmp) / "config")
        family = family_for_folder(configs, f"--config {config}")
        import diffusers
        pipeline_class = getattr(diffusers, family.pipeline_classes[0])
        if not hasattr(pipeline_class, "from_single_file"):
            raise FdError(f"--model {model}: diffusers reads no single-file {family.pipeline_classes[0]} checkpoints: "
                          "convert it to a diffusers folder")
        diffusers.utils.logging.disable_progress_bar()  # stderr holds only fd's one-line errors
        try:
            pipe = pipeline_class.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a checkpoint that does not fit
            raise FdError(f"--model {model}: diffusers cannot load it with the {family.name} configs of "
                          f"{config or 'fd'} ({first_line(exc)[:200]}): is it a {family.pipeline_classes[0]} "
                          "checkpoint? give --config FOLDER of its kind") from None
        finally:
            diffusers.utils.logging.enable_progress_bar()
        folder = Path(tmp) / "pipeline"
        pipe.save_pretrained(str(folder))  # then loaded as every folder is: one loading path, the family's
        del pipe
        comps = load_folder(str(folder), what=f"single-file checkpoint {path.name}")
    from fd.builder.adapt import file_sha256
    comps.source = {"model": model, "kind": "single_file", "path": str(path), "sha256": file_sha256(path),
                    "config": config}
    return comps


def _check_safetensors_file(path: Path) -> None:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise FdError(f"--model {path}: damaged or incomplete .safetensors ({str(exc).splitlines()[0][:120]}): copy "
                      "the file again") from None


def config_folder(model: str, config: str | None, out: Path) -> Path:
    """A folder of configs and tokenizer for from_single_file: --config's, completed with fd's SD1.5 configs."""
    if config is None:
        raise FdError(f"--model {model}: a single-file checkpoint holds no tokenizer and fd downloads nothing: pass "
                      "--config FOLDER, a diffusers pipeline folder of the same kind with tokenizer/ (its weights are "
                      "not read; configs it lacks come from fd's SD1.5 ones)")
    source = Path(config).expanduser()
    if not (source / "tokenizer").is_dir():
        raise FdError(f"--config {config}: {'no tokenizer/ in it' if source.is_dir() else 'no such folder'}: give a "
                      "diffusers pipeline folder with tokenizer/ (and its configs)")
    if all((source / name).is_file() for name in CONFIG_FILES):
        return source
    # copy only configs and tokenizer files (no weights), then fill in fd's SD1.5 configs
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.onnx"))
    for name, content in sd15_configs().items():
        target = out / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(content, indent=2))
    return out


def sd15_configs() -> dict[str, dict]:
    """fd's SD1.5 configs as a diffusers folder holds them."""
    from fd.builder.families.sd import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD_SCHEDULER_CONFIG
    return {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "safety_checker": [None, None], "feature_extractor": [None, None],
                             "requires_safety_checker": False},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **_lists(SD15_UNET_CONFIG)},
        "vae/config.json": {"_class_name": "AutoencoderKL", **_lists(SD15_VAE_CONFIG)},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                     **SD15_TEXT_CONFIG, "bos_token_id": 49406, "eos_token_id": 49407,
                                     "pad_token_id": 49407},
        "scheduler/scheduler_config.json": dict(SD_SCHEDULER_CONFIG),
    }


def _lists(config: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
