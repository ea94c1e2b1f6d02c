"""fd-bench --quality on the command line: its options, the Markdown table, the JSON and the PNG grid."""
from __future__ import annotations

import datetime as dt
import shlex

import numpy as np

from fd.benchmarks import report
from fd.benchmarks.quality import ARMS, DEFAULT_ARMS, DEFAULT_GUIDANCE, DEFAULT_PER_DIGIT, parse_arms, run_quality
from fd.benchmarks.quality_arms import KEY_STEP_ARMS_HELP
from fd.runtime.atomic import check_writable, write_atomic
from fd.runtime.errors import FdError

SCHEMA = "fd-bench-quality/1"
# fd-bench's options that the quality arms set themselves (steps, scheduler and key steps are per arm)
NOT_WITH_QUALITY = ("key_steps", "uniform", "guidance_interval", "compare", "plot", "prompt", "class_label",
                    "control_image", "init_image")


def add_quality_arguments(parser) -> None:
    group = parser.add_argument_group(
        "quality (on the digits model: fd-build --model digits --max-batch-size 50)",
        "--quality generates 10 x --samples-per-digit images in every arm (each arm sets its own steps, "
        "scheduler and key steps) and reports accuracy, FD-digits and s/image with bootstrap 95% intervals; "
        "--json and --markdown write the table, --seed picks the initial latents, --guidance-scale the scale "
        f"(default {DEFAULT_GUIDANCE})")
    group.add_argument("--quality", action="store_true", help="measure image quality per arm instead of speed")
    group.add_argument("--arms", metavar="A,B,…", help=f"arms to run (default: {', '.join(DEFAULT_ARMS)}; "
                                                         f"all: {', '.join(ARMS)}; and {KEY_STEP_ARMS_HELP})")
    group.add_argument("--samples-per-digit", type=int, default=DEFAULT_PER_DIGIT,
                       help=f"images per digit and arm (default {DEFAULT_PER_DIGIT}: N = 1,000 per arm)")
    group.add_argument("--grid", metavar="FILE.png", help="write a PNG grid: a row per arm, digits 0-9")
    group.add_argument("--baseline", metavar="ARM", help="the arm every other is compared with, paired (same "
                       "images' latents and reference digits resampled in both): default ddim50 if run, else the first")
    group.add_argument("--features", metavar="FILE.npz", help="also write every image's classifier features, "
                       "predicted digit and each arm's seconds per batch (to analyse again without generating)")
    group.add_argument("--threads", type=int, default=1, help="CPU threads for the engines and torch (default 1: "
                       "on a shared machine two threads that wait on each other ran 10x slower)")


def main_quality(args, argv: list[str]) -> None:
    """fd-bench --quality: check every option, run the arms, print the table, write the files."""
    from tqdm import tqdm

    from fd.runtime.cli import check_engine_dir
    from fd.runtime.request import check_guidance_scale
    given = [name for name in NOT_WITH_QUALITY if getattr(args, name, None)]
    if given:
        raise FdError(f"--{given[0].replace('_', '-')} does not go with --quality: the quality arms set their own "
                      "steps, schedulers, key steps and prompts (pick arms with --arms)")
    arms = parse_arms(args.arms)
    check_engine_dir(args.engine_dir)
    guidance = DEFAULT_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    check_guidance_scale(guidance)
    if args.threads < 1:
        raise FdError(f"--threads {args.threads}: give 1 or more")
    if args.grid is not None and not args.grid.lower().endswith(".png"):
        raise FdError(f"--grid {args.grid} must end in .png")
    if args.features is not None and not args.features.lower().endswith(".npz"):
        raise FdError(f"--features {args.features} must end in .npz")
    for option, path in (("--json", args.json), ("--markdown", args.markdown), ("--grid", args.grid),
                         ("--features", args.features)):
        if path is not None:
            check_writable(path, option)
    measured = run_quality(args.engine_dir, arms, args.samples_per_digit, guidance, args.seed, args.threads,
                           progress=lambda total: tqdm(total=total, unit="batch", desc="fd-bench --quality"),
                           baseline=args.baseline)
    grid, per_image = measured.pop("grid"), measured.pop("per_image")
    result = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["fd-bench", *argv]), "engine_dir": str(args.engine_dir),
              "machine": report.machine_info(), "versions": report.library_versions(),
              "fd_revision": report.source_revision(), **measured}
    text = format_markdown(result)
    print(text, end="")
    if args.json:
        report.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.markdown:
        report.write_text(args.markdown, text)
        print(f"wrote {args.markdown}")
    if args.grid:
        write_grid(args.grid, grid, list(grid))
        print(f"wrote {args.grid}")
    if args.features:
        write_atomic(args.features, lambda f: np.savez_compressed(f, **per_image))
        print(f"wrote {args.features}")


def _cell(m: dict, digits: int, scale: float = 1.0) -> str:
    return f"{m['value'] * scale:.{digits}f} [{m['low'] * scale:.{digits}f}, {m['high'] * scale:.{digits}f}]"


def format_markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"`{r['command']}`", "",
             f"N = {10 * s['samples_per_digit']} images per arm ({s['samples_per_digit']} per digit, seed {s['seed']}, "
             f"the same initial latents in every arm), guidance scale {s['guidance_scale']}, "
             f"{s['image_size'][0]}x{s['image_size'][1]} px, batches of {s['batch']}, {s['threads']} thread(s); "
             f"[low, high] = bootstrap 95% interval ({s['bootstrap_resamples']} resamples).",
             f"Classifier: held-out accuracy {_cell(r['classifier']['held_out_accuracy'], 1, 100)} % on "
             f"{r['classifier']['held_out']} real digits it never saw. Floor (real held-out vs real training "
             f"digits): FD-digits {_cell(r['floor']['fd_digits'], 2)}.", "",
             "| arm | what | runs on | accuracy % | FD-digits | s/image |", "|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {a['what']} | {a['runs_on']} | {_cell(a['accuracy'], 1, 100)} | "
                     f"{_cell(a['fd_digits'], 2)} | {_cell(a['seconds_per_image'], 4)} |")
    baseline = s.get("baseline")
    if baseline is None:  # a result written before the paired comparison existed
        return "\n".join(lines) + "\n"
    lines += ["", f"Paired against {baseline} (the same image indices and reference digits resampled in both arms, "
                  "stratified by digit; a difference whose interval excludes 0 is told apart from the baseline):", "",
              f"| arm | FD-digits − {baseline} | accuracy − {baseline} (points) | speed-up over {baseline} |",
              "|---|---|---|---|"]
    for name, a in r["arms"].items():
        v = a["versus_baseline"]
        lines.append(f"| {name} | {_signed(v['fd_digits_difference'], 2)} | "
                     f"{_signed(v['accuracy_difference'], 1, 100)} | {_cell(v['speedup'], 2)}x |")
    return "\n".join(lines) + "\n"


def _signed(m: dict, digits: int, scale: float = 1.0) -> str:
    mark = " *" if m["low"] > 0 or m["high"] < 0 else ""  # the interval excludes 0
    return (f"{m['value'] * scale:+.{digits}f} [{m['low'] * scale:+.{digits}f}, {m['high'] * scale:+.{digits}f}]"
            f"{mark}")


def write_grid(path: str, grid: dict, names: list[str], cell: int = 64) -> None:
    """A row per arm (its name on the left), digits 0-9 left to right under a header: each arm's first image of
    each digit, shown cell x cell pixels (nearest neighbour, so the model's pixels stay visible)."""
    from PIL import Image, ImageDraw
    label, header = 130, 16
    canvas = Image.new("RGB", (label + 10 * cell, header + len(names) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for column in range(10):
        draw.text((label + column * cell + cell // 2 - 3, 2), str(column), fill="black")
    for row, name in enumerate(names):
        top = header + row * cell
        draw.text((4, top + cell // 2 - 6), name, fill="black")
        for column, image in enumerate(grid[name]):
            tile = Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label + column * cell, top))

    def save(f):
        canvas.save(f, format="PNG")
    write_atomic(path, save)
