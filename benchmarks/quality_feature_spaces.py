"""Which feature space tells sampling arms apart best? Re-scores a saved fd-bench --quality run (--features FILE.npz)
in other spaces than the classifier's 64-wide penultimate layer, without generating again:

  penultimate-64   the classifier's penultimate features (FD-digits as fd-bench reports it)
  logits-10        the classifier's 10 logits (its head applied to those features)
  pca-K            the penultimate features projected on the top K principal axes of the real training digits'

For each space and arm: the Fréchet distance to the held-out digits with its per-arm bootstrap interval, and its
paired difference from the baseline arm (benchmarks/paired.py). A space is sharper where the paired intervals
are narrow relative to the differences between arms; it is only a fair yardstick if it still sees what matters
(the floor, real against real, stays far below the generated arms).

    python -m fd.benchmarks.quality_feature_spaces --features run.npz --baseline ddim50 \\
        --spaces penultimate-64,logits-10,pca-16
"""
from __future__ import annotations

import argparse

import numpy as np


def projections(spaces: list[str]):
    """{space name: function (N, 64) features → (N, d)} using the cached classifier and the training digits."""
    import torch

    from fd.benchmarks.digit_classifier import load_classifier
    from fd.benchmarks.digits import load_split
    classifier = load_classifier()
    train, _ = classifier.features_and_labels(load_split().train_images)
    result = {}
    for space in spaces:
        if space == "penultimate-64":
            result[space] = lambda f: f
        elif space == "logits-10":
            def logits(f, head=classifier.head):
                with torch.no_grad():
                    return head(torch.from_numpy(f.astype(np.float32))).double().numpy()
            result[space] = logits
        elif space.startswith("pca-"):
            k = int(space.split("-")[1])
            mean = train.mean(0)
            _, _, axes = np.linalg.svd(train - mean, full_matrices=False)
            result[space] = lambda f, axes=axes[:k], mean=mean: (f - mean) @ axes.T
        else:
            raise SystemExit(f"unknown space {space}: penultimate-64, logits-10 or pca-K")
    return result, train


def main(argv=None) -> None:
    from fd.benchmarks import paired
    from fd.benchmarks.quality import BOOTSTRAP, bootstrap, frechet_distance
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True)
    p.add_argument("--baseline", default="ddim50")
    p.add_argument("--spaces", default="penultimate-64,logits-10,pca-16,pca-8")
    args = p.parse_args(argv)
    saved = np.load(args.features)
    arms = [key.split("/", 1)[1] for key in saved.files if key.startswith("features/")]
    prompted, real, real_labels = saved["prompted"], saved["real_features"], saved["real_labels"]
    spaces, train = projections(args.spaces.split(","))
    print(f"| space | floor | arm | FD | per-arm interval | − {args.baseline} (paired 95%) |")
    print("|---|---|---|---|---|---|")
    for space, project in spaces.items():
        ref, floor_ref = project(real), project(train)
        floor = frechet_distance(ref, floor_ref)
        feats = {arm: project(saved[f"features/{arm}"]) for arm in arms}
        diff = paired.paired_fd_differences(feats, args.baseline, prompted, ref, real_labels, frechet_distance,
                                            BOOTSTRAP)
        for arm in arms:
            value = frechet_distance(feats[arm], ref)
            low, high = bootstrap(lambda f: frechet_distance(f, ref), feats[arm], bias_corrected=True)
            d = diff[arm]
            print(f"| {space} | {floor:.2f} | {arm} | {value:.2f} | [{low:.2f}, {high:.2f}] | "
                  f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] |", flush=True)


if __name__ == "__main__":
    main()
