"""Choosing key steps from a measured drift matrix (numpy only; fd-calibrate's chooser).

Terms (step indices 0 … N-1 over the sampler's timesteps, as in runtime/policy.py):
  drift D[k, i]   for k < i: the relative L2 distance between the denoiser encoder's outputs (the cache) at
                  step k and the outputs the encoder would give at step i, on the baseline trajectory
                  (runtime/drift.py measures it: ‖E_i − E_k‖ / ‖E_i‖ per cache tensor and row, averaged)
  key set S       sorted step indices with 0 ∈ S; step i decodes from the cache of key(i) = max{k ∈ S : k ≤ i}
  objective J(S)  the mean drift the decoder sees over all N steps:
                      J(S) = (1/N) · Σ_{i ∉ S} D[key(i), i]     (a key step sees its own fresh cache: 0)
  window limit W  every window (a key step and the non-key steps after it) has at most W steps, so each
                  window decodes in one batched call of the folder's graphs (manifest limits.max_window)

choose_key_steps(D, K, W) returns the S with |S| ≤ K that minimises J, by dynamic programming over
(number of keys, last key): O(N²·K). "At most K" (not exactly K) makes more budget never worse; a set
smaller than K is returned only where every extra key step would leave J unchanged or larger (a drift
matrix in which an older cache is closer than a newer one). fewest_key_steps(D, X, W) returns the
smallest S with J(S) ≤ X (the least J among the sets of that size).
"""
from __future__ import annotations

import math

import numpy as np

from fd.runtime.errors import FdError


def mean_drift(drift: np.ndarray, key_steps) -> float:
    """J(S): the mean over all steps of the drift between each step's cache and its own encoder output."""
    drift = check_drift(drift)
    keys = sorted(set(key_steps))
    total, key = 0.0, 0
    for i in range(len(drift)):
        if i in keys:
            key = i
        else:
            total += drift[key, i]
    return total / len(drift)


def worst_drift(drift: np.ndarray, key_steps) -> float:
    """The largest drift any single step sees under S (0 where every step is a key step)."""
    drift = check_drift(drift)
    keys, key, worst = set(key_steps), 0, 0.0
    for i in range(len(drift)):
        key = i if i in keys else key
        worst = max(worst, float(drift[key, i]))
    return worst


def fewest_keys_possible(num_steps: int, max_window: int) -> int:
    """Windows of at most W steps cover N steps with no fewer than ⌈N / W⌉ key steps."""
    return math.ceil(num_steps / max_window)


def choose_key_steps(drift: np.ndarray, num_key_steps: int, max_window: int) -> tuple[int, ...]:
    """The key set of at most `num_key_steps` members (step 0 among them, windows ≤ `max_window`) of least J."""
    drift = check_drift(drift)
    steps = len(drift)
    check_budget(num_key_steps, steps, max_window)
    totals, solution = _solve(drift, min(num_key_steps, steps), max_window)
    count = 1 + int(np.argmin(totals[1:]))  # the first minimum: fewest keys among equal J
    return _keys(solution, count)


def fewest_key_steps(drift: np.ndarray, max_drift: float, max_window: int) -> tuple[int, ...]:
    """The smallest key set whose J is at most `max_drift` (and, of those, the one of least J)."""
    drift = check_drift(drift)
    if not (math.isfinite(max_drift) and max_drift >= 0):
        raise FdError(f"--max-drift {max_drift} is not allowed: give a finite relative drift of 0 or more, e.g. 0.05")
    steps = len(drift)
    totals, solution = _solve(drift, steps, max_window, stop_below=max_drift * steps)
    count = next(c for c in range(1, len(totals)) if totals[c] <= max_drift * steps * (1 + 1e-12))
    return _keys(solution, count)


def check_budget(num_key_steps: int, steps: int, max_window: int) -> None:
    least = fewest_keys_possible(steps, max_window)
    if num_key_steps < least:
        raise FdError(f"--num-key-steps {num_key_steps} cannot cover {steps} steps with windows of at most "
                      f"{max_window} steps (the folder's max window): give --num-key-steps {least} or more, or rebuild the folder "
                      f"with a larger fd-build --max-window")


def check_drift(drift) -> np.ndarray:
    drift = np.asarray(drift, dtype=np.float64)
    if drift.ndim != 2 or drift.shape[0] != drift.shape[1] or len(drift) < 1:
        raise ValueError(f"a drift matrix is square N x N, got shape {drift.shape}")
    upper = drift[np.triu_indices(len(drift), 1)]
    if not (np.isfinite(upper).all() and (upper >= 0).all()):
        raise ValueError("a drift matrix holds finite distances of 0 or more above its diagonal")
    return drift


def _window_costs(drift: np.ndarray, max_window: int) -> np.ndarray:
    """cost[p, s] = Σ_{p < i < s} D[p, i]: the drift of the window from key p to the next key s (s = N: the end);
    inf where s ≤ p or the window is longer than max_window."""
    steps = len(drift)
    upper = np.triu(drift, 1)
    cost = np.zeros((steps, steps + 1))
    cost[:, 1:] = np.cumsum(upper, axis=1)  # cost[p, s] = Σ_{i ≤ s-1} upper[p, i], and upper[p, i] = 0 for i ≤ p
    p, s = np.indices(cost.shape)
    cost[(s <= p) | (s - p > max_window)] = np.inf
    return cost


def _solve(drift: np.ndarray, most_keys: int, max_window: int, stop_below: float | None = None):
    """For c = 1 … most_keys keys: best[c][s], the least drift of steps 0 … s-1 with c keys, the last at s (its
    own window not yet counted); parents[c][s], the key before s there; totals[c], the least drift of all N
    steps with exactly c keys (inf where no such set fits the windows). Stops early once a total is ≤ stop_below."""
    steps = len(drift)
    cost = _window_costs(drift, max_window)
    first = np.full(steps, np.inf)
    first[0] = 0.0  # one key: step 0
    best, parents, totals = [None, first], [None, None], [np.inf, first[0] + cost[0, steps]]
    for count in range(2, most_keys + 1):
        if stop_below is not None and totals[-1] <= stop_below * (1 + 1e-12):
            break
        candidates = best[-1][:, None] + cost[:, :steps]  # [previous key p, this key s]
        parent = np.argmin(candidates, axis=0)
        best.append(candidates[parent, np.arange(steps)])
        parents.append(parent)
        totals.append(float(np.min(best[-1] + cost[:, steps])))
    return np.asarray(totals), (best, parents, cost)


def _keys(solution, count: int) -> tuple[int, ...]:
    """The key set of least drift with `count` keys: its last key, then the parents back to step 0."""
    best, parents, cost = solution
    key = int(np.argmin(best[count] + cost[:, -1]))
    keys = [key]
    for c in range(count, 1, -1):
        key = int(parents[c][key])
        keys.append(key)
    return tuple(reversed(keys))
