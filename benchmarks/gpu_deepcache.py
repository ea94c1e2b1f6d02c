"""The DeepCache arm of benchmarks/gpu.sh: diffusers' pipeline with and without DeepCache, timed in one run.

DeepCache (Ma et al., CVPR 2024) is the training-free UNet peer the paper compares with: every `interval`-th
step runs the whole UNet, the others only its shallow branch, reusing the deep features of the last full step.
This runs the authors' own package (PyPI `DeepCache`, DeepCacheSDHelper) on the same weights, scheduler, prompt
and initial latents as the engine folder's fd-bench runs, so its time sits beside fd's in the same report;
plain diffusers is timed in the same process, in alternation, for the ratio.

  python -m fd.benchmarks.gpu_deepcache --engine-dir ENGINE --steps 50 --interval 3 --json deepcache.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from fd.runtime.cli_common import run_cli
from fd.runtime.errors import FdError

PROMPT = "a photo of an astronaut riding a horse on mars"


def make_pipe(manifest: dict, scheduler: str, device: str):
    """diffusers' pipeline of the folder's family on the weights it was built from (SD-family folders only:
    DeepCacheSDHelper wraps an SD UNet's blocks), on `device` in the folder's precision there."""
    import torch
    from fd.builder.families import FAMILIES
    from fd.builder.models import load_components
    from fd.runtime.schedulers import diffusers_scheduler
    if manifest["family"] != "sd":
        raise FdError(f"the DeepCache arm runs SD folders only; this one is {manifest['family']}")
    source = manifest["source"]
    comps = load_components(source["model"] if source.get("kind") == "generated" else source["path"])
    family = FAMILIES[comps.family]
    pipe = family.diffusers_pipeline(comps, diffusers_scheduler(scheduler, manifest["scheduler_config"]))
    dtype = torch.float16 if device == "cuda" and manifest["precision"] == "fp16" else torch.float32
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe, dtype


def timed(run, device: str) -> float:
    import torch
    started = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(engine_dir: str, steps: int, interval: int, runs: int, warmup: int, scheduler: str = "ddim") -> dict:
    import torch
    from DeepCache import DeepCacheSDHelper
    from fd.runtime.manifest import load_manifest
    from fd.runtime.pipeline import initial_noise
    manifest = load_manifest(engine_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family, pipe, dtype = make_pipe(manifest, scheduler, device)
    height, width = manifest["height"], manifest["width"]
    scale = manifest["vae_scale_factor"]
    latents = torch.from_numpy(initial_noise(0, (1, manifest["latent_channels"], height // scale, width // scale)))
    latents = latents.to(device, dtype)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)

    def generate():
        with torch.inference_mode():
            return family.diffusers_call(pipe, [PROMPT], latents, steps=steps, guidance_scale=7.5, height=height,
                                         width=width)

    def deepcache():
        helper.enable()  # enable() resets DeepCache's step state: each generation starts with a full pass
        try:
            return generate()
        finally:
            helper.disable()

    arms = {"diffusers": generate, f"deepcache-{interval}": deepcache}
    seconds = {name: [] for name in arms}
    finals = {}
    for phase in ["warmup"] * warmup + ["measure"] * runs:
        for name, run in arms.items():
            holder = {}
            took = timed(lambda: holder.update(out=run()), device)
            finals[name] = holder["out"][1].float().cpu().numpy()
            if phase == "measure":
                seconds[name].append(took)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    reference, cached = finals["diffusers"], finals[f"deepcache-{interval}"]
    return {"schema": "fd-gpu-deepcache/1", "engine_dir": str(engine_dir), "device": device, "dtype": str(dtype),
            "steps": steps, "scheduler": scheduler, "interval": interval, "cache_branch_id": 0, "prompt": PROMPT,
            "height": height, "width": width, "runs": runs, "warmup": warmup, "order": "alternating, warm-up first",
            "arms": {name: {"seconds": seconds[name], "median_seconds": medians[name]} for name in arms},
            "speedup": medians["diffusers"] / medians[f"deepcache-{interval}"],
            # how far DeepCache's final latents move from diffusers' (its approximation, not an error)
            "final_latent_rel_diff": float(np.abs(cached - reference).max() / max(np.abs(reference).max(), 1e-12))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fd.benchmarks.gpu_deepcache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--interval", type=int, default=3, help="DeepCache's cache_interval (a full UNet every N steps)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)

    def job():
        from fd.benchmarks import report
        try:
            import DeepCache  # noqa: F401
        except ImportError:
            raise FdError("the DeepCache arm needs the DeepCache package: pip install DeepCache==0.1.1") from None
        if args.interval < 1 or args.runs < 1 or args.steps < 1:
            raise FdError("--interval, --runs and --steps must be 1 or more")
        result = measure(args.engine_dir, args.steps, args.interval, args.runs, args.warmup)
        for name, arm in result["arms"].items():
            print(f"{name}: {arm['median_seconds']:.3f} s/image (median of {len(arm['seconds'])})")
        print(f"DeepCache over diffusers: {result['speedup']:.2f}x")
        if args.json:
            report.write_json(args.json, result)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
