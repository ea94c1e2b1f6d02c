"""fd-calibrate: choose an engine folder's key steps from where its denoiser encoder's outputs move.

Runs the baseline (every step a key step) on a few prompts (class labels for DiT) through the folder's own
graphs, measures the drift of the encoder's outputs between every pair of steps (runtime/drift.py), chooses the
key steps that minimise the mean drift the decoder sees (runtime/key_step_choice.py), and writes them into the
folder's manifest under (scheduler, steps) (runtime/calibrated_steps.py). fd-run then uses them by default for
that scheduler and step count (--key-steps paper forces the paper's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fd.runtime.atomic import check_writable, write_atomic
from fd.runtime.cli_common import run_cli
from fd.runtime.errors import FdError
from fd.runtime.schedulers import CHOICES, DEFAULT, choices_help

EXAMPLES = """examples:
  fd-calibrate --engine-dir engines/sd15-fp16-tensorrt                       # DDIM-50, as many keys as the paper's 9
  fd-calibrate --engine-dir engines/sd15-fp16-tensorrt --steps 20 --scheduler dpmpp-2m --num-key-steps 6
  fd-calibrate --engine-dir engines/tiny-fp32-onnxruntime --max-drift 0.05 --plot drift.png
  fd-calibrate --engine-dir engines/tiny-dit-fp32-onnxruntime --prompts labels.txt   # DiT: one class label a line
"""
# Varied subjects and styles, so the drift is not one prompt's (used when --prompts is not given).
DEFAULT_PROMPTS = ("a photo of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
                   "a close-up photo of a tabby cat", "a bowl of fruit on a wooden table, still life",
                   "a city street at night in the rain", "a portrait of an old man, oil painting",
                   "a snowy mountain landscape at sunrise", "a red sports car, studio lighting")
MAX_SAMPLES = 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fd-calibrate", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="engine folder made by fd-build (its manifest gets the result)")
    p.add_argument("--scheduler", choices=CHOICES, default=DEFAULT, metavar="NAME",
                   help=f"the sampler to calibrate for: {choices_help()}")
    p.add_argument("--steps", type=int, default=50, help="the step count to calibrate for (default 50)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--num-key-steps", type=int, metavar="K",
                        help="choose at most K key steps (default: as many as the paper's set has at these steps)")
    budget.add_argument("--max-drift", type=float, metavar="X",
                        help="choose the fewest key steps whose mean drift is at most X (relative L2, e.g. 0.05)")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one a line (class labels for DiT; default: eight "
                                                     "built-in prompts, or evenly spread class ids)")
    p.add_argument("--samples", type=int, default=8, help="images to measure, prompts repeated as needed (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch's noise; later batches add 1")
    p.add_argument("--guidance-scale", type=float, help="as fd-run (default: the model family's)")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw the drift curve and the chosen key steps (needs matplotlib)")
    p.add_argument("--dry-run", action="store_true", help="print the choice, leave the manifest as it is")
    return p.parse_args(argv)


def read_prompts(path: str | None, family, options: dict, samples: int) -> list:
    """`samples` prompts: the file's lines (or the defaults) repeated in order."""
    if path is not None:
        try:
            prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise FdError(f"cannot read --prompts {path} ({exc}): give a text file with one prompt a line") from None
        if not prompts:
            raise FdError(f"--prompts {path} holds no prompts: write one prompt (or class label) a line")
    elif family.class_conditional:
        count = int(options["num_classes"])
        prompts = sorted({j * count // samples for j in range(samples)})
    else:
        prompts = list(DEFAULT_PROMPTS)
    return [prompts[j % len(prompts)] for j in range(samples)]


def check_options(args) -> None:
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise FdError(f"--samples {args.samples} is out of range: use 1 to {MAX_SAMPLES}")
    if args.num_key_steps is not None and not 1 <= args.num_key_steps <= args.steps:
        raise FdError(f"--num-key-steps {args.num_key_steps} is out of range: use 1 to --steps ({args.steps})")
    if args.max_drift is not None and not (np.isfinite(args.max_drift) and args.max_drift >= 0):
        raise FdError(f"--max-drift {args.max_drift} is not allowed: give a finite relative drift of 0 or more, "
                      "e.g. 0.05")
    if args.plot is not None:
        if Path(args.plot).suffix.lower() != ".png":
            raise FdError(f"--plot {args.plot} must end in .png")
        check_writable(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FdError("--plot needs matplotlib: pip install matplotlib (or drop --plot)") from None


def uniform_set(steps: int, count: int) -> tuple[int, ...]:
    """`count` key steps spread evenly over `steps` (the comparison's uniform set of the same size)."""
    return tuple(sorted({j * steps // count for j in range(count)}))


def key_of_each_step(keys, steps: int) -> list[int]:
    key, result = 0, []
    for i in range(steps):
        key = i if i in keys else key
        result.append(key)
    return result


def format_curve(drift, timesteps, adjacent, chosen, paper) -> str:
    chosen_key, paper_key = key_of_each_step(chosen, len(drift)), key_of_each_step(paper, len(drift))
    rows = [f"{'step':>4} {'timestep':>9} {'drift from previous':>20} {'seen (calibrated)':>18} "
            f"{'seen (paper)':>13}  keys"]
    for i, t in enumerate(timesteps):
        marks = ("C" if i in chosen else " ") + ("P" if i in paper else " ")
        rows.append(f"{i:>4} {t:>9.4g} {adjacent[i]:>20.5f} {drift[chosen_key[i], i]:>18.5f} "
                    f"{drift[paper_key[i], i]:>13.5f}  {marks}")
    rows.append("keys: C calibrated, P the paper's; drift: relative L2 of the encoder's outputs (cache tensors), "
                "averaged over samples and tensors")
    return "\n".join(rows)


def draw(path: str, drift, adjacent, chosen, paper, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = np.arange(len(drift))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(steps[1:], adjacent[1:], marker=".", color="black")
    top.set_ylabel("drift from previous step")
    top.set_title(title)
    for keys, style, name, axis in ((chosen, "-", "calibrated", top), (paper, "--", "paper", top)):
        for n, k in enumerate(keys):
            axis.axvline(k, linestyle=style, color="tab:blue" if name == "calibrated" else "tab:orange",
                         alpha=0.5, label=name if n == 0 else None)
    top.legend()
    for keys, name in ((chosen, "calibrated"), (paper, "paper")):
        seen = [drift[k, i] for i, k in enumerate(key_of_each_step(keys, len(drift)))]
        bottom.plot(steps, seen, marker=".", label=f"{name} {list(keys)}")
    bottom.set_xlabel("step")
    bottom.set_ylabel("drift the decoder sees")
    bottom.legend(fontsize="small")
    figure.tight_layout()
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        from fd.runtime import key_step_choice as choice
        from fd.runtime.calibrated_steps import write_calibration
        from fd.runtime.drift import measure_drift
        from fd.runtime.pipeline import FasterDiffusionPipeline
        from fd.runtime.policy import default_key_steps
        from fd.runtime.request import MAX_STEPS
        from fd.runtime.schedulers import resolve_name
        if not 1 <= args.steps <= MAX_STEPS:
            raise FdError(f"--steps {args.steps} is out of range: use 1 to {MAX_STEPS}")
        check_options(args)
        if Path(args.engine_dir).is_file():
            raise FdError(f"--engine-dir {args.engine_dir} is a file, not a folder: give the engine folder fd-build "
                          "wrote (the one holding manifest.json)")
        pipe = FasterDiffusionPipeline(args.engine_dir)
        manifest, max_window = pipe.manifest, pipe.manifest["limits"]["max_window"]
        scheduler = resolve_name(args.scheduler, manifest["scheduler_config"])
        paper = default_key_steps(args.steps)
        budget = len(paper) if args.num_key_steps is None else args.num_key_steps
        if args.max_drift is None:
            choice.check_budget(budget, args.steps, max_window)  # before the long run
        prompts = read_prompts(args.prompts, pipe.family, manifest.get("family_options", {}), args.samples)
        per_call = manifest["limits"]["max_batch_size"]
        batches = [prompts[j:j + per_call] for j in range(0, len(prompts), per_call)]
        pipe.prepare(pipe.as_request(batches[0], steps=args.steps, scheduler=scheduler,
                                     guidance_scale=args.guidance_scale, seed=args.seed))  # fd-run's checks
        print(f"measuring {len(prompts)} baseline samples, {scheduler} {args.steps} steps, in {len(batches)} "
              f"generation(s)", file=sys.stderr)
        drift, timesteps, adjacent = measure_drift(
            pipe, batches, steps=args.steps, scheduler=scheduler, seed=args.seed, guidance_scale=args.guidance_scale,
            progress=lambda done, total: print(f"  {done}/{total} generations", file=sys.stderr))
        if args.max_drift is None:
            chosen = choice.choose_key_steps(drift, budget, max_window)
        else:
            chosen = choice.fewest_key_steps(drift, args.max_drift, max_window)
        print(format_curve(drift, timesteps, adjacent, chosen, paper))
        uniform = uniform_set(args.steps, len(chosen))
        for name, keys in (("calibrated", chosen), ("paper", paper), ("uniform", uniform)):
            print(f"{name + ':':<12} {len(keys):>2} key steps {list(keys)}  mean drift "
                  f"{choice.mean_drift(drift, keys):.5f}  worst step {choice.worst_drift(drift, keys):.5f}")
        if args.max_drift is None and len(chosen) < budget:
            print(f"note: {len(chosen)} key steps, not {budget}: no further key step lowers the mean drift")
        if args.plot is not None:
            draw(args.plot, drift, adjacent, chosen, paper, f"{Path(args.engine_dir).name}: {scheduler}, "
                                                            f"{args.steps} steps, {len(prompts)} samples")
            print(f"wrote {args.plot}")
        if args.dry_run:
            print("dry run: the manifest is unchanged")
            return
        write_calibration(args.engine_dir, {
            "scheduler": scheduler, "steps": args.steps, "key_steps": list(chosen),
            "mean_drift": choice.mean_drift(drift, chosen), "worst_drift": choice.worst_drift(drift, chosen),
            "paper_mean_drift": choice.mean_drift(drift, paper), "samples": len(prompts)})
        print(f"wrote key steps {list(chosen)} for {scheduler} at {args.steps} steps into "
              f"{Path(args.engine_dir) / 'manifest.json'}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
