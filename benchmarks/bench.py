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

import numpy as np

from fd.benchmarks import peers
from fd.benchmarks.fidelity import compare
from fd.runtime.control import controlnet_records, is_controlnet_graph
from fd.runtime.errors import FdError
from fd.runtime.families import family_of
from fd.runtime.images import load_image
from fd.runtime.pipeline import FasterDiffusionPipeline, Plan
from fd.runtime.policy import FasterDiffusionPolicy
from fd.runtime.request import Policy, Request
from fd.runtime.schedulers import diffusers_scheduler

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
# Class-conditional folders (DiT): ImageNet's golden retriever, the first class DiT's own sample script draws
# (a model with this few classes gets class 0)
DEFAULT_CLASS_LABEL = "207"
BASELINE, FD, DIFFUSERS = "baseline", "fasterdiffusion", "diffusers"
DENOISER_STAGES = ("denoiser_encoder", "controlnet", "denoiser_decoder")  # the work the FLOP floor counts


@dataclass
class Settings:
    """One benchmark: the generation every arm runs (its policy is the FD arm's; the baseline arm runs every step
    a key step), and how often."""

    request: Request  # the prompt (or class label) repeated --batch-size times, steps, scheduler, images, ...
    runs: int = 5
    warmup: int = 2
    compare_diffusers: bool = False
    peers: tuple = ()  # benchmarks/peers.py Peers: diffusers' cache hooks on its pipeline (need the diffusers arm)

    @property
    def batch_size(self) -> int:
        return len(self.request.inputs)


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


def default_inputs(manifest: dict, prompt: str | None, class_label: str | None, batch_size: int) -> dict:
    """The Request's prompts or class labels: the one given, else the family's default (DEFAULT_PROMPT, or
    default_class_label on class-conditional folders), repeated batch_size times; what the folder does not take is
    left as given, for the pipeline to refuse in fd-run's words."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FdError(f"--batch-size {batch_size} is not allowed: give 1 or more images per generation")
    if prompt is None and class_label is None:
        if family_of(manifest).class_conditional:
            class_label = default_class_label(manifest)
        else:
            prompt = DEFAULT_PROMPT
    return {"prompts": [] if prompt is None else [prompt] * batch_size,
            "class_labels": [] if class_label is None else [class_label] * batch_size}


def check_settings(pipe: FasterDiffusionPipeline, s: Settings) -> Plan:
    """Every setting checked against the folder before the slow part (loading diffusers, minutes of runs) starts;
    the FD arm's plan."""
    max_batch = pipe.manifest["limits"]["max_batch_size"]
    if s.batch_size > max_batch:
        raise FdError(f"--batch-size {s.batch_size} does not fit this engine folder (built for 1 to {max_batch} "
                      f"images): use at most {max_batch}, or rebuild with fd-build --max-batch-size {s.batch_size}")
    if s.runs < 1 or s.warmup < 0:
        raise FdError(f"--runs {s.runs} / --warmup {s.warmup}: use at least 1 run and 0 or more warm-up runs")
    plan = pipe.prepare(s.request)
    if s.peers and not s.compare_diffusers:
        raise FdError("the peer arms run on diffusers' pipeline and are measured against it: add --compare diffusers")
    for peer in s.peers:
        peers.check_family(peer, pipe.manifest.get("family"))
    if plan.init is not None and s.compare_diffusers:
        raise FdError("--compare diffusers does not take --init-image: diffusers' image-to-image pipelines draw "
                      "their own noise, so their images could not be compared with fd's; drop one of them")
    return plan


def resolved(s: Settings, plan: Plan) -> Settings:
    """The settings as every arm runs them (and the JSON records them): the folder's size, the family's guidance."""
    return dataclasses.replace(s, request=s.request.replace(height=plan.height, width=plan.width,
                                                            guidance_scale=plan.guidance_scale))


def run_benchmark(pipe: FasterDiffusionPipeline, s: Settings, progress=None) -> dict:
    """Warm up, then run every arm `s.runs` times in turn; Ctrl-C returns what was measured so far.

    `progress(total)` makes a tqdm-like bar; it is made only once every check and load has passed, so
    a settings error stays one line on stderr."""
    plan = check_settings(pipe, s)
    s = resolved(s, plan)
    # each image read once, not in every timed run (and diffusers' arm takes images, not paths)
    s = dataclasses.replace(s, request=s.request.replace(
        control_images=[load_image(image, "--control-image") for image in s.request.control_images],
        init_image=None if s.request.init_image is None else load_image(s.request.init_image, "--init-image")))
    policy = plan.policy
    prompts = s.request.inputs
    latents = np.random.default_rng(s.request.seed).standard_normal(
        (s.batch_size, *pipe.latent_shape_at(plan.height, plan.width)), dtype=np.float32)
    arms = {BASELINE: fd_arm(pipe, s.request.replace(latents=latents, policy=Policy(baseline=True))),
            FD: fd_arm(pipe, s.request.replace(latents=latents, policy=policy))}
    measured = {name: [] for name in [*arms, *([DIFFUSERS] if s.compare_diffusers else []),
                                      *(peer.label for peer in s.peers)]}
    last: dict[str, Sample] = {}
    first_run: dict[str, float] = {}  # each arm's first generation, warm-up or not: what a cold start costs
    interrupted, rss_after_load, bar = False, None, None
    try:
        if s.compare_diffusers:
            started = time.perf_counter()
            arms[DIFFUSERS] = diffusers_arm(pipe.manifest, s, prompts, latents, pipe.runner.capabilities.on_gpu)
            arms[DIFFUSERS].info["load_seconds"] = time.perf_counter() - started
            arms.update(getattr(arms[DIFFUSERS], "peers", {}))
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
    result = summarize(pipe.manifest, s, plan, measured, last, interrupted, rss_after_load)
    for name, arm in arms.items():
        result["arms"][name].update(getattr(arm, "info", {}))
        result["arms"][name]["first_run_seconds"] = first_run.get(name)
    if pipe.runner.capabilities.peak_memory:
        result["memory"]["device_peak"] = "per run"
    return result


def fd_arm(pipe, request: Request):
    def run() -> Sample:
        reset = _reset_peaks(pipe.runner)
        result = pipe(request)
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
    scheduler = diffusers_scheduler(s.request.scheduler, manifest["scheduler_config"])  # the registry's counterpart
    # The engine's device, and its precision where that is a GPU; fp32 on the CPU (fp16 is slow there).
    if on_gpu and not torch.cuda.is_available():
        raise FdError("--compare diffusers: the engine runs on a GPU but this torch has no CUDA: install a CUDA torch")
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.float16 if device == "cuda" and manifest["precision"] == "fp16" else torch.float32
    family = FAMILIES[comps.family]
    pipe = family.diffusers_pipeline(comps, scheduler)
    family.check_diffusers_call(pipe, s.request.height, s.request.width)
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
        scales = list(s.request.controlnet_scales or [1.0])
        scales = scales * len(controlnets) if len(scales) == 1 else scales
        control = {"image": list(s.request.control_images), "controlnet_conditioning_scale": scales}
        if len(controlnets) == 1:
            control = {k: v[0] for k, v in control.items()}
    start_latents = torch.from_numpy(latents).to(device, dtype)
    denoiser = getattr(pipe, family.diffusers_denoiser)
    linear_flops = peers.counting_linear_flops(denoiser) if s.peers else None  # the work each arm really did

    def generate(starting, cache=None):
        """One generation; `cache`: a diffusers cache config enabled for it (a peer arm)."""
        with torch.inference_mode(), (peers.enabled(denoiser, cache, own_context) if cache is not None
                                      else contextlib.nullcontext()):
            # the same prompts, latents and settings as fd's arms, no negative prompt
            return family.diffusers_call(pipe, prompts, starting, steps=s.request.steps,
                                         guidance_scale=s.request.guidance_scale, height=s.request.height,
                                         width=s.request.width, **control)

    def make_run(cache=None):
        def run() -> Sample:
            reset = _reset_peaks(None)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = len(denoiser_calls)
            control_before = {graph: len(calls) for graph, calls in controlnet_calls.items()}
            flops_before = linear_flops[0] if linear_flops else 0
            started = time.perf_counter()
            images, final = generate(start_latents, cache)
            if device == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - started
            images = (np.asarray(images, dtype=np.float32) * 255).round().astype(np.uint8)
            calls = {family.diffusers_denoiser: len(denoiser_calls) - before,
                     **{graph: len(c) - control_before[graph] for graph, c in controlnet_calls.items()}}
            if linear_flops:
                calls["block_linear_gflop"] = (linear_flops[0] - flops_before) / 1e9
            return Sample(total, None, calls, host_peak_bytes(reset),
                          torch.cuda.max_memory_allocated() if device == "cuda" else None, images,
                          None if final is None else final.float().cpu().numpy())
        return run

    run = make_run()
    run.info = {"pipeline": type(pipe).__name__, "device": device, "dtype": str(dtype).removeprefix("torch."),
                "scheduler": type(scheduler).__name__}
    own_context = False
    if s.peers:  # diffusers' cache hooks on the same pipeline: one arm each
        own_context = not hasattr(type(denoiser), "cache_context")  # SD3 in diffusers 0.42.1
        peers.with_cache_mixin(denoiser)
        other = torch.from_numpy(np.random.default_rng(s.request.seed + 1).standard_normal(
            latents.shape, dtype=np.float32)).to(device, dtype)  # MagCache calibrates on another sample
        run.peers = {}
        for peer in s.peers:
            config = peers.make_config(peer, s.request.steps, calibrate=lambda c: generate(other, c))
            run.peers[peer.label] = make_run(config)
            run.peers[peer.label].info = {**run.info, "peer": peer.name, "config": repr(config)}
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


def decoder_batch(manifest: dict, s: Settings, policy) -> dict:
    """The FD arm's largest decoder call: rows (guidance halves x outputs x steps of the longest window chunk) and,
    on a video folder, the frames they fold into (rows x F), the batch whose memory the peak figures include."""
    chunk = max(len(c) for window in policy.windows(s.request.steps_run) for c in window.chunks)
    from fd.runtime.families import family_of
    guided = family_of(manifest).classifier_free_guidance(s.request.guidance_scale)  # FLUX.1 embeds it instead
    rows = chunk * s.batch_size * (2 if guided else 1)
    frames = manifest.get("frames")
    return {"rows": rows, "frames_per_row": frames, "frames": rows * frames if frames else None}


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
             "steps": s.request.steps_run, "key_steps": k, "counted": "rows" if len(rows) == 2 else "key steps",
             "unet_speedup": flop_floor_of_rows(flops, rows[BASELINE], rows[FD]) if len(rows) == 2
             else flop_floor(flops, s.request.steps_run, k)}
    missing = [graph for graph in graphs if graph not in flops]
    if missing:
        floor["note"] = (f"no FLOP count for {', '.join(missing)} in the manifest (built before fd-build counted "
                         "ControlNets): the floor leaves them out; rebuild the folder to count them")
    return floor


def summarize(manifest, s: Settings, plan: Plan, measured: dict, last: dict, interrupted: bool,
              rss_after_load) -> dict:
    policy = plan.policy
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
    arms[BASELINE]["policy"] = FasterDiffusionPolicy.baseline(s.request.steps).describe()
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
    for peer in s.peers:  # each peer against the pipeline it runs on
        speedup[f"{peer.label}_over_diffusers"] = pairwise(DIFFUSERS, peer.label)

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
    if s.peers and DIFFUSERS in last:  # the peers' distance from their own baseline, beside FD's
        for name in (FD, *(peer.label for peer in s.peers)):
            if name in last:
                a, b = last[name], last[DIFFUSERS]
                fidelity[f"{name}_vs_diffusers"] = compare(a.images, b.images, a.latents, b.latents)
    return {"complete": not interrupted, "arms": arms, "speedup": speedup, "flop_floor": floor,
            "fidelity": fidelity, "decoder_batch": decoder_batch(manifest, s, policy), "memory": {"rss_after_load_bytes": rss_after_load, "host_peak": (
                "per run (VmHWM reset before each run)" if os.access("/proc/self/clear_refs", os.W_OK)
                else "the process's peak since its start (not per arm)")}}
