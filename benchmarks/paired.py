"""Paired bootstrap intervals for fd-bench --quality: each arm's difference from a baseline arm.

Every arm of one run generates image j from the same initial latents and the same prompt, and every arm is
compared with the same real reference digits. An interval per arm (quality.py's `bootstrap`) throws that away:
it counts the spread that all arms share (which latents were drawn, which real digits are the reference) once
per arm. Resampling the *same* image indices in both arms, and the same reference digits, and taking the
difference of the statistic per resample keeps what they share out of the difference. Identical arms give a
difference of exactly 0 in every resample.

Resampling is stratified: the design fixes N/10 images per digit and the held-out reference is split
stratified, so each resample keeps those counts (indices resampled within each digit), and the class mix is not
counted as noise it is not.

`fd_digits`: FD(arm, reference) − FD(baseline, reference), generated rows and reference rows resampled
(stratified) once per resample for all arms; the percentiles are shifted by the resamples' bias (their mean
minus the full-sample difference), as the per-arm FD-digits interval is, because resampling repeats rows and
inflates a Fréchet distance (by about the same amount in both arms, not exactly). `accuracy`: the difference of
the shares classified as the prompted digit, same image indices. `speedup`: the baseline's seconds over the
arm's, over the same batches (arms alternate batch by batch), batches resampled.
"""
from __future__ import annotations

import numpy as np


def stratified_resample(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices drawn with replacement within each stratum, as many per stratum as it has."""
    picks = []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        picks.append(members[rng.integers(len(members), size=len(members))])
    return np.concatenate(picks)


def _percentiles(values, shift: float = 0.0) -> tuple[float, float]:
    low, high = np.percentile(np.asarray(values, np.float64), [2.5, 97.5])
    return float(low) - shift, float(high) - shift


def paired_fd_differences(features: dict[str, np.ndarray], baseline: str, strata: np.ndarray, real: np.ndarray,
                          real_strata: np.ndarray, distance, resamples: int, seed: int = 0) -> dict[str, dict]:
    """Per arm: {value, low, high} of distance(arm, real) − distance(baseline, real) (a 95% paired interval).

    `features[name]` rows are aligned across arms (row j: the same latents and prompt); `strata` (row → digit)
    and `real_strata` (reference row → digit) stratify the resampling; `distance(a, b)` is the Fréchet distance."""
    rng = np.random.default_rng(seed)
    full = {name: distance(f, real) for name, f in features.items()}
    draws = {name: [] for name in features}
    for _ in range(resamples):
        rows, ref = stratified_resample(strata, rng), stratified_resample(real_strata, rng)
        reference = real[ref]
        base = distance(features[baseline][rows], reference)
        for name, f in features.items():
            draws[name].append(0.0 if name == baseline else distance(f[rows], reference) - base)
    result = {}
    for name in features:
        value = full[name] - full[baseline]
        shift = float(np.mean(draws[name])) - value
        low, high = _percentiles(draws[name], shift)
        result[name] = {"value": float(value), "low": low, "high": high}
    return result


def paired_mean_differences(values: dict[str, np.ndarray], baseline: str, strata: np.ndarray, resamples: int,
                            seed: int = 0) -> dict[str, dict]:
    """Per arm: {value, low, high} of mean(arm) − mean(baseline) over the same resampled rows (e.g. accuracy)."""
    rng = np.random.default_rng(seed)
    differences = {name: np.asarray(v, np.float64) - np.asarray(values[baseline], np.float64)
                   for name, v in values.items()}
    draws = {name: [] for name in values}
    for _ in range(resamples):
        rows = stratified_resample(strata, rng)
        for name, d in differences.items():
            draws[name].append(float(d[rows].mean()))
    return {name: {"value": float(d.mean()), **dict(zip(("low", "high"), _percentiles(draws[name])))}
            for name, d in differences.items()}


def paired_speedups(seconds: dict[str, np.ndarray], baseline: str, resamples: int, seed: int = 0) -> dict[str, dict]:
    """Per arm: {value, low, high} of the baseline's total seconds over the arm's, the same batches resampled."""
    rng = np.random.default_rng(seed)
    times = {name: np.asarray(s, np.float64) for name, s in seconds.items()}
    draws = {name: [] for name in times}
    for _ in range(resamples):
        batches = rng.integers(len(times[baseline]), size=len(times[baseline]))
        base = times[baseline][batches].sum()
        for name, t in times.items():
            draws[name].append(float(base / t[batches].sum()))
    return {name: {"value": float(times[baseline].sum() / t.sum()),
                   **dict(zip(("low", "high"), _percentiles(draws[name])))} for name, t in times.items()}
