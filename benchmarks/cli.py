"""fd-bench: baseline vs FasterDiffusion (and optionally diffusers) on one engine folder, run alternately."""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from fd.benchmarks import report
from fd.benchmarks.bench import DEFAULT_CLASS_LABEL, DEFAULT_PROMPT, Settings, run_benchmark
from fd.benchmarks.lora_swap import check_lora_bench, measure_swaps
from fd.benchmarks.quality_report import add_quality_arguments, main_quality
from fd.runtime.atomic import check_writable
from fd.runtime.cli import add_image_input_arguments, check_engine_dir
from fd.runtime.cli_common import run_cli
from fd.runtime.errors import FdError
from fd.runtime.schedulers import CHOICES, DEFAULT, choices_help

SCHEMA = "fd-bench/1"
EXAMPLES = """examples:
  fd-bench --engine-dir engines/tiny-fp32-onnxruntime --steps 20 --runs 3
  fd-bench --engine-dir engines/sd15-fp16-tensorrt --compare diffusers --json bench.json --plot stages.png
  fd-bench --engine-dir engines/sd15-fp16-tensorrt --steps 20 --scheduler dpmpp-2m --uniform 4
  fd-bench --engine-dir engines/sd15-control --control-image edges.png --controlnet-scale 0.8 --compare diffusers
  fd-bench --engine-dir engines/dit-xl-random-fp32-onnxruntime --class-label 207 --runs 2 --warmup 1
  fd-bench --engine-dir engines/tiny-pixart-fp32-onnxruntime --steps 20 --compare diffusers
  fd-bench --engine-dir engines/tiny-flux-fp32-onnxruntime --steps 28 --peer first-block-cache --peer magcache
  fd-bench --engine-dir engines/digits-fp32-onnxruntime --quality --json quality.json --grid quality.png
  fd-bench --engine-dir engines/tiny-refit --lora style.safetensors:0.8 --steps 20   # + LoRA apply/remove times
"""


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fd-bench", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="engine folder made by fd-build")
    p.add_argument("--prompt", help=f"text-to-image folders: the prompt, repeated --batch-size times (default "
                                    f"{DEFAULT_PROMPT!r})")
    p.add_argument("--class-label", metavar="LABEL",
                   help="class-conditional folders (DiT): a class id or a name from the model's id2label, repeated "
                        f"--batch-size times (default {DEFAULT_CLASS_LABEL}, ImageNet's golden retriever; class 0 "
                        f"for a model with {DEFAULT_CLASS_LABEL} classes or fewer)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", choices=CHOICES, default=DEFAULT, metavar="NAME", help=f"sampler: {choices_help()}")
    p.add_argument("--batch-size", type=int, default=1, help="images per generation (default 1)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, 1 or less: off (default: "
                   "the folder's model family's: 7.5 for SD/SDXL, 4.0 for DiT, 4.5 for PixArt-α)")
    p.add_argument("--height", type=int, help="image height (default: the folder's; others need --dynamic-shape)")
    p.add_argument("--width", type=int, help="image width (default: the folder's; others need --dynamic-shape)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one set of initial latents all arms share")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key-steps", help="FD arm: comma-separated step indices that run the denoiser encoder "
                                          "(default: the paper's set for --steps)")
    keys.add_argument("--uniform", type=int, metavar="K", help="FD arm: a key step every K steps")
    p.add_argument("--guidance-interval", metavar="LOW,HIGH", help="FD arm: classifier-free guidance only for sigma "
                   "in (LOW, HIGH], conditional rows alone elsewhere; 'paper' = 0.28,5.42 (default: every step)")
    add_image_input_arguments(p, "every arm takes them as fd-run does; the baseline runs the ControlNets at every "
                                 "step, FD at key steps only")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="run-time LoRA (a folder built with fd-build --refittable): report the time to apply and to "
                        "remove it (--runs times each), then run the arms with it applied; repeat for several")
    p.add_argument("--runs", type=int, default=5, help="measured runs per arm (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured runs per arm first (default 2)")
    p.add_argument("--compare", choices=["diffusers"], help="add diffusers' own pipeline of the folder's family "
                   "(StableDiffusionPipeline, StableDiffusionXLPipeline, DiTPipeline, PixArtAlphaPipeline; the "
                   "ControlNet pipelines with --control-image) as a third arm")
    p.add_argument("--peer", action="append", default=[], metavar="NAME[:KEY=VALUE...]",
                   help="SD3/FLUX folders: add a peer arm, diffusers' own cache hook on diffusers' pipeline "
                        "(implies --compare diffusers; repeat for several): first-block-cache, taylorseer, magcache; "
                        "KEY=VALUE sets a field of its diffusers config (docs/sd3-flux.md)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="fd's arms replay each (graph, input shapes) as a CUDA graph, as fd-run --cuda-graphs")
    p.add_argument("--json", metavar="FILE", help="write every figure, the machine and the settings as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write a Markdown table block (for benchmarks/RESULTS.md)")
    p.add_argument("--plot", metavar="FILE.png", help="draw per-stage stacked bars per arm (needs matplotlib)")
    add_quality_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.quality:  # image quality per arm on the digits model (benchmarks/quality.py)
        return run_cli(lambda: main_quality(args, argv))

    def job():
        from fd.benchmarks.bench import check_settings, default_inputs, resolved
        from fd.benchmarks.peers import parse_peer
        from fd.runtime.cli import request_from_args
        from fd.runtime.pipeline import EngineFolder, FasterDiffusionPipeline
        check_engine_dir(args.engine_dir)
        if args.plot:  # fail now, not after the runs
            report.require_matplotlib()
            if Path(args.plot).suffix.lower() != ".png":
                raise FdError(f"--plot {args.plot} must end in .png")
        for option, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
            if path is not None:  # before the engines load and minutes of runs
                check_writable(path, option)
        # The whole request against the folder, in fd-run's words, before the engines load: a ControlNet folder
        # without --control-image (or --prompt on a DiT folder) is one line, not minutes later.
        folder = EngineFolder(args.engine_dir)
        request = request_from_args(args, **default_inputs(folder.manifest, args.prompt, args.class_label,
                                                           args.batch_size))
        peer_arms = tuple(parse_peer(text) for text in args.peer)
        settings = Settings(request, runs=args.runs, warmup=args.warmup,
                            compare_diffusers=args.compare == "diffusers" or bool(peer_arms), peers=peer_arms)
        check_lora_bench(request.loras, settings.compare_diffusers)
        plan = check_settings(folder, settings)
        settings = resolved(settings, plan)  # the JSON records the size and guidance scale the arms ran with
        started = time.perf_counter()
        pipe = FasterDiffusionPipeline(args.engine_dir, **({"cuda_graphs": True} if args.cuda_graphs else {}))
        load_seconds = time.perf_counter() - started  # the folder's cold start: manifest, every graph, tokenizers
        swaps = measure_swaps(pipe, request.loras, args.runs) if request.loras else None  # ends applied
        measured = run_benchmark(pipe, settings,
                                 progress=lambda total: tqdm(total=total, unit="run", desc="fd-bench", leave=False))
        result = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": shlex.join(["fd-bench", *argv]), "complete": measured.pop("complete"),
                  "machine": report.machine_info(), "versions": report.library_versions(),
                  "fd_revision": report.source_revision(),
                  "engine": engine_info(pipe), "settings": settings_info(settings, plan.policy, argv_images(args)),
                  "load": {"engine_seconds": load_seconds,
                           "what": "FasterDiffusionPipeline(engine_dir): manifest, runner with every graph, tokenizers"},
                  **measured, **({"lora": swaps} if swaps else {})}
        pipe.close()
        print(report.format_table(result), end="")
        for path, write in ((args.json, report.write_json), (args.markdown, write_markdown),
                            (args.plot, report.write_plot)):
            if path is not None:
                write(path, result)
                print(f"wrote {path}")
        if not result["complete"]:
            raise KeyboardInterrupt  # what was measured is out; the exit status still says "interrupted"

    return run_cli(job)


def write_markdown(path: str, result: dict) -> None:
    report.write_text(path, report.format_markdown(result))


def engine_info(pipe) -> dict:
    m = pipe.manifest
    split_block = (m.get("family_options") or {}).get("split_block")  # transformer families: split at this block
    return {"dir": str(pipe.engine_dir), "family": m.get("family"), "split_block": split_block, "backend": m["backend"],
            "precision": m["precision"], "providers": getattr(pipe.runner, "providers", None),
            "model": m["source"].get("model"), "model_kind": m["source"].get("kind"),
            "height": m["height"], "width": m["width"], "dynamic_shape": m.get("dynamic_shape"),
            "frames": m.get("frames"),  # video folders: frames per video (s/image is then s/video)
            "max_batch_size": m["limits"]["max_batch_size"], "max_window": m["limits"]["max_window"],
            "flops_per_sample": m.get("flops_per_sample"), "built": m.get("created"),
            "controlnets": [{"graph": r["graph"], "model": r["source"].get("model")} for r in m.get("controlnets") or []],
            "img2img": "vae_encoder" in m["components"]}


def argv_images(args) -> dict:
    """The image inputs as given on the command line (paths), for the record."""
    return {"control_images": args.control_image, "controlnet_scales": args.controlnet_scale,
            "init_image": args.init_image, "strength": args.strength}


def settings_info(s: Settings, policy, images: dict | None = None) -> dict:
    order = ["baseline", "fasterdiffusion", *(["diffusers"] if s.compare_diffusers else []),
             *(peer.label for peer in s.peers)]
    r = s.request
    return {"prompt": r.prompts[0] if r.prompts else None, "class_label": r.class_labels[0] if r.class_labels else None,
            "batch_size": s.batch_size, "height": r.height, "width": r.width, "steps": r.steps,
            "steps_run": r.steps_run, "scheduler": r.scheduler, "guidance_scale": r.guidance_scale, "seed": r.seed,
            "runs": s.runs, "warmup": s.warmup, "order": f"alternating {' / '.join(order)}, warm-up runs first",
            **(images or {}), **policy.describe()}


if __name__ == "__main__":
    sys.exit(main())
