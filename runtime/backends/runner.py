"""The one runner interface: run a graph by name on a dict of tensors, in the backend's own arrays.

A backend supplies a few primitives (`_execute`, `upload`, `download`, `concat`, `take_rows`, `zeros_like`, and
`synchronize` / `close` where it has a device); the stages (runtime/stages.py) and the families' prompt
stages are written once on top of them. Values passed between graphs (text embeddings, the cache, the
added conditions) stay runner-native: on a GPU they never visit the host between the text encoders and
the VAE, only the latents the numpy scheduler steps do.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class Capabilities:
    """What a loaded runner can do here (the backend table, runtime/backends/__init__.py, says what each
    backend can do anywhere)."""

    on_gpu: bool
    peak_memory: bool  # reports the device's peak memory per run (peak_memory_bytes / reset_peak_memory)
    cuda_graphs: bool
    dynamic_shapes: bool


class Runner:
    name = "base"

    def __init__(self, engine_dir, manifest: dict):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.specs = manifest["components"]
        self.input_dtypes = {graph: {t["name"]: t["dtype"] for t in spec["inputs"]} for graph, spec in self.specs.items()}
        self.calls: Counter[str] = Counter()  # graph executions per graph, for reports and tests
        self.rows: Counter[str] = Counter()  # rows (batch entries) computed per graph, summed over its calls

    capabilities = Capabilities(on_gpu=False, peak_memory=False, cuda_graphs=False, dynamic_shapes=False)

    # --- primitives -----------------------------------------------------------------------------------
    def _execute(self, graph: str, feeds: dict) -> dict:
        """Execute one graph on runner-native inputs; return {output name: runner-native value}."""
        raise NotImplementedError

    def upload(self, array: np.ndarray, dtype: str):
        """Host array → runner-native array of `dtype` (a spec dtype name)."""
        raise NotImplementedError

    def download(self, value) -> np.ndarray:
        raise NotImplementedError

    def concat(self, values: list, axis: int = 0, key: str | None = None):
        """Join runner-native arrays along `axis`. `key` names the use ("denoiser_decoder.mid" for the decoder's
        input), so a runner with fixed buffers can write the result where that graph reads it; a result
        stays valid until the next concat with the same key."""
        raise NotImplementedError

    def rows_of(self, value) -> int:
        """The batch size (axis 0) of a runner-native value."""
        return len(value)

    def take_rows(self, value, start: int, stop: int):
        """Rows start…stop-1 (axis 0) of a runner-native value, as a view where the backend can (no copy);
        valid as long as `value` is."""
        raise NotImplementedError

    def zeros_like(self, value):
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (so that stage timings are true)."""

    def close(self) -> None:
        """Release sessions, engines and device memory."""

    def peak_memory_bytes(self) -> int | None:
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak (benchmarks reset before each run)."""

    # A graph's batch range starts at the manifest's min (the decoder's at 2). TensorRT's profiles refuse a
    # batch below it, and torch.export's batch Dim declares it (torch 2.13 happens not to check it at call
    # time; fd does not rely on that); ONNX Runtime's batch axis is free, so its runner sets this False.
    holds_batch_minimum = True

    def min_rows(self, graph: str) -> int:
        """The fewest rows one call of `graph` may carry here."""
        return self.specs[graph]["batch"]["min"] if self.holds_batch_minimum else 1

    # --- written once -----------------------------------------------------------------------------------
    def run(self, graph: str, feeds: dict) -> dict:
        """Run `graph`; host arrays among `feeds` are uploaded in the dtypes its spec asks for."""
        self.calls[graph] += 1
        first = feeds[self.specs[graph]["inputs"][0]["name"]]
        self.rows[graph] += len(first) if isinstance(first, np.ndarray) else self.rows_of(first)  # every input has the batch axis first
        dtypes = self.input_dtypes[graph]
        return self._execute(graph, {name: self.upload(value, dtypes[name]) if isinstance(value, np.ndarray) else value
                                     for name, value in feeds.items()})

    def upload_input(self, graph: str, name: str, array: np.ndarray):
        """A host array uploaded as `graph`'s input `name` expects it (for values several graphs share)."""
        return self.upload(array, self.input_dtypes[graph][name])
