"""Quality against speed for FasterDiffusion's key steps on `digits`: paper-shaped, uniform and calibrated sets at
several encoder budgets K, all in one fd-bench --quality run (the same initial latents, arms alternating batch by
batch), each paired against DDIM-50.

The calibrated set at each K is what fd-calibrate chooses (the same drift measurement and chooser: one baseline
measurement on --calibration-samples images from seed --calibration-seed, which are not the scored images, then
runtime/key_step_choice.choose_key_steps per K). Where the folder's manifest holds an fd-calibrate entry for
DDIM-50, the set at its K is checked against it and the result says whether they agree.

    python -m fd.benchmarks.key_step_curve --engine-dir engines/digits-fp32-onnxruntime --budgets 5,7,9,11,13,15 \\
        --samples-per-digit 10 --json curve.json --markdown curve.md --plot curve.png
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from fd.runtime.errors import FdError

STEPS = 50
KINDS = ("paper", "uniform", "calibrated")


def parse_budgets(text: str) -> list[int]:
    """"5,7,9" or "5-15" → sorted distinct budgets, each 1 … STEPS."""
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-"))
            budgets = list(range(low, high + 1))
        else:
            budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FdError(f"--budgets {text!r}: give numbers of key steps like 5,7,9 or a range like 5-15") from None
    if not budgets or not all(1 <= k <= STEPS for k in budgets):
        raise FdError(f"--budgets {text!r}: give numbers of key steps from 1 to {STEPS}")
    return sorted(set(budgets))


def calibrate(engine_dir: str, samples: int, seed: int, guidance: float):
    """fd-calibrate's drift measurement on the digit prompts (DDIM, STEPS steps): (drift matrix, max window)."""
    from fd.benchmarks.digits import PROMPTS
    from fd.runtime.drift import measure_drift
    from fd.runtime.pipeline import FasterDiffusionPipeline
    pipe = FasterDiffusionPipeline(engine_dir)
    try:
        per_call = pipe.manifest["limits"]["max_batch_size"]
        prompts = [PROMPTS[j % len(PROMPTS)] for j in range(samples)]
        drift, _, _ = measure_drift(pipe, [prompts[j:j + per_call] for j in range(0, samples, per_call)],
                                    steps=STEPS, scheduler="ddim", seed=seed, guidance_scale=guidance)
        return drift, pipe.manifest["limits"]["max_window"], pipe.manifest
    finally:
        pipe.close()


def curve_arms(drift, max_window: int, budgets: list[int]) -> tuple[list, dict]:
    """DDIM-50 and, per K, the paper-shaped, uniform and calibrated arms; and {arm name: (kind, K)}."""
    from fd.benchmarks.quality import ARMS, Arm
    from fd.benchmarks.quality_arms import key_step_arm
    from fd.runtime.key_step_choice import choose_key_steps, fewest_keys_possible
    arms, kinds = [ARMS["ddim50"]], {}
    for k in budgets:
        arms += [key_step_arm(f"fd-paper:{k}"), key_step_arm(f"fd-uniform:{k}")]
        kinds[f"fd-paper:{k}"], kinds[f"fd-uniform:{k}"] = ("paper", k), ("uniform", k)
        if k >= fewest_keys_possible(STEPS, max_window):  # calibrated windows respect the folder's max window
            keys = choose_key_steps(drift, k, max_window)
            arms.append(Arm(f"fd-calibrated:{k}", f"FD, calibrated key steps ({len(keys)} of {STEPS})", STEPS,
                            keys=keys))
            kinds[f"fd-calibrated:{k}"] = ("calibrated", k)
    return arms, kinds


def format_markdown(result: dict) -> str:
    from fd.benchmarks.quality_report import _cell, _signed
    s = result["settings"]
    lines = [f"`{result['command']}`", "",
             f"N = {10 * s['samples_per_digit']} images per arm, seed {s['seed']}, guidance {s['guidance_scale']}; "
             f"calibration: {result['calibration']['samples']} baseline images from seed "
             f"{result['calibration']['seed']}; manifest's K = {result['calibration'].get('manifest_k')}: "
             f"{result['calibration']['manifest_agrees']}. Paired against ddim50 (benchmarks/paired.py).", "",
             "| K | key set | keys | J | accuracy % | FD-digits | FD-digits − ddim50 | s/image | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, a in result["arms"].items():
        v = a["versus_baseline"]
        kind, k = result["kinds"].get(name, ("baseline", "-"))
        keys = a["policy"]["key_steps"]
        shown = "all 50" if len(keys) == STEPS else ", ".join(map(str, keys))
        lines.append(f"| {k} | {kind} | {shown} | {result['mean_drift'].get(name, 0.0):.3f} | "
                     f"{_cell(a['accuracy'], 1, 100)} | {_cell(a['fd_digits'], 2)} | "
                     f"{_signed(v['fd_digits_difference'], 2)} | {a['seconds_per_image']['value']:.4f} | "
                     f"{_cell(v['speedup'], 2)}x |")
    return "\n".join(lines) + "\n"


def draw(path: str, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fd.runtime.atomic import write_atomic
    figure, (by_k, left, right) = plt.subplots(1, 3, figsize=(17, 5))
    for kind, colour in zip(KINDS, ("tab:orange", "tab:green", "tab:blue")):
        names = [n for n, (k, _) in result["kinds"].items() if k == kind]
        if not names:
            continue
        arms = [result["arms"][n] for n in names]
        x = [a["seconds_per_image"]["value"] for a in arms]
        d = [a["versus_baseline"]["fd_digits_difference"] for a in arms]
        y = np.array([m["value"] for m in d])
        error = np.array([[m["value"] - m["low"] for m in d], [m["high"] - m["value"] for m in d]])
        budgets = [result["kinds"][n][1] for n in names]
        offset = {"paper": -0.15, "uniform": 0.0, "calibrated": 0.15}[kind]  # side by side, not on top
        by_k.errorbar(np.asarray(budgets) + offset, y, yerr=error, marker="o", capsize=3, color=colour, label=kind)
        left.errorbar(x, y, yerr=error, marker="o", capsize=3, color=colour, label=kind, alpha=0.85)
        for xi, yi, n in zip(x, y, names):
            left.annotate(str(result["kinds"][n][1]), (xi, yi), textcoords="offset points", xytext=(4, 4),
                          fontsize=8, color=colour)
        right.plot(budgets, [result["mean_drift"][n] for n in names], marker="o", color=colour, label=kind)
    base = result["arms"]["ddim50"]["seconds_per_image"]["value"]
    by_k.axhline(0, color="black", linewidth=0.8)
    by_k.set_xlabel("K (key steps of 50)")
    by_k.set_ylabel("FD-digits − DDIM-50 (paired 95% interval)")
    by_k.set_title("quality per encoder budget")
    by_k.legend()
    left.axhline(0, color="black", linewidth=0.8)
    left.axvline(base, color="black", linestyle=":", linewidth=0.8, label="ddim50 s/image")
    left.set_xlabel("s/image (one CPU thread)")
    left.set_ylabel("FD-digits − DDIM-50 (paired 95% interval)")
    left.set_title("quality against speed; labels: K key steps")
    left.legend()
    right.set_xlabel("K (key steps of 50)")
    right.set_ylabel("mean drift J the decoder sees")
    right.set_title("fd-calibrate's objective")
    right.legend()
    figure.tight_layout()
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def main(argv=None) -> int:
    import datetime as dt
    import shlex

    from tqdm import tqdm

    from fd.benchmarks import report
    from fd.benchmarks.quality import DEFAULT_GUIDANCE, run_quality
    from fd.runtime.calibrated_steps import calibrated_key_steps
    from fd.runtime.key_step_choice import choose_key_steps, mean_drift
    p = argparse.ArgumentParser(prog="python -m fd.benchmarks.key_step_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--budgets", default="5,7,9,11,13,15", help="K values: 5,7,9 or 5-15")
    p.add_argument("--samples-per-digit", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="the scored images' initial latents")
    p.add_argument("--calibration-samples", type=int, default=50)
    p.add_argument("--calibration-seed", type=int, default=1000)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    try:
        budgets = parse_budgets(args.budgets)
        drift, max_window, manifest = calibrate(args.engine_dir, args.calibration_samples, args.calibration_seed,
                                                args.guidance_scale)
        arms, kinds = curve_arms(drift, max_window, budgets)
        stored = calibrated_key_steps(manifest, "ddim", STEPS)
        calibration = {"samples": args.calibration_samples, "seed": args.calibration_seed}
        if stored is not None:
            calibration["manifest_k"] = len(stored)
            again = choose_key_steps(drift, len(stored), max_window)
            calibration["manifest_agrees"] = ("agrees with the manifest's fd-calibrate entry" if again == stored else
                                              f"differs from the manifest's {list(stored)}: {list(again)}")
        else:
            calibration["manifest_agrees"] = "the folder has no fd-calibrate entry for ddim 50"
        measured = run_quality(args.engine_dir, arms, args.samples_per_digit, args.guidance_scale, args.seed,
                               args.threads, baseline="ddim50",
                               progress=lambda total: tqdm(total=total, unit="batch", desc="key-step curve"))
    except FdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    measured.pop("grid"), measured.pop("per_image")
    result = {"schema": "fd-key-step-curve/1",
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["python", "-m", "fd.benchmarks.key_step_curve", *(argv or sys.argv[1:])]),
              "machine": report.machine_info(), "versions": report.library_versions(),
              "fd_revision": report.source_revision(), "calibration": calibration,
              "kinds": kinds, "mean_drift": {name: mean_drift(drift, arm.keys) for name, arm in
                                             ((a.name, a) for a in arms) if isinstance(arm.keys, tuple)},
              **measured}
    text = format_markdown(result)
    print(text, end="")
    if args.json:
        report.write_json(args.json, result)
    if args.markdown:
        report.write_text(args.markdown, text)
    if args.plot:
        draw(args.plot, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
