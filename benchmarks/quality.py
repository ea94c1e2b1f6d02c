"""fd-bench --quality: image quality per sampling arm on the trained `digits` model (fd-build --model digits).

Every arm generates the same N = 10 x per_digit images (per_digit for each prompt "a handwritten digit
zero" … "nine", the same initial latents in every arm), and a digit classifier trained on the real training
digits (digit_classifier.py) judges them:
- accuracy: the share classified as the prompted digit (the CLIP-score analogue);
- FD-digits: the Fréchet distance between the classifier's penultimate features of the generated images and
  of the real held-out digits (the FID analogue);
- s/image: generation time per image (text encoder to decoded pixels).
Each with a bootstrap 95% interval. The floor (held-out real digits against the training digits) shows what
FD-digits two sets of real digits reach. The engine arms run through fd's own runtime
(FasterDiffusionPipeline); the DeepCache arm through diffusers' StableDiffusionPipeline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.policy import (PAPER_GUIDANCE_INTERVAL, FasterDiffusionPolicy, NoiseInjection, default_key_steps,
                               uniform_key_steps)

BOOTSTRAP = 500  # resamples per interval
DEFAULT_PER_DIGIT = 100
# Lower than SD's 7.5: on the digits model FD-digits grows with the scale (DDIM-50, N = 300: 21 at 2, 47 at 4;
# N = 100: 121 at 7.5, where every digit comes out as one thick prototype) while accuracy stays >= 98.7%.
DEFAULT_GUIDANCE = 2.0


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    steps: int
    scheduler: str = "ddim"
    # "all" (every step a key step: the plain sampler), "paper", "uniform" (every 6th at 50 steps), "calibrated"
    # (the folder's fd-calibrate entry, made explicit by resolve_calibrated before a run) or explicit key steps
    keys: str | tuple[int, ...] = "all"
    injection: bool = True  # prior noise injection (FD arms only)
    guidance_interval: bool = False
    deepcache: int | None = None  # DeepCache interval: runs on diffusers' pipeline, not fd's engines

    def policy(self, max_window: int, tau: int) -> FasterDiffusionPolicy:
        interval = PAPER_GUIDANCE_INTERVAL if self.guidance_interval else None
        if self.keys == "all":
            return FasterDiffusionPolicy.baseline(self.steps, interval)
        if self.keys == "calibrated":
            raise ValueError(f"arm {self.name}: resolve_calibrated() first")  # a bug, not the user's
        if isinstance(self.keys, tuple):
            keys = self.keys
        else:
            keys = default_key_steps(self.steps) if self.keys == "paper" else \
                uniform_key_steps(self.steps, self.steps // len(default_key_steps(self.steps)) + 1)
        return FasterDiffusionPolicy(keys, max_window, NoiseInjection(tau=tau) if self.injection else None, interval)


# After the paper's Tables 1 and 11. "fd-uniform" has as many key steps as the paper's set (50 steps: every 6th).
ARMS = {arm.name: arm for arm in (
    Arm("ddim50", "DDIM 50 steps (baseline)", 50),
    Arm("fd", "FD, paper key steps (9 of 50)", 50, keys="paper"),
    Arm("fd-uniform", "FD, 9 uniform key steps (every 6th)", 50, keys="uniform"),
    Arm("fd-no-injection", "FD, paper keys, no noise injection", 50, keys="paper", injection=False),
    Arm("ddim9", "DDIM 9 steps (FD's encoder budget)", 9),
    Arm("ddim25", "DDIM 25 steps", 25),
    Arm("dpmpp20", "DPM++ 2M 20 steps", 20, scheduler="dpmpp-2m"),
    Arm("dpmpp20-fd", "DPM++ 2M 20 steps + FD (7 keys)", 20, scheduler="dpmpp-2m", keys="paper"),
    Arm("fd-interval", "FD + guidance interval (0.28, 5.42]", 50, keys="paper", guidance_interval=True),
    Arm("deepcache3", "DeepCache interval 3 (diffusers, DDIM 50)", 50, deepcache=3),
    Arm("diffusers-ddim50", "diffusers DDIM 50 (DeepCache's reference)", 50, deepcache=1),
)}
DEFAULT_ARMS = tuple(name for name in ARMS if name != "diffusers-ddim50")


def parse_arms(text: str | None) -> list[Arm]:
    """The arms named in --arms (comma-separated): ARMS' names, plus the key-step arms of quality_arms.py
    (fd-paper:K, fd-uniform:K, fd-calibrated)."""
    from fd.benchmarks.quality_arms import KEY_STEP_ARMS_HELP, key_step_arm
    if text is None:
        return [ARMS[name] for name in DEFAULT_ARMS]
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise FdError(f"--arms {text!r} names no arm; choose from {', '.join(ARMS)}, {KEY_STEP_ARMS_HELP}")
    arms = []
    for name in names:
        arm = ARMS.get(name) or key_step_arm(name)
        if arm is None:
            raise FdError(f"--arms {text!r}: unknown arm {name}; choose from {', '.join(ARMS)}, {KEY_STEP_ARMS_HELP}")
        arms.append(arm)
    return arms


# --- the measures ---------------------------------------------------------------------------------------

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), the last term by symmetric eigendecompositions (stable)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def interval(values) -> tuple[float, float]:
    """The 2.5% and 97.5% percentiles of bootstrap values."""
    low, high = np.percentile(np.asarray(values, np.float64), [2.5, 97.5])
    return float(low), float(high)


def bootstrap(statistic, *arrays, resamples: int = BOOTSTRAP, seed: int = 0,
              bias_corrected: bool = False) -> tuple[float, float]:
    """95% interval of statistic(*arrays), each array resampled (rows, with replacement) on its own.

    `bias_corrected` shifts the percentiles by the resamples' bias (their mean minus the full-sample value):
    for the Fréchet distance, whose resamples repeat rows and so come out larger (measured: the floor's
    resamples all lay above its full-sample value), the interval then shows the spread around the value."""
    rng = np.random.default_rng(seed)
    values = [statistic(*(x[rng.integers(len(x), size=len(x))] for x in arrays)) for _ in range(resamples)]
    low, high = interval(values)
    if bias_corrected:  # a distance: the shifted interval is clipped at 0
        shift = float(np.mean(values)) - float(statistic(*arrays))
        low, high = max(low - shift, 0.0), max(high - shift, 0.0)
    return low, high


def summarize(features: np.ndarray, predicted: np.ndarray, prompted: np.ndarray, real: np.ndarray,
              chunk_seconds: list[float], chunk_sizes: list[int]) -> dict:
    """accuracy, fd_digits and seconds_per_image, each {value, low, high} (a bootstrap 95% interval)."""
    correct = (predicted == prompted).astype(np.float64)
    per_image = np.asarray(chunk_seconds) / np.asarray(chunk_sizes)
    return {
        "accuracy": _measure(correct.mean(), bootstrap(np.mean, correct)),
        "fd_digits": _measure(frechet_distance(features, real),
                              bootstrap(lambda f: frechet_distance(f, real), features, bias_corrected=True)),
        "seconds_per_image": _measure(sum(chunk_seconds) / sum(chunk_sizes), bootstrap(np.mean, per_image)),
        "samples": int(len(correct)),
    }


def _measure(value, low_high) -> dict:
    return {"value": float(value), "low": low_high[0], "high": low_high[1]}


# --- the arms -------------------------------------------------------------------------------------------

class EngineArms:
    """Generates through fd's runtime (the engine folder) and, for DeepCache arms, diffusers' pipeline."""

    def __init__(self, engine_dir: str, threads: int):
        import torch

        from fd.runtime.pipeline import FasterDiffusionPipeline
        torch.set_num_threads(threads)
        self.engine_dir = engine_dir
        manifest_backend = _backend(engine_dir)
        options = {"threads": threads} if manifest_backend == "onnxruntime" else {}
        self.pipe = FasterDiffusionPipeline(engine_dir, **options)
        self.diffusers = None

    def generate(self, arm: Arm, prompts: list[str], latents: np.ndarray, guidance: float) -> np.ndarray:
        """uint8 images (N, H, W, 3) of one arm for these prompts and initial latents."""
        if arm.deepcache is not None:
            return self._diffusers(arm, prompts, latents, guidance)
        policy = arm.policy(self.pipe.manifest["limits"]["max_window"], self.pipe.family.noise_injection_tau)
        result = self.pipe(prompts, steps=arm.steps, scheduler=arm.scheduler, guidance_scale=guidance,
                           latents=latents, seed=0, policy=policy)
        return np.stack([np.asarray(image) for image in result.images])

    def _diffusers(self, arm: Arm, prompts, latents, guidance) -> np.ndarray:
        import torch

        from fd.benchmarks.deepcache import DeepCache
        if self.diffusers is None:
            self.diffusers = _diffusers_pipeline(self.pipe.manifest)
        pipe, family = self.diffusers
        height, width = self.pipe.image_size(None, None)
        with torch.inference_mode(), DeepCache(pipe.unet, interval=arm.deepcache):
            images, _ = family.diffusers_call(pipe, prompts, torch.from_numpy(latents), steps=arm.steps,
                                              guidance_scale=guidance, height=height, width=width)
        return (np.asarray(images, np.float32) * 255).round().astype(np.uint8)

    def close(self):
        self.pipe.close()


def _backend(engine_dir: str) -> str:
    from fd.runtime.manifest import load_manifest
    return load_manifest(engine_dir)["backend"]


def _diffusers_pipeline(manifest: dict):
    """diffusers' pipeline (DDIM) on the weights the folder was built from, checked by their fingerprint."""
    from fd.builder.families import FAMILIES
    from fd.builder.models import load_components
    from fd.runtime.schedulers import diffusers_scheduler
    source = manifest["source"]
    comps = load_components(source["model"] if source.get("kind") == "generated" else source.get("path"))
    if source.get("weights_sha256") and comps.source["weights_sha256"] != source["weights_sha256"]:
        raise FdError("the DeepCache arm found other weights than the engine folder was built from: rebuild the "
                      "folder (fd-build --model digits --max-batch-size 50 --force), or drop the DeepCache arms")
    family = FAMILIES[comps.family]
    pipe = family.diffusers_pipeline(comps, diffusers_scheduler("ddim", manifest["scheduler_config"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


def choose_baseline(arms: list[Arm], baseline: str | None) -> str:
    """The arm every other is compared with (paired): `baseline` if given, else ddim50 if run, else the first."""
    names = [arm.name for arm in arms]
    if baseline is None:
        return "ddim50" if "ddim50" in names else names[0]
    if baseline not in names:
        raise FdError(f"--baseline {baseline} is not among the arms run ({', '.join(names)}): add it to --arms")
    return baseline


def run_quality(engine_dir: str, arms: list[Arm], per_digit: int = DEFAULT_PER_DIGIT,
                guidance: float = DEFAULT_GUIDANCE, seed: int = 0, threads: int = 1, progress=None,
                baseline: str | None = None) -> dict:
    """Generate per_digit images of each digit in every arm (chunks of the folder's max batch, arms alternating
    chunk by chunk so drifts of the machine spread over all), then measure them. Returns the result dict; its
    "per_image" part (features, predictions, seconds per batch) is for --features and is not JSON."""
    from fd.benchmarks.digit_classifier import load_classifier, to_grey
    from fd.benchmarks.digits import PROMPTS, load_split
    from fd.benchmarks.quality_arms import resolve_calibrated
    if per_digit < 1:
        raise FdError(f"--samples-per-digit {per_digit}: give 1 or more")
    from fd.runtime.manifest import load_manifest
    arms = resolve_calibrated(arms, load_manifest(engine_dir), engine_dir)  # before the heavy work
    baseline = choose_baseline(arms, baseline)
    classifier, split = load_classifier(), load_split()  # before the engines: a missing scikit-learn is one line
    real, held_predicted = classifier.features_and_labels(split.held_out_images)
    train_features, _ = classifier.features_and_labels(split.train_images)
    engine = EngineArms(engine_dir, threads)
    try:
        batch = min(per_digit, engine.pipe.manifest["limits"]["max_batch_size"])
        channels, h, w = engine.pipe.latent_shape_at(None, None)
        latents = np.random.default_rng(seed).standard_normal((10 * per_digit, channels, h, w), dtype=np.float32)
        prompted = np.repeat(np.arange(10), per_digit)
        chunks = [np.arange(d * per_digit + s, d * per_digit + min(s + batch, per_digit))
                  for d in range(10) for s in range(0, per_digit, batch)]
        grey = {arm.name: np.zeros((len(prompted), 32, 32), np.float32) for arm in arms}
        grid = {arm.name: [] for arm in arms}  # the first image of each digit, as generated
        seconds = {arm.name: [] for arm in arms}
        for arm in arms:  # warm-up (unmeasured): graph sessions, first-call allocations
            engine.generate(arm, [PROMPTS[0]] * min(2, batch), latents[:min(2, batch)], guidance)
        bar = progress(len(chunks) * len(arms)) if progress else None
        for index in chunks:
            prompts = [PROMPTS[d] for d in prompted[index]]
            for arm in arms:
                started = time.perf_counter()
                images = engine.generate(arm, prompts, latents[index], guidance)
                seconds[arm.name].append(time.perf_counter() - started)
                grey[arm.name][index] = to_grey(images)
                if index[0] % per_digit == 0:
                    grid[arm.name].append(images[0])
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        size = engine.pipe.image_size(None, None)
        policies = {arm.name: arm.policy(engine.pipe.manifest["limits"]["max_window"],
                                         engine.pipe.family.noise_injection_tau).describe() for arm in arms}
        backend = engine.pipe.manifest["backend"]
    finally:
        engine.close()
    sizes = [len(index) for index in chunks]
    results, features, predicted = {}, {}, {}
    for arm in arms:
        features[arm.name], predicted[arm.name] = classifier.features_and_labels(grey[arm.name])
        results[arm.name] = {"what": arm.what, "steps": arm.steps, "scheduler": arm.scheduler,
                             "runs_on": "diffusers" if arm.deepcache else f"fd ({backend})",
                             **({"deepcache_interval": arm.deepcache} if arm.deepcache else
                                {"policy": policies[arm.name]}),
                             **summarize(features[arm.name], predicted[arm.name], prompted, real, seconds[arm.name],
                                         sizes)}
    compared = compare_with_baseline(features, predicted, seconds, baseline, prompted, real, split.held_out_labels)
    for name, comparison in compared.items():
        results[name]["versus_baseline"] = comparison
    held_correct = (held_predicted == split.held_out_labels).astype(np.float64)
    return {
        "classifier": {"held_out_accuracy": _measure(held_correct.mean(), bootstrap(np.mean, held_correct)),
                       "held_out": int(len(held_correct)), "train": int(len(split.train_labels))},
        "floor": {"fd_digits": _measure(frechet_distance(real, train_features),
                                        bootstrap(lambda f: frechet_distance(f, train_features), real,
                                                  bias_corrected=True)),
                  "what": "real held-out digits against the real training digits"},
        "settings": {"samples_per_digit": per_digit, "guidance_scale": guidance, "seed": seed, "threads": threads,
                     "batch": batch, "image_size": list(size), "bootstrap_resamples": BOOTSTRAP,
                     "baseline": baseline},
        "arms": results, "grid": {name: np.stack(images) for name, images in grid.items()},
        "per_image": {"prompted": prompted, "real_features": real, "real_labels": split.held_out_labels,
                      **{f"features/{name}": f for name, f in features.items()},
                      **{f"predicted/{name}": p for name, p in predicted.items()},
                      **{f"seconds/{name}": np.asarray(s) for name, s in seconds.items()}},
    }


def compare_with_baseline(features: dict, predicted: dict, seconds: dict, baseline: str, prompted: np.ndarray,
                          real: np.ndarray, real_labels: np.ndarray) -> dict:
    """Per arm, its paired differences from the baseline arm (benchmarks/paired.py): FD-digits and accuracy
    (arm minus baseline) and the speed-up (baseline's seconds over the arm's), each {value, low, high}."""
    from fd.benchmarks import paired
    correct = {name: (p == prompted).astype(np.float64) for name, p in predicted.items()}
    fd = paired.paired_fd_differences(features, baseline, prompted, real, real_labels, frechet_distance, BOOTSTRAP)
    accuracy = paired.paired_mean_differences(correct, baseline, prompted, BOOTSTRAP)
    speedup = paired.paired_speedups(seconds, baseline, BOOTSTRAP)
    return {name: {"baseline": baseline, "fd_digits_difference": fd[name], "accuracy_difference": accuracy[name],
                   "speedup": speedup[name]} for name in features}
