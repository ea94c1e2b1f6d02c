"""Baseline vs FasterDiffusion on a DiT engine folder, with fd-bench's own measurement core and report.

fd-bench's command line speaks text prompts and SD's defaults (guidance 7.5, noise injection tau 500); a DiT
folder takes class labels, DiTPipeline's guidance 4.0 and the DiT tau 300. This runs benchmarks.bench's
run_benchmark (arms alternated on the same latents, the FLOP floor, PSNR/SSIM) with those, and writes the
same table, JSON and Markdown as fd-bench:

  python -m benchmarks.dit_bench --engine-dir engines/dit-xl-random-fp32-onnxruntime --class-label 207 \
      --steps 50 --runs 2 --warmup 1 --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time

from benchmarks import report
from benchmarks.bench import Settings, run_benchmark
from runtime.cli_common import run_cli
from runtime.errors import FdError

SCHEMA = "fd-bench/1"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dit_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="a DiT engine folder made by fd-build")
    p.add_argument("--class-label", default="207", help="class id or id2label name, repeated --batch-size times")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--guidance-scale", type=float, help="default: the family's (DiT 4.0)")
    p.add_argument("--key-steps", help="FD arm: comma-separated key steps (default: the paper's set for --steps)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def job():
        from benchmarks.cli import engine_info, settings_info
        from runtime.pipeline import FasterDiffusionPipeline
        from runtime.policy import policy_from_options
        started = time.perf_counter()
        pipe = FasterDiffusionPipeline(args.engine_dir)
        load_seconds = time.perf_counter() - started
        if not pipe.family.class_conditional:
            raise FdError(f"{args.engine_dir} is a {pipe.family.name} folder: use fd-bench for text-to-image models")
        policy = policy_from_options(args.steps, pipe.manifest["limits"]["max_window"], key_steps=args.key_steps,
                                     noise_injection_tau=pipe.family.noise_injection_tau)
        guidance = pipe.family.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
        height, width = pipe.image_size(None, None)
        settings = Settings(prompt=args.class_label, steps=args.steps, scheduler=args.scheduler,
                            batch_size=args.batch_size, guidance_scale=guidance, runs=args.runs, warmup=args.warmup,
                            seed=args.seed, height=height, width=width)
        measured = run_benchmark(pipe, settings, policy)
        result = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join(["python", "-m", "benchmarks.dit_bench", *argv]),
                  "complete": measured.pop("complete"), "machine": report.machine_info(),
                  "versions": report.library_versions(), "fd_revision": report.source_revision(),
                  "engine": engine_info(pipe), "settings": settings_info(settings, policy),
                  "load": {"engine_seconds": load_seconds}, **measured}
        pipe.close()
        print(report.format_table(result), end="")
        for path, write in ((args.json, report.write_json),
                            (args.markdown, lambda p, r: report.write_text(p, report.format_markdown(r)))):
            if path is not None:
                write(path, result)
                print(f"wrote {path}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
