"""How close FasterDiffusion stays to the baseline with calibrated, paper and uniform key steps (a quick proxy).

Not the quality yardstick (fd-bench --quality scores images with a classifier): this measures, for each key set,
the RMS pixel difference between FD's images and the baseline's from the same initial noise (0 = the baseline
itself), on seeds other than the ones the calibration measured. One drift measurement gives the calibrated set for
every K.

    python -m fd.benchmarks.key_step_fidelity --engine-dir E --prompts FILE --budgets 5,9,13 --images 30
"""
from __future__ import annotations

import argparse

import numpy as np

from fd.benchmarks.quality_arms import paper_shaped


def main(argv=None) -> None:
    from fd.runtime.calibrate_cli import read_prompts, uniform_set
    from fd.runtime.drift import measure_drift
    from fd.runtime.key_step_choice import choose_key_steps, mean_drift
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy, NoiseInjection
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--prompts")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budgets", default="5,9,13")
    p.add_argument("--calibration-samples", type=int, default=20)
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--guidance-scale", type=float)
    args = p.parse_args(argv)
    pipe = FasterDiffusionPipeline(args.engine_dir)
    m, steps = pipe.manifest, args.steps
    per_call, window = m["limits"]["max_batch_size"], m["limits"]["max_window"]
    options = m.get("family_options", {})
    calibration = read_prompts(args.prompts, pipe.family, options, args.calibration_samples)
    drift, _, _ = measure_drift(pipe, [calibration[j:j + per_call] for j in range(0, len(calibration), per_call)],
                                steps=steps, scheduler="ddim", seed=1000, guidance_scale=args.guidance_scale)
    prompts = read_prompts(args.prompts, pipe.family, options, args.images)
    batches = [prompts[j:j + per_call] for j in range(0, len(prompts), per_call)]

    def images(policy):
        return np.concatenate([np.stack([np.asarray(im, np.float32) / 255 for im in
                                         pipe(b, steps=steps, seed=j, guidance_scale=args.guidance_scale,
                                              policy=policy).images]) for j, b in enumerate(batches)])

    baseline = images(FasterDiffusionPolicy.baseline(steps))
    injection = NoiseInjection(tau=pipe.family.noise_injection_tau)
    print(f"| K | key set | key steps | mean drift J | RMS pixel difference to the baseline |\n|---|---|---|---|---|")
    for count in (int(k) for k in args.budgets.split(",")):
        sets = {"calibrated": choose_key_steps(drift, count, window), "paper-shaped": paper_shaped(steps, count),
                "uniform": uniform_set(steps, count)}
        for name, keys in sets.items():
            if max(b - a for a, b in zip(keys, [*keys[1:], steps])) > window:
                print(f"| {count} | {name} | {list(keys)} | (a window above the folder's max window {window}) | |")
                continue
            rms = float(np.sqrt(np.mean((images(FasterDiffusionPolicy(keys, window, injection)) - baseline) ** 2)))
            print(f"| {count} | {name} | {', '.join(map(str, keys))} | {mean_drift(drift, keys):.4f} | {rms:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
