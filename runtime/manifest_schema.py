"""What manifest.json must hold, declared as data and checked at load, so a bad key is named exactly.

A schema node is one of:
  int, float, str, dict, list     the JSON type (an int is a float; true/false is neither)
  {key: node}                     an object with these keys; other keys are allowed (records come and go)
  Optional(node)                  as a value in {key: node}: the key may be absent
  Nullable(node)                  the value may be null
  ListOf(node), MapOf(node)       a list, an object, whose every value matches node
  Rule(type, test, expected)      a value of that JSON type (None: any) for which test(value) holds
  FILE                            a path the loader opens: collected, then checked against the folder
Problems are `SchemaError(key_path, problem)`, key_path like `components.denoiser_decoder.batch.max`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from fd.runtime.backends.runner import NUMPY_DTYPES

# The graphs every family's folder lists; the family's own (text encoders) are checked against it by
# runtime/manifest.py, and every listed graph is checked like these.
REQUIRED_COMPONENTS = ("denoiser_encoder", "denoiser_decoder")  # and vae_decoder, but pixel families have none
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}


class SchemaError(ValueError):
    def __init__(self, key_path: str, problem: str):
        super().__init__(f"{key_path or 'the manifest'} {problem}")
        self.key_path = key_path


@dataclass(frozen=True)
class Optional:
    node: Any


@dataclass(frozen=True)
class Nullable:
    node: Any


@dataclass(frozen=True)
class ListOf:
    node: Any


@dataclass(frozen=True)
class MapOf:
    node: Any
    required: tuple = ()


@dataclass(frozen=True)
class Rule:
    node: type | None
    test: Callable[[Any], bool]
    expected: str


class File:
    """A path the runtime opens; `check` returns every one it meets, for the loader to check on disk."""


FILE = File()


def bounded(low, high, kind=int, what=None):
    """A number from low to high (NaN and infinities fail): every number the runtime sizes buffers or loops by."""
    what = what or ("a positive integer" if low >= 1 else "an integer")
    show = lambda x: f"{x:g}" if isinstance(x, float) else f"{x:_}".replace("_", " ")  # noqa: E731
    return Rule(kind, lambda v: low <= v <= high, f"{what} from {show(low)} to {show(high)}")


# Bounds far above any real model (SDXL: 1024 px, 4 latent channels, 1000 train steps; FLUX: 16 channels) and
# far below what would hang fd or exhaust memory before a check could say why.
MAX_SIDE = 16384  # pixels
POSITIVE = Rule(int, lambda v: 0 < v < 2**31, "a positive integer")
COUNT = Rule(int, lambda v: 0 <= v < 2**31, "an integer of 0 or more")
BYTES = Rule(int, lambda v: 0 <= v < 2**50, "a byte count of 0 or more")  # weight files pass 2 GiB (external data)
SCALE = bounded(1e-6, 1e3, float, "a number")
DIM = Rule(None, lambda v: v == "batch" or (_is(v, int) and 0 < v <= 2**20),
           'a positive integer (at most 2^20) or "batch"')
SIDE = bounded(1, MAX_SIDE)
FINITE = bounded(-1e6, 1e6, float, "a number")
BETA = bounded(0, 1, float, "a number")
NAME = Rule(str, lambda v: "\x00" not in v, "a string without NUL characters")
TENSOR = {"name": NAME, "dtype": Rule(str, lambda v: v in NUMPY_DTYPES, f"one of {', '.join(NUMPY_DTYPES)}"),
          "shape": ListOf(DIM), "axes": ListOf(Nullable(str))}
TOKENIZER = {"file": FILE, "max_length": bounded(1, 65536), "pad_token_id": bounded(0, 2**24),
             "expansions": Optional(MapOf(str))}  # textual inversion's multi-vector tokens (builder/adapt.py)
# ONNX Runtime folders: the graph as ONNX Runtime optimized it at build time, and its weights file
# (builder/onnxruntime_build.py); used only on the CPU they were made for (backend_info.optimized_graphs)
OPTIMIZED_GRAPH = {"file": FILE, "data": Optional(FILE)}
OPTIMIZED_GRAPHS = {"level": str, "provider": str, "onnxruntime": str, "cpu": {"machine": str, "isa": ListOf(str)}}
BATCH = bounded(1, 2**16)
COMPONENT = {"file": FILE, "inputs": ListOf(TENSOR), "outputs": ListOf(TENSOR),
             "batch": {"min": BATCH, "opt": BATCH, "max": BATCH}, "optimized": Optional(OPTIMIZED_GRAPH)}
# fd-calibrate's entries (runtime/calibrated_steps.py checks the rest: order, windows, one per scheduler and steps)
STEP_COUNT = Rule(int, lambda v: 1 <= v <= 1000, "a step count from 1 to 1000")
STEP_INDEX = Rule(int, lambda v: 0 <= v < 1000, "a step index from 0 to 999")
DRIFT = Rule(float, lambda v: 0 <= v <= 1e3, "a relative drift from 0 to 1000")  # NaN and inf fail
CALIBRATION = {"scheduler": str, "steps": STEP_COUNT, "key_steps": ListOf(STEP_INDEX), "mean_drift": DRIFT,
               "worst_drift": Optional(DRIFT), "paper_mean_drift": Optional(DRIFT),
               "samples": Optional(Rule(int, lambda v: 1 <= v <= 100_000, "a sample count from 1 to 100000"))}
CONTROLNET = {"graph": str, "source": dict, "conditioning_channels": bounded(1, 64), "conditioning_size": ListOf(SIDE)}
# The numbers of a diffusers scheduler_config.json the schedulers size tables or loops by; other keys are the
# schedulers' own (fd.runtime.schedulers checks their names and kinds).
SCHEDULER_CONFIG = {"num_train_timesteps": Optional(bounded(1, 100_000)), "steps_offset": Optional(bounded(0, 1000)),
                    "beta_start": Optional(BETA), "beta_end": Optional(BETA),
                    "trained_betas": Optional(Nullable(ListOf(BETA))),
                    "shift": Optional(FINITE), "base_shift": Optional(FINITE), "max_shift": Optional(FINITE),
                    "original_inference_steps": Optional(bounded(1, 100_000))}
MANIFEST = {
    "manifest_version": int,
    "backend": str,
    "precision": str,
    "source": Optional(dict),
    "height": SIDE, "width": SIDE,
    "vae_scale_factor": bounded(1, 64), "latent_channels": bounded(1, 1024),
    "frames": Optional(bounded(1, 1024)),  # video folders: frames per video (fd-build --frames)
    "dynamic_shape": Optional(Nullable({"min": SIDE, "max": SIDE})),
    "vae_scaling_factor": SCALE,
    "limits": {"max_batch_size": bounded(1, 1024), "max_window": bounded(1, 1000)},
    "scheduler_config": SCHEDULER_CONFIG,
    "family": str,
    "family_options": {"num_classes": Optional(bounded(1, 1_000_000))},
    "tokenizers": ListOf(TOKENIZER),  # one per text graph (SDXL: two)
    "cache": ListOf(str),
    "components": MapOf(COMPONENT, required=REQUIRED_COMPONENTS),
    # ONNX Runtime's keys (builder/onnxruntime_build.py); other backends keep their own
    "backend_info": Optional({"optimized_graphs": Optional(OPTIMIZED_GRAPHS), "file_bytes": Optional(MapOf(BYTES))}),
    "flops_per_sample": Optional(MapOf(float)),
    "controlnets": Optional(ListOf(CONTROLNET)),  # fd-build --controlnet, in the order they apply
    "calibrated_key_steps": Optional(ListOf(CALIBRATION)),  # fd-calibrate, one entry per (scheduler, steps)
}


def check(value, node=MANIFEST, key_path: str = "") -> list[tuple[str, str]]:
    """Raise SchemaError at the first mismatch; return the FILE values as (key_path, path)."""
    files: list[tuple[str, str]] = []
    _check(value, node, key_path, files)
    return files


def _check(value, node, key_path: str, files: list) -> None:
    if isinstance(node, Nullable):
        if value is not None:
            _check(value, node.node, key_path, files)
    elif isinstance(node, Rule):
        if (node.node is not None and not _is(value, node.node)) or not node.test(value):
            raise SchemaError(key_path, f"is {_show(value)}, expected {node.expected}")
    elif isinstance(node, File):
        _check(value, NAME, key_path, files)
        files.append((key_path, value))
    elif isinstance(node, (dict, MapOf)):
        _check(value, dict, key_path, files)
        if isinstance(node, MapOf):
            required = node.required
        else:
            required = [key for key, item_node in node.items() if not isinstance(item_node, Optional)]
        for key in required:
            if key not in value:
                raise SchemaError(_join(key_path, key), "is missing")
        for key, item in value.items():
            item_node = node.node if isinstance(node, MapOf) else node.get(key)
            if isinstance(item_node, Optional):
                item_node = item_node.node
            if item_node is not None:  # keys the schema does not name are informational
                _check(item, item_node, _join(key_path, key), files)
    elif isinstance(node, ListOf):
        _check(value, list, key_path, files)
        for index, item in enumerate(value):
            _check(item, node.node, f"{key_path}[{index}]", files)
    elif not _is(value, node):
        raise SchemaError(key_path, f"is {_show(value)}, expected {TYPE_NAMES[node]}")


def _is(value, json_type) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never to a manifest
        return False
    return isinstance(value, (int, float) if json_type is float else json_type)


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else TYPE_NAMES[type(value)]
    return text if len(text) <= 40 else text[:37] + "..."
