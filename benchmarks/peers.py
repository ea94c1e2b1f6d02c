"""Peer arms of fd-bench on the flow transformers (SD3/SD3.5, FLUX.1): diffusers' own cache hooks on diffusers'
own pipeline, run on the same components, prompts, initial latents and run as fd's arms.

The peers the FLUX community picks (issue 25), as diffusers 0.42 ships them (src/diffusers/hooks/):

- `first-block-cache` (FirstBlockCacheConfig, ParaAttention's First Block Cache): the first block always runs;
  when its residual moved less than `threshold` (relative mean |Δ|) since the last full step, the other blocks are
  skipped and their last residual is added instead. Default threshold 0.08 (the FLUX.1-dev figure the issue
  cites: 1.55×; diffusers' own default is 0.05).
- `taylorseer` (TaylorSeerCacheConfig, Liu et al. 2025): every block's attention output is computed at full
  steps and forecast by a Taylor expansion in between. Defaults: the FLUX example of diffusers' docstring
  (cache_interval 5, max_order 1, disable_cache_before_step 3), factors kept in float32.
- `magcache` (MagCacheConfig, Ma et al. 2025): whole transformer passes are skipped while the accumulated error
  predicted from per-step residual magnitude ratios stays under `threshold`. The ratios are checkpoint-dependent:
  fd calibrates them on the benchmarked pipeline itself (`calibrate=True`, one unmeasured generation from other
  initial latents, seed + 1), as diffusers documents for a new model; defaults otherwise (threshold 0.06,
  max_skip_steps 3, retention_ratio 0.2).

A peer is given as NAME or NAME:KEY=VALUE:KEY=VALUE (KEY any field of its config class), e.g.
`--peer first-block-cache:threshold=0.05`.

FluxTransformer2DModel is a diffusers CacheMixin and FluxPipeline opens a cache context per step. In diffusers
0.42.1 SD3Transformer2DModel is not a CacheMixin and StableDiffusion3Pipeline opens no context, although the hooks
know SD3's JointTransformerBlock: for SD3 the transformer is given the mixin (its class extended, nothing else
changes) and each generation runs inside one "cond" context (SD3 runs both guidance halves in one call).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
from dataclasses import dataclass

from fd.runtime.errors import FdError

DEFAULTS = {
    "first-block-cache": {"threshold": 0.08},
    "taylorseer": {"cache_interval": 5, "max_order": 1, "disable_cache_before_step": 3,
                   "taylor_factors_dtype": "float32"},
    "magcache": {},
}
CONFIG_CLASSES = {"first-block-cache": "FirstBlockCacheConfig", "taylorseer": "TaylorSeerCacheConfig",
                  "magcache": "MagCacheConfig"}
FAMILIES = ("flux", "sd3")  # the folders whose diffusers transformer the hooks attach to
# diffusers 0.42.1's First Block Cache takes the text stream's residual at the last block, and SD3's last
# JointTransformerBlock (context_pre_only) returns none: the generation fails with a TypeError.
UNSUPPORTED = {("sd3", "first-block-cache"): "diffusers 0.42.1's First Block Cache fails on SD3's last joint block "
                                             "(it returns no text stream)"}
SET_BY_FD = {"magcache": ("num_inference_steps", "mag_ratios", "calibrate")}  # from the run and the calibration


@dataclass(frozen=True)
class Peer:
    """One peer arm: a diffusers cache technique and the config fields given (the rest: DEFAULTS, then the
    config class's own defaults)."""

    name: str
    options: tuple[tuple[str, object], ...] = ()
    given: str = ""  # as written on the command line

    @property
    def label(self) -> str:
        """The arm's name in fd-bench's tables and JSON: the peer as given."""
        return self.given or self.name

    def fields(self) -> dict:
        return {**DEFAULTS[self.name], **dict(self.options)}


def parse_peer(text: str) -> Peer:
    """NAME[:KEY=VALUE...] → Peer, each KEY checked against the config class, each VALUE a Python literal or a
    word (a torch dtype name, for taylor_factors_dtype)."""
    name, *items = text.split(":")
    if name not in DEFAULTS:
        raise FdError(f"--peer {text}: unknown peer {name!r}; choose from {', '.join(DEFAULTS)}")
    known = {f.name for f in dataclasses.fields(config_class(name))} - set(SET_BY_FD.get(name, ()))
    options = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise FdError(f"--peer {text}: {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a word, e.g. bfloat16
        options.append((key, value))
    return Peer(name, tuple(options), text)


def check_family(peer: Peer, family: str) -> None:
    """A peer that cannot run on the folder's family is one line before anything loads."""
    if family not in FAMILIES:
        raise FdError(f"--peer runs diffusers' transformer cache hooks on SD3 and FLUX.1 folders only; this one is "
                      f"{family}: drop --peer")
    if (family, peer.name) in UNSUPPORTED:
        raise FdError(f"--peer {peer.label}: {UNSUPPORTED[family, peer.name]}: drop it for this folder")


def config_class(name: str):
    import diffusers.hooks
    return getattr(diffusers.hooks, CONFIG_CLASSES[name])


def make_config(peer: Peer, steps: int, calibrate=None):
    """The peer's diffusers config for a `steps`-step generation; `calibrate(config)` runs one generation with a
    config enabled (MagCache's calibration)."""
    import torch
    fields = peer.fields()
    if isinstance(fields.get("taylor_factors_dtype"), str):
        fields["taylor_factors_dtype"] = getattr(torch, fields["taylor_factors_dtype"])
    cls = config_class(peer.name)
    if peer.name == "magcache":
        fields.update(num_inference_steps=steps, mag_ratios=mag_ratios(calibrate, cls(
            calibrate=True, num_inference_steps=steps)))
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise FdError(f"--peer {peer.label}: {CONFIG_CLASSES[peer.name]} refuses it ({e})") from None


def mag_ratios(generate, config) -> list[float]:
    """MagCache's per-step residual magnitude ratios, from one calibrating generation. diffusers prints them
    ("Copy these values to MagCacheConfig(mag_ratios=...)") and then clears its state, so they are read there."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate(config)
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lines:
        raise FdError("the MagCache calibration printed no ratios (has diffusers' MagCache changed?): drop "
                      "--peer magcache")
    return [float(x) for x in ast.literal_eval(lines[-1])]


def with_cache_mixin(transformer):
    """The transformer, given diffusers' CacheMixin when its class lacks it (SD3Transformer2DModel in 0.42.1)."""
    from diffusers.models.cache_utils import CacheMixin
    if not isinstance(transformer, CacheMixin):
        cls = type(transformer)
        transformer.__class__ = type(cls.__name__, (cls, CacheMixin), {"__module__": cls.__module__})
    return transformer


@contextlib.contextmanager
def enabled(transformer, config, own_context: bool):
    """The cache hooks on for one generation (fresh state), off afterwards; `own_context`: the pipeline opens no
    cache context (SD3), so one is open for the whole generation."""
    transformer.enable_cache(config)
    try:
        with transformer.cache_context("cond") if own_context else contextlib.nullcontext():
            yield
    finally:
        transformer.disable_cache()


def counting_linear_flops(transformer) -> list:
    """Adds 2·rows·in·out for every nn.Linear call inside the transformer's blocks to the returned one-item list:
    the block work each arm really did (the peers skip blocks or attention), without timing anything."""
    import torch
    total = [0]

    def count(module, args):
        total[0] += 2 * args[0].numel() * module.out_features
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            module.register_forward_pre_hook(count)
    return total
