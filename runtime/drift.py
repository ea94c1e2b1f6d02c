"""Measuring how far the denoiser encoder's outputs move between steps (fd-calibrate's measurement).

The baseline (every step a key step, no noise injection) runs through the engine folder's own graphs; a
thin wrapper around the pipeline's runner copies each `denoiser_encoder` call's outputs (the cache tensors:
a UNet's mid output and skips, a transformer's tokens) to the host. With every step a key step the pipeline
calls the encoder exactly once per step, in order, so the n-th call of a generation is step n.

From one generation's outputs E_0 … E_{N-1} the drift matrix is, for k < i,
    D[k, i] = mean over cache tensors c and rows r of ‖E_i[c, r] − E_k[c, r]‖ / ‖E_i[c, r]‖
(rows: every image and, when guided, both guidance halves), i.e. how far the cache of key step k is from what
the encoder would return at step i, relative to the latter; runtime/key_step_choice.py chooses key steps from
it. Several generations (batches of samples) are averaged row by row.

Memory: a generation's outputs are all held until its drift is computed: N x (cache size per row) x rows,
float32 (SD1.5 at 512², guided, 50 steps: about 2.5 GB per image; batches are one image each there).
"""
from __future__ import annotations

import numpy as np

ENCODER = "denoiser_encoder"


class RecordingRunner:
    """Wraps a runner: every encoder call's cache outputs are downloaded into `outputs` (one dict per call);
    everything else is the wrapped runner's."""

    def __init__(self, runner, cache_names: list[str]):
        self._runner, self._cache_names = runner, list(cache_names)
        self.outputs: list[dict[str, np.ndarray]] = []

    def run(self, graph: str, feeds: dict) -> dict:
        result = self._runner.run(graph, feeds)
        if graph == ENCODER:  # downloaded now: a backend with fixed buffers overwrites them at its next call
            self.outputs.append({name: self._runner.download(result[name]).astype(np.float32)
                                 for name in self._cache_names})
        return result

    def __getattr__(self, name):
        return getattr(self._runner, name)


def drift_matrix(outputs: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, int]:
    """(D summed over rows, the number of rows): D[k, i] for k < i as the module says, before dividing by the
    rows, so batches add up; zeros on and below the diagonal."""
    steps = len(outputs)
    names = list(outputs[0])
    rows = len(outputs[0][names[0]])
    total = np.zeros((steps, steps))
    for name in names:
        series = np.stack([step[name].reshape(rows, -1) for step in outputs]).astype(np.float64)  # (N, rows, F)
        norms = np.maximum(np.linalg.norm(series, axis=2), np.finfo(np.float32).tiny)  # (N, rows)
        for i in range(1, steps):
            distance = np.linalg.norm(series[:i] - series[i], axis=2)  # (i, rows): ‖E_i − E_k‖ for k < i
            total[:i, i] += (distance / norms[i]).sum(axis=1) / len(names)
    return total, rows


def measure_drift(pipe, prompt_batches: list[list], *, steps: int, scheduler: str, seed: int,
                  guidance_scale: float | None = None, progress=lambda done, total: None):
    """Run the baseline on each batch of prompts (seed, seed + 1, …) through `pipe` (a FasterDiffusionPipeline);
    return (the drift matrix averaged over all rows, the timesteps, the adjacent drift D[i-1, i])."""
    from fd.runtime.policy import FasterDiffusionPolicy
    recorder = RecordingRunner(pipe.runner, pipe.manifest["cache"])
    original, pipe.runner = pipe.runner, recorder
    total, rows, timesteps = None, 0, None
    try:
        for index, prompts in enumerate(prompt_batches):
            recorder.outputs.clear()
            result = pipe(prompts, steps=steps, scheduler=scheduler, seed=seed + index, guidance_scale=guidance_scale,
                          policy=FasterDiffusionPolicy.baseline(steps))
            if len(recorder.outputs) != len(result.timesteps):  # one encoder call per step, or this is no baseline
                raise RuntimeError(f"{len(recorder.outputs)} encoder calls for {len(result.timesteps)} steps")
            summed, batch_rows = drift_matrix(recorder.outputs)
            total = summed if total is None else total + summed
            rows, timesteps = rows + batch_rows, result.timesteps
            progress(index + 1, len(prompt_batches))
    finally:
        pipe.runner = original
    drift = total / rows
    return drift, timesteps, np.concatenate([[0.0], np.diagonal(drift, 1)])
