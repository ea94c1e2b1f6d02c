"""The measurement core of fd-bench: arms run alternately from the same latents, then summarised.

Alternating (A B A B …) rather than all-A-then-all-B spreads slow drifts of the machine (thermal,
other processes, page cache) over both arms alike, and lets the speedup be taken pair by pair.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from fd.benchmarks.fidelity import compare
from fd.runtime.cli import check_prompt_kind
from fd.runtime.control import controlnet_records, is_controlnet_graph, prepare_control
from fd.runtime.errors import FdError
from fd.runtime.families import family_of
from fd.runtime.images import load_image
from fd.runtime.img2img import DEFAULT_STRENGTH, prepare_init, steps_run
from fd.runtime.pipeline import MAX_STEPS, FasterDiffusionPipeline, check_guidance_scale, check_seed
from fd.runtime.policy import FasterDiffusionPolicy
from fd.runtime.schedulers import diffusers_scheduler
from fd.runtime.sizes import check_size

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
# Class-conditional folders (DiT): ImageNet's golden retriever, the first class DiT's own sample script draws
# (a model with this few classes gets class 0)
DEFAULT_CLASS_LABEL = "207"
BASELINE, FD, DIFFUSERS = "baseline", "fasterdiffusion", "diffusers"
DENOISER_STAGES = ("denoiser_encoder", "controlnet", "denoiser_decoder")  # the work the FLOP floor counts


@dataclass
class Settings:
    prompt: str | None = None  # text-to-image folders; None: DEFAULT_PROMPT
    class_label: str | int | None = None  # class-conditional folders (DiT); None: default_class_label
    steps: int = 50
    scheduler: str = "ddim"
    batch_size: int = 1
    guidance_scale: float | None = None  # None: the folder's family's (SD/SDXL 7.5, DiT 4.0, PixArt-α 4.5)
    runs: int = 5
    warmup: int = 2
    seed: int = 0
    compare_diffusers: bool = False
    height: int | None = None  # None: the size the engine folder was built for
    width: int | None = None
    # The folder's image inputs, as fd-run takes them: one control image (path or PIL image) per ControlNet,
    # their scales (None: 1.0; one for all or one each), and image to image's start image and strength.
    control_images: tuple = ()
    controlnet_scales: tuple | None = None
    init_image: object = None
    strength: float | None = None

    def prompts(self) -> list:
        """What every arm generates from: the prompt (or class label) repeated batch_size times."""
        return [self.prompt if self.class_label is None else self.class_label] * self.batch_size

    def steps_that_run(self) -> int:
        """Image to image runs the last int(steps x strength) steps; key steps index those."""
        if self.init_image is None:
            return self.steps
        return steps_run(self.steps, DEFAULT_STRENGTH if self.strength is None else self.strength)


@dataclass
class Sample:
    """One timed generation of one arm."""

    total: float
    stages: dict | None  # seconds per pipeline stage (None: the arm does not split its time)
    calls: dict
    peak_rss_bytes: int | None
    device_peak_bytes: int | None
    images: np.ndarray = field(repr=False)  # uint8 (N, H, W, 3)
    latents: np.ndarray | None = field(repr=False)
    rows: dict | None = None  # rows computed per graph (fd arms), so a guidance interval's saving shows


def default_class_label(manifest: dict) -> str:
    classes = int(manifest["family_options"]["num_classes"])
    return DEFAULT_CLASS_LABEL if classes > int(DEFAULT_CLASS_LABEL) else "0"


def check_prompt_inputs(manifest: dict, s: Settings) -> None:
    """--prompt for text folders, --class-label for class-conditional ones (fd-run's check and words), and a class
    label against the model's classes: from the manifest alone, before anything loads."""
    family = family_of(manifest)
    given = SimpleNamespace(prompt=[] if s.prompt is None else [s.prompt],
                            class_label=[] if s.class_label is None else [s.class_label])
    check_prompt_kind(given, family)
    if family.class_conditional and s.class_label is not None:
        from fd.runtime.families.dit import class_id  # the class-conditional family's label rule (ids, id2label names)
        class_id(s.class_label, manifest["family_options"])


def resolve_settings(pipe: FasterDiffusionPipeline, s: Settings) -> Settings:
    """The settings as every arm runs them (and the JSON records them): the image size, the family's guidance
    scale and the family's default prompt or class label where none was given."""
    check_prompt_inputs(pipe.manifest, s)
    height, width = pipe.image_size(s.height, s.width)
    guidance = pipe.family.default_guidance_scale if s.guidance_scale is None else s.guidance_scale
    if pipe.family.class_conditional:
        inputs = {"prompt": None,
                  "class_label": default_class_label(pipe.manifest) if s.class_label is None else s.class_label}
    else:
        inputs = {"prompt": DEFAULT_PROMPT if s.prompt is None else s.prompt, "class_label": None}
    return dataclasses.replace(s, height=height, width=width, guidance_scale=guidance, **inputs)


def check_settings(pipe: FasterDiffusionPipeline, s: Settings, policy: FasterDiffusionPolicy) -> None:
    """Every setting checked before the slow part (loading diffusers, minutes of runs) starts."""
    if not 1 <= s.steps <= MAX_STEPS:
        raise FdError(f"--steps {s.steps} is out of range: use 1 to {MAX_STEPS}")
    max_batch = pipe.manifest["limits"]["max_batch_size"]
    if s.batch_size < 1:
        raise FdError(f"--batch-size {s.batch_size} is not allowed: give 1 or more images per generation")
    if s.batch_size > max_batch:
        raise FdError(f"--batch-size {s.batch_size} does not fit this engine folder (built for 1 to {max_batch} "
                      f"images): use at most {max_batch}, or rebuild with fd-build --max-batch-size {s.batch_size}")
    if s.runs < 1 or s.warmup < 0:
        raise FdError(f"--runs {s.runs} / --warmup {s.warmup}: use at least 1 run and 0 or more warm-up runs")
    check_guidance_scale(s.guidance_scale)
    check_seed(s.seed)
    policy.validate(s.steps)
    check_size(pipe.manifest, s.height, s.width, pipe.engine_dir)
    if policy.max_window > pipe.manifest["limits"]["max_window"]:
        raise FdError(f"max window {policy.max_window} is larger than the engine folder's "
                      f"{pipe.manifest['limits']['max_window']}")
    check_image_inputs(pipe.manifest, s, pipe.engine_dir, policy)


def check_image_inputs(manifest: dict, s: Settings, engine_dir, policy=None) -> None:
    """The pipeline's own checks of --control-image/--controlnet-scale and --init-image/--strength against the
    folder (a ControlNet folder needs its control images, other folders refuse them), so fd-bench refuses them
    in fd-run's words before any engine loads or runs."""
    height = manifest["height"] if s.height is None else s.height
    width = manifest["width"] if s.width is None else s.width
    prepare_control(manifest, list(s.control_images) or None, _list_or_none(s.controlnet_scales), height, width)
    init = prepare_init(manifest, s.init_image, s.strength, s.steps, height, width, engine_dir)
    if init is not None and policy is not None:
        init.check_policy(policy)
    if init is not None and s.compare_diffusers:
        raise FdError("--compare diffusers does not take --init-image: diffusers' image-to-image pipelines draw "
                      "their own noise, so their images could not be compared with fd's; drop one of them")


def _list_or_none(values):
    return None if values is None else list(values)


def run_benchmark(pipe: FasterDiffusionPipeline, s: Settings, policy: FasterDiffusionPolicy,
                  progress=None) -> dict:
    """Warm up, then run every arm `s.runs` times in turn; Ctrl-C returns what was measured so far.

    `progress(total)` makes a tqdm-like bar; it is made only once every check and load has passed, so
    a settings error stays one line on stderr."""
    s = resolve_settings(pipe, s)
    check_settings(pipe, s, policy)
    prompts = s.prompts()
    latents = np.random.default_rng(s.seed).standard_normal(
        (s.batch_size, *pipe.latent_shape_at(s.height, s.width)), dtype=np.float32)
    # each image read once, not in every timed run
    s = dataclasses.replace(s, control_images=tuple(load_image(i, "--control-image") for i in s.control_images),
                            init_image=None if s.init_image is None else load_image(s.init_image, "--init-image"))
    arms = {BASELINE: fd_arm(pipe, s, FasterDiffusionPolicy.baseline(s.steps_that_run()), prompts, latents),
            FD: fd_arm(pipe, s, policy, prompts, latents)}
    measured = {name: [] for name in [*arms, *([DIFFUSERS] if s.compare_diffusers else [])]}
    last: dict[str, Sample] = {}
    first_run: dict[str, float] = {}  # each arm's first generation, warm-up or not: what a cold start costs
    interrupted, rss_after_load, bar = False, None, None
    try:
        if s.compare_diffusers:
            started = time.perf_counter()
            arms[DIFFUSERS] = diffusers_arm(pipe.manifest, s, prompts, latents, pipe.runner.capabilities.on_gpu)
            arms[DIFFUSERS].info["load_seconds"] = time.perf_counter() - started
        rss_after_load = _proc_status("VmRSS")  # every model loaded, nothing run yet
        phases = ["warmup"] * s.warmup + ["measure"] * s.runs
        bar = progress(len(phases) * len(arms)) if progress else None
        for phase in phases:
            for name, arm in arms.items():
                if bar is not None:
                    bar.set_postfix_str(f"{phase} {name}")
                last[name] = arm()
                first_run.setdefault(name, last[name].total)
                if phase == "measure":
                    measured[name].append(last[name])
                if bar is not None:
                    bar.update()
    except KeyboardInterrupt:  # a half-finished run is dropped; finished runs are kept and reported
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    result = summarize(pipe.manifest, s, policy, measured, last, interrupted, rss_after_load)
    for name, arm in arms.items():
        result["arms"][name].update(getattr(arm, "info", {}))
        result["arms"][name]["first_run_seconds"] = first_run.get(name)
    if pipe.runner.capabilities.peak_memory:
        result["memory"]["device_peak"] = "per run"
    return result


def fd_arm(pipe, s: Settings, policy, prompts, latents):
    def run() -> Sample:
        reset = _reset_peaks(pipe.runner)
        result = pipe(prompts, steps=s.steps, scheduler=s.scheduler, guidance_scale=s.guidance_scale,
                      latents=latents, seed=s.seed, policy=policy, height=s.height, width=s.width,
                      control_images=list(s.control_images) or None,
                      controlnet_scales=_list_or_none(s.controlnet_scales), init_image=s.init_image,
                      strength=s.strength)
        device = pipe.runner.peak_memory_bytes if pipe.runner.capabilities.peak_memory else None
        # every stage the pipeline timed (the ControlNets and the VAE encoder too, when the run has them)
        stages = {k: v for k, v in result.timings.items() if k != "total"}
        stages["other"] = max(result.timings["total"] - sum(stages.values()), 0.0)  # untimed glue
        images = np.stack([np.asarray(image) for image in result.images])
        return Sample(result.timings["total"], stages, dict(result.calls), host_peak_bytes(reset),
                      device() if device else None, images, result.latents, dict(result.rows))
    return run


def diffusers_arm(manifest: dict, s: Settings, prompts, latents, on_gpu: bool):
    """diffusers' own pipeline of the folder's family on the weights the engine folder was built from; with the
    folder's ControlNets, the family's ControlNet pipeline (StableDiffusionControlNetPipeline, the SDXL one)
    given the same control images and scales. How each family's pipeline is called (its arguments, where its
    denoiser and final latents are) is the build family's: diffusers_call, diffusers_denoiser."""
    try:
        import diffusers
        import torch
        import transformers
        from fd.builder.families import FAMILIES
        from fd.builder.models import load_components
    except ImportError:
        raise FdError("--compare diffusers needs torch and diffusers: pip install 'fd[build]'") from None
    for library in (diffusers, transformers):  # their notices would land in the middle of the progress bar
        library.utils.logging.set_verbosity_error()
    source = manifest["source"]
    model = source["model"] if source.get("kind") == "generated" else source.get("path")
    if not model or (source.get("kind") != "generated" and not os.path.isdir(model)):
        raise FdError(f"--compare diffusers cannot find the model this engine folder was built from "
                      f"({source.get('model')}, path {source.get('path')}): put it back there, or drop --compare")
    comps = load_components(model)
    if source.get("weights_sha256") and comps.source["weights_sha256"] != source["weights_sha256"]:
        raise FdError(f"the weights at {model} are not the ones this engine folder was built from: "
                      "rebuild the folder from them, or drop --compare")
    scheduler = diffusers_scheduler(s.scheduler, manifest["scheduler_config"])  # the registry's counterpart
    # The engine's device, and its precision where that is a GPU; fp32 on the CPU (fp16 is slow there).
    if on_gpu and not torch.cuda.is_available():
        raise FdError("--compare diffusers: the engine runs on a GPU but this torch has no CUDA: install a CUDA torch")
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.float16 if device == "cuda" and manifest["precision"] == "fp16" else torch.float32
    family = FAMILIES[comps.family]
    pipe = family.diffusers_pipeline(comps, scheduler)
    family.check_diffusers_call(pipe, s.height, s.width)
    controlnets = diffusers_controlnets(manifest, comps)
    if controlnets:
        pipe = with_controlnets(pipe, controlnets)
    if (device, dtype) != ("cpu", torch.float32):  # the components load as fp32 on the CPU already
        pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    denoiser_calls = []  # counted under the pipeline's own name for its denoiser: "unet", "transformer"
    getattr(pipe, family.diffusers_denoiser).register_forward_pre_hook(lambda *_: denoiser_calls.append(1))
    graphs = [record["graph"] for record in controlnet_records(manifest)]
    controlnet_calls = {graph: [] for graph in graphs}  # named as fd's graphs, so the call rows line up
    for graph, model in zip(graphs, controlnets):
        model.register_forward_pre_hook(lambda *_, calls=controlnet_calls[graph]: calls.append(1))
    control = {}
    if controlnets:  # one image and scale for one ControlNet, lists for several (MultiControlNet)
        scales = list(s.controlnet_scales or [1.0])
        scales = scales * len(controlnets) if len(scales) == 1 else scales
        control = {"image": list(s.control_images), "controlnet_conditioning_scale": scales}
        if len(controlnets) == 1:
            control = {k: v[0] for k, v in control.items()}
    start_latents = torch.from_numpy(latents).to(device, dtype)

    def run() -> Sample:
        reset = _reset_peaks(None)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = len(denoiser_calls)
        control_before = {graph: len(calls) for graph, calls in controlnet_calls.items()}
        started = time.perf_counter()
        with torch.inference_mode():  # the same prompts, latents and settings as fd's arms, no negative prompt
            images, final = family.diffusers_call(pipe, prompts, start_latents, steps=s.steps,
                                                  guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                                                  **control)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - started
        images = (np.asarray(images, dtype=np.float32) * 255).round().astype(np.uint8)
        calls = {family.diffusers_denoiser: len(denoiser_calls) - before,
                 **{graph: len(c) - control_before[graph] for graph, c in controlnet_calls.items()}}
        return Sample(total, None, calls, host_peak_bytes(reset),
                      torch.cuda.max_memory_allocated() if device == "cuda" else None, images,
                      None if final is None else final.float().cpu().numpy())
    run.info = {"pipeline": type(pipe).__name__, "device": device, "dtype": str(dtype).removeprefix("torch."),
                "scheduler": type(scheduler).__name__}
    return run


def diffusers_controlnets(manifest: dict, comps) -> list:
    """The folder's ControlNets as diffusers ControlNetModels, made or loaded as fd-build did, in build order;
    weights that are not the ones the folder was built from are one line."""
    from fd.builder.controlnet import load_controlnet
    models = []
    for record in controlnet_records(manifest):
        source = record["source"]
        name = source.get("path") if source.get("kind") == "local" else source.get("model")
        if not name or (source.get("kind") == "local" and not os.path.isdir(name)):
            raise FdError(f"--compare diffusers cannot find the ControlNet {record['graph']} was built from "
                          f"({source.get('model')}, path {source.get('path')}): put it back there, or drop --compare")
        loaded = load_controlnet(name, comps.unet)
        if source.get("weights_sha256") and loaded.source["weights_sha256"] != source["weights_sha256"]:
            raise FdError(f"the ControlNet weights at {name} are not the ones this engine folder was built from: "
                          "rebuild the folder from them, or drop --compare")
        models.append(loaded.model)
    return models


def with_controlnets(pipe, controlnets: list):
    """The family's pipeline turned into its ControlNet pipeline on the same components and scheduler
    (diffusers' AutoPipelineForText2Image.from_pipe picks StableDiffusion[XL]ControlNetPipeline)."""
    import inspect
    from diffusers import AutoPipelineForText2Image
    extra = {}
    if "add_watermarker" in inspect.signature(type(pipe).__init__).parameters:
        extra["add_watermarker"] = False  # as the family's own pipeline: from_pipe does not carry it over
    return AutoPipelineForText2Image.from_pipe(
        pipe, controlnet=controlnets[0] if len(controlnets) == 1 else controlnets, **extra)


# --- memory ---------------------------------------------------------------------------------------------

def _reset_peaks(runner) -> bool:
    """Reset the peaks so each run reports its own. Linux resets a process's peak RSS (VmHWM) when 5 is
    written to /proc/self/clear_refs; elsewhere the peak stays the process's since its start."""
    if runner is not None:
        runner.reset_peak_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes(was_reset: bool) -> int | None:
    peak = _proc_status("VmHWM") if was_reset else None
    if peak is None:  # the process's peak since its start (ru_maxrss: kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def _proc_status(key: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), None)
    return None


# --- summary --------------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} \
        if values else None


def _max(values):
    return max((v for v in values if v is not None), default=None)


def encoder_side(flops: dict) -> list[str]:
    """The graphs that run only at key steps with FasterDiffusion: the denoiser encoder and every ControlNet."""
    return ["denoiser_encoder", *(name for name in flops if is_controlnet_graph(name))]


def flop_floor(flops: dict, steps: int, key_steps: int) -> float:
    """The denoiser speedup skipping the encoder side allows at best: steps·(E+C+D) / (K·(E+C) + steps·D), with
    C the ControlNets' FLOPs (0 without), which run where the encoder runs."""
    e, d = sum(flops[name] for name in encoder_side(flops)), flops["denoiser_decoder"]
    return steps * (e + d) / (key_steps * e + steps * d)


def flop_floor_of_rows(flops: dict, baseline_rows: dict, fd_rows: dict) -> float:
    """The same floor from the rows each arm's graphs really computed (the denoiser halves and the ControlNets
    whose FLOPs the manifest holds): it also counts rows a guidance interval skips and extra model
    evaluations (PLMS), which the key-step count alone does not see."""
    def work(rows):
        return sum(rows.get(name, 0) * flops[name] for name in [*encoder_side(flops), "denoiser_decoder"])
    return work(baseline_rows) / work(fd_rows)


def floor_record(manifest: dict, s: Settings, policy, last: dict) -> dict | None:
    """The FLOP floor and what it counted, or None when the folder has no FLOP counts."""
    flops = manifest.get("flops_per_sample")
    if not flops:
        return None
    graphs = [record["graph"] for record in controlnet_records(manifest)]
    flops = {name: value for name, value in flops.items()
             if name in ("denoiser_encoder", "denoiser_decoder") or name in graphs}
    k = len(policy.key_steps)
    rows = {name: last[name].rows for name in (BASELINE, FD) if name in last and last[name].rows}
    floor = {"denoiser_encoder_flops": flops["denoiser_encoder"], "denoiser_decoder_flops": flops["denoiser_decoder"],
             "controlnet_flops": {graph: flops.get(graph) for graph in graphs} or None,
             "steps": s.steps_that_run(), "key_steps": k, "counted": "rows" if len(rows) == 2 else "key steps",
             "unet_speedup": flop_floor_of_rows(flops, rows[BASELINE], rows[FD]) if len(rows) == 2
             else flop_floor(flops, s.steps_that_run(), k)}
    missing = [graph for graph in graphs if graph not in flops]
    if missing:
        floor["note"] = (f"no FLOP count for {', '.join(missing)} in the manifest (built before fd-build counted "
                         "ControlNets): the floor leaves them out; rebuild the folder to count them")
    return floor


def summarize(manifest, s: Settings, policy, measured: dict, last: dict, interrupted: bool, rss_after_load) -> dict:
    arms = {}
    for name, samples in measured.items():
        arm = {"runs_measured": len(samples),
               "seconds_per_image": spread([x.total / s.batch_size for x in samples]),
               "stage_seconds_median": None, "calls": samples[-1].calls if samples else None,
               "rows": samples[-1].rows if samples else None,
               "peak_rss_bytes": _max(x.peak_rss_bytes for x in samples),
               "device_peak_bytes": _max(x.device_peak_bytes for x in samples),
               "runs": [{"total": x.total, "stages": x.stages, "peak_rss_bytes": x.peak_rss_bytes,
                         "device_peak_bytes": x.device_peak_bytes} for x in samples]}
        if samples:
            keys = list(samples[0].stages or {}) + ["total"]
            arm["stage_seconds_median"] = {k: statistics.median(x.total if k == "total" else x.stages[k]
                                                                for x in samples) for k in keys}
        arms[name] = arm
    arms[BASELINE]["policy"] = FasterDiffusionPolicy.baseline(s.steps).describe()
    arms[FD]["policy"] = policy.describe()

    def pairwise(slow: str, fast: str, unet_only=False):
        def seconds(x):  # "UNet only": the denoiser's halves and the ControlNets, the work the floor counts
            return sum(x.stages.get(stage, 0.0) for stage in DENOISER_STAGES) if unet_only else x.total
        pairs = list(zip(measured.get(slow, []), measured.get(fast, [])))
        return spread([seconds(a) / seconds(b) for a, b in pairs])

    # "x_over_y" = how many times faster x is than y (y's seconds / x's seconds), run k against run k
    speedup = {"fd_over_baseline": pairwise(BASELINE, FD), "fd_over_baseline_unet": pairwise(BASELINE, FD, True)}
    if s.compare_diffusers:
        speedup["fd_over_diffusers"] = pairwise(DIFFUSERS, FD)
        speedup["baseline_over_diffusers"] = pairwise(DIFFUSERS, BASELINE)

    floor = floor_record(manifest, s, policy, last)
    if floor:
        for key, measured_key in (("fraction_of_floor", "fd_over_baseline"),
                                  ("fraction_of_floor_unet", "fd_over_baseline_unet")):
            got = speedup[measured_key]
            floor[key] = got["median"] / floor["unet_speedup"] if got else None

    fidelity = {}
    for name in (FD, DIFFUSERS):
        if BASELINE in last and name in last:
            a, b = last[name], last[BASELINE]
            fidelity[f"{name}_vs_baseline"] = compare(a.images, b.images, a.latents, b.latents)
    return {"complete": not interrupted, "arms": arms, "speedup": speedup, "flop_floor": floor,
            "fidelity": fidelity, "memory": {"rss_after_load_bytes": rss_after_load, "host_peak": (
                "per run (VmHWM reset before each run)" if os.access("/proc/self/clear_refs", os.W_OK)
                else "the process's peak since its start (not per arm)")}}
