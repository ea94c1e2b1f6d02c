"""fd-build's TensorRT step: each checked ONNX graph of the manifest's specs → one serialized engine,
<graph>.plan, with one optimization profile from the specs' named axes (runtime/backends/trt_plan.py).

Polygraphy's loaders do the work (NetworkFromOnnxPath → CreateConfig → EngineBytesFromNetwork). Every
network is strongly typed, so each tensor keeps the type its ONNX graph gives it:
  fp16  the UNet graphs are fp16, and the VAE's unless its config forces fp32 (SDXL's force_upcast). The
        text encoder graphs compute in fp32 in every precision and only cast their outputs for the UNet
        (builder/families: text_graphs), and their engines stay fp32 inside too: they run once per prompt,
        so fp16 would save little, and letting TensorRT pick fp16 kernels for them needs the weak-typing
        FP16 flag (below). The timestep input stays fp32 (the sinusoid needs it). TF32 is allowed for
        these fp32 parts, as TensorRT does by default.
  fp32  fp32 graphs, TF32 off: full fp32 products.
  tf32  fp32 graphs, TF32 on: products of 10-bit mantissas, fp32 sums.
Strong typing is the only typing TensorRT 11 has (it removed the weak-typing FP16 flag, and ignores the
STRONGLY_TYPED flag because it is always on); for fp32 graphs it changes nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from fd.runtime.backends import trt_plan
from fd.runtime.atomic import write_atomic
from fd.runtime.backends.cuda_memory import cuda_device
from fd.runtime.backends.tensorrt import import_tensorrt
from fd.runtime.errors import FdError

NOT_INSTALLED_FIX = "or build for --backend onnxruntime"


def require_tensorrt() -> None:
    """Fail before the long export when TensorRT, Polygraphy, cuda-python or the GPU is missing."""
    import_tensorrt(NOT_INSTALLED_FIX)
    try:
        import polygraphy.backend.trt  # noqa: F401
    except Exception:
        raise FdError("Polygraphy is not installed: pip install polygraphy "
                      "(fd-build builds TensorRT engines with it)") from None
    cuda_device()


def finish(stage: Path, specs: dict, modules: dict, precision: str, opts, geometry: dict, log) -> dict:
    """Replace each ONNX graph in `stage` (every graph of `specs`) by its engine; return manifest["backend_info"].

    `modules` is unused: the graphs were checked against them before this step."""
    trt = import_tensorrt(NOT_INSTALLED_FIX)
    options = opts.backend_options or {}
    level = options.get("optimization_level")  # None: TensorRT's default (3)
    cache = Path(options.get("timing_cache") or stage.parent / "timing.cache")  # shared by the folders beside
    profiles, seconds = {}, {}
    for name in specs:
        graph = stage / specs[name]["file"]
        shapes = trt_plan.profile_shapes(specs[name], geometry)
        started = time.perf_counter()
        plan = build_engine(trt, graph, shapes, precision, level, cache, label=name,
                            refittable=getattr(opts, "refittable", False))
        (stage / trt_plan.engine_filename(name)).write_bytes(plan)
        seconds[name] = round(time.perf_counter() - started, 1)
        log(f"  {name}: TensorRT engine built in {seconds[name]:.1f} s")
        kept = [Path(f"{graph}.data")] if getattr(opts, "refittable", False) else []  # a refit reads the weights
        for leftover in {graph, Path(f"{graph}.data")} - set(kept):
            leftover.unlink(missing_ok=True)
        specs[name]["file"] = trt_plan.engine_filename(name)
        specs[name]["profile"] = profiles[name] = trt_plan.profile_record(shapes)
    gpu_name, capability = cuda_device()
    return trt_plan.backend_info(tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                                 profiles=profiles, build_seconds=seconds, optimization_level=level,
                                 strongly_typed=True, precision=precision, timing_cache=str(cache))


def build_engine(trt, graph: Path, shapes: dict, precision: str, level: int | None, cache: Path, label: str,
                 refittable: bool = False):
    """One ONNX graph → serialized engine (trt.IHostMemory), reading and then updating the timing cache."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    monitor = progress_monitor(trt, label)
    try:
        network = NetworkFromOnnxPath(str(graph), strongly_typed=True,
                                      flags=[trt.OnnxParserFlag.NATIVE_INSTANCENORM])()  # GroupNorm stays native
        config = CreateConfig(tf32=precision != "fp32", profiles=[profile], builder_optimization_level=level,
                              progress_monitor=monitor, refittable=refittable)(*network[:2])
        reuse_timing_cache(config, cache)
        plan = EngineBytesFromNetwork(network, config=config)()
    except Exception as exc:
        if monitor.cancelled:
            raise KeyboardInterrupt from None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FdError(f"TensorRT could not build the {label} engine ({reason}); the TensorRT log above has the "
                      "details, and a smaller --max-batch-size or --max-window lowers the memory it needs") from None
    finally:
        monitor.close()
    save_timing_cache(config, cache)
    return plan


def reuse_timing_cache(config, path: Path) -> None:
    """Merge the timings of earlier builds into this build's (empty) timing cache.

    Done here rather than with CreateConfig(load_timing_cache=…): Polygraphy reads `.mode` of a file-like
    cache (a BytesIO has none) and leaves a .lock file beside a path. ITimingCache.combine refuses a cache
    made by another TensorRT version or GPU; the build then starts afresh and its cache replaces the file."""
    if not path.is_file():
        return
    old, current = config.create_timing_cache(path.read_bytes()), config.get_timing_cache()
    if old is not None and current is not None:
        current.combine(old, False)  # ignore_mismatch=False: never mix in timings of another device


def save_timing_cache(config, path: Path) -> None:
    """Write what the builder timed (plus what it loaded) so that readers see the old file or the new one."""
    timing_cache = config.get_timing_cache()
    if timing_cache is None:  # no cache attached to this build: nothing to keep
        return
    write_atomic(path, lambda f: f.write(timing_cache.serialize()))


def progress_monitor(trt, label: str):
    """A tensorrt.IProgressMonitor that shows each build phase as a tqdm bar (phases nest, bars stack)."""

    class TqdmProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)  # pybind11 trampolines need the base initialised explicitly
            self.bars: dict[str, tqdm] = {}
            self.cancelled = False

        # TensorRT calls these from C++, which prints a Python exception and carries on: Ctrl-C is noted in
        # each of them, step_complete's False then cancels the build, and build_engine raises it again.
        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                self.bars[phase_name] = tqdm(total=num_steps, desc=f"{label}: {phase_name}", unit="step",
                                             leave=False, position=len(self.bars))
            except KeyboardInterrupt:
                self.cancelled = True

        def step_complete(self, phase_name, step):
            try:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            except KeyboardInterrupt:
                self.cancelled = True
            return not self.cancelled

        def phase_finish(self, phase_name):
            try:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()
            except KeyboardInterrupt:
                self.cancelled = True

        def close(self):
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

    return TqdmProgress()
