"""PyTorch runner: the folder's torch.export programs (.pt2), eager on CUDA when there is one, else on CPU.

Needs torch only (no diffusers, no transformers): the programs carry their own graphs and weights, and
are loaded through torch_archive.load_program, which refuses anything torch would unpickle or execute.
With cuda_graphs=True each (graph, input shapes) is captured once as a CUDA graph and replayed.
"""
from __future__ import annotations

import numpy as np

from fd.runtime.backends.runner import NUMPY_DTYPES, Capabilities, Runner
from fd.runtime.backends.torch_archive import UnsafeProgram, _first_sentence, load_program
from fd.runtime.errors import FdError

WARMUP_RUNS = 2  # eager runs before a capture, so lazy initialisation (cuBLAS handles, autotuning) is not captured


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, engine_dir, manifest: dict, device: str | None = None, cuda_graphs: bool = False):
        super().__init__(engine_dir, manifest)
        try:
            import torch
        except ImportError:
            raise FdError("this engine folder needs PyTorch: install torch (see the README)") from None
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FdError(f"device {self.device} asked for, but this PyTorch sees no CUDA GPU")
        if self.device.type == "cuda" and self.device.index is None:  # programs get the same device as inputs
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cuda_graphs and self.device.type != "cuda":
            raise FdError("--cuda-graphs needs a CUDA GPU; this run is on the CPU (drop --cuda-graphs)")
        self.capabilities = Capabilities(on_gpu=self.device.type == "cuda", peak_memory=self.device.type == "cuda",
                                         cuda_graphs=self.device.type == "cuda", dynamic_shapes=False)
        self.inputs = {name: [t["name"] for t in spec["inputs"]] for name, spec in self.specs.items()}
        self.outputs = {name: [t["name"] for t in spec["outputs"]] for name, spec in self.specs.items()}
        self.modules = {name: self._load(name, spec) for name, spec in self.specs.items()}
        self.graphs: dict | None = {} if cuda_graphs else None
        # One memory pool for all captured graphs (not one per shape, which would hold the activations of
        # every window size at once). Safe here because graphs replay one at a time on one stream and each
        # replay's outputs are copied out before any other graph runs (see _replay), so whatever a graph
        # leaves in shared memory is never read after another graph has replayed.
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def _load(self, component: str, spec: dict):
        file = spec["file"]
        try:
            return load_program(self.engine_dir / file, self.device, spec)
        except Exception as exc:  # noqa: BLE001 - any unreadable or refused program is one user-facing line
            built = self.manifest.get("backend_info", {}).get("torch_version", "?")
            versions = "" if built == self.torch.__version__ else \
                f" (built with torch {built}, this is torch {self.torch.__version__})"
            reason = str(exc) if isinstance(exc, UnsafeProgram) else f"{type(exc).__name__}: {_first_sentence(exc)}"
            raise FdError(f"cannot load {file} ({component}){versions}: {reason}; "
                          "rebuild the folder with fd-build --backend torch --force") from None

    # --- primitives -----------------------------------------------------------------------------------
    def _execute(self, graph, feeds):
        args = [feeds[name] for name in self.inputs[graph]]
        with self.torch.inference_mode():
            if self.graphs is not None:
                out = self._replay(graph, args)
            else:
                out = self.modules[graph](*args)
        return dict(zip(self.outputs[graph], out if isinstance(out, (tuple, list)) else [out]))

    def upload(self, array, dtype):
        # np.array copies: the tensor never aliases (possibly read-only) caller memory on the CPU.
        return self.torch.from_numpy(np.array(array, dtype=NUMPY_DTYPES[dtype])).to(self.device)

    def download(self, value):
        return value.detach().cpu().numpy()

    def concat(self, values, axis=0, key=None):
        with self.torch.inference_mode():
            return self.torch.cat(values, dim=axis)

    def take_rows(self, value, start, stop):
        with self.torch.inference_mode():
            return value[start:stop]  # a view; rows of a contiguous tensor stay contiguous

    def zeros_like(self, value):
        with self.torch.inference_mode():
            return self.torch.zeros_like(value)

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def close(self):
        self.modules.clear()
        if self.graphs:
            self.graphs.clear()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory PyTorch allocated since loading or the last reset (None on the CPU)."""
        return self.torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def reset_peak_memory(self) -> None:
        """Start a new peak (benchmarks reset before each run so every run reports its own)."""
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    # --- CUDA graphs ----------------------------------------------------------------------------------
    def _replay(self, component: str, args: list) -> list:
        """Run through the graph captured for these input shapes (capturing it on first use).

        Valid because a captured graph replays the same kernels on the same addresses: the inputs are
        copied into the static tensors the graph was captured on, and the programs have no data-dependent
        control flow or host syncs, so for fixed shapes the kernel sequence is the one captured.
        """
        key = (component, *(tuple(a.shape) for a in args))
        with self.torch.cuda.device(self.device):  # capture and replay on this device's current stream
            if key not in self.graphs:
                self.graphs[key] = self._capture(component, args)
            graph, static_inputs, static_outputs = self.graphs[key]
            for static, value in zip(static_inputs, args):
                static.copy_(value)
            graph.replay()
            # Later replays (of this graph, or of another one in the shared pool) may overwrite the static
            # outputs, while the cache must outlive its window's decoder calls: hand out copies now
            # (device to device, microseconds next to a UNet pass).
            return [out.clone() for out in static_outputs]

    def _capture(self, component: str, args: list):
        torch, module = self.torch, self.modules[component]
        static_inputs = [a.clone() for a in args]
        # Warm up on a side stream, as PyTorch's CUDA graph docs require, so that one-time setup work
        # runs eagerly and the capture records only the steady-state kernels.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                module(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = module(*static_inputs)
        return graph, static_inputs, list(out) if isinstance(out, (tuple, list)) else [out]
