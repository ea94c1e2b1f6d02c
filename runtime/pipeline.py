"""FasterDiffusionPipeline: prompt → image from an engine folder, encoder only at key steps.

The call reads as the stages of a diffusers pipeline: check inputs, encode the prompt, prepare
timesteps and latents, the denoising loop (window by window), decode. No backend branches inside it.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fd.runtime import stages
from fd.runtime.backends import load_runner
from fd.runtime.calibrated_steps import calibrated_key_steps
from fd.runtime.control import ControlInputs, prepare_control
from fd.runtime.errors import FdError
from fd.runtime.families import PromptRequest, family_of
from fd.runtime.img2img import InitImage, prepare_init
from fd.runtime.lora import apply_request_loras, check_folder_takes_loras
from fd.runtime.manifest import load_manifest
from fd.runtime.policy import FasterDiffusionPolicy
from fd.runtime.request import Request, check_seed
from fd.runtime.schedulers import make_scheduler
from fd.runtime.schedulers.common import GivenNoise
from fd.runtime.sizes import check_size
from fd.runtime.tokenizer import PromptTokenizer

STAGES = ("text_encoder", "denoiser_encoder", "denoiser_decoder", "scheduler", "vae_decoder")
STEP_NOISE_STREAM = 1  # the seed's second stream: per-step noise of stochastic schedulers


@dataclass
class GenerationResult:
    images: list  # PIL images, one per prompt (video folders: each video's first frame)
    latents: np.ndarray  # final denoised latents (what went into the VAE), float32 (B, C, h, w); video (B, C, F, h, w)
    timings: dict[str, float]  # seconds per stage, plus "total"
    calls: dict[str, int]  # graph executions per component during this generation
    policy: dict  # the FasterDiffusion settings that were used
    timesteps: list[int] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # rows (batch entries) computed per component, all calls
    videos: list = field(default_factory=list)  # video folders: per prompt, its frames as PIL images


@dataclass
class Plan:
    """A request checked against an engine folder, with what the folder resolves: its inputs (prompts or class
    labels), size, guidance scale, key-step plan and prepared image inputs."""

    request: Request
    inputs: list
    height: int
    width: int
    guidance_scale: float
    policy: FasterDiffusionPolicy
    control: ControlInputs | None
    init: InitImage | None


class StageTimer:
    """Accumulates wall time per stage; waits for the device at each stage's end so times are true."""

    def __init__(self, synchronize, stages=STAGES):
        self.synchronize = synchronize
        self.seconds = dict.fromkeys(stages, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[stage] += time.perf_counter() - start


class EngineFolder:
    """An engine folder's manifest, model family and tokenizers: what it accepts, checked (`prepare`) without
    loading a graph, so the commands refuse a bad request before the engines load."""

    def __init__(self, engine_dir: str | Path):
        self.engine_dir = Path(engine_dir)
        self.manifest = load_manifest(engine_dir)
        self.family = family_of(self.manifest)
        self.tokenizers = [PromptTokenizer(self.engine_dir / tok["file"], tok["max_length"], tok["pad_token_id"],
                                           tok.get("expansions"))
                           for tok in self.manifest["tokenizers"]]

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels; None stands for the size the folder was built for."""
        m = self.manifest
        return m["height"] if height is None else height, m["width"] if width is None else width

    @property
    def frames(self) -> int | None:
        """Frames per video of a video folder (fd-build --frames), None for images."""
        return self.manifest.get("frames")

    def latent_shape_at(self, height: int | None, width: int | None) -> tuple[int, ...]:
        """(channels, h, w) of the latents of a height x width image (None: the built size); a video folder's
        are (channels, frames, h, w), diffusers' video layout."""
        height, width = self.image_size(height, width)
        scale = self.manifest["vae_scale_factor"]
        frames = () if self.frames is None else (self.frames,)
        return self.manifest["latent_channels"], *frames, height // scale, width // scale

    def prepare(self, request: Request) -> "Plan":
        """The request checked against this folder and resolved (size, guidance, key steps, images), without
        running a graph: raises the FdError line fd-run prints for it. Servers check each request with it before
        batching (fd-serve)."""
        m, family = self.manifest, self.family
        inputs = self.inputs_of(request)
        height, width = self.image_size(request.height, request.width)
        guidance = family.default_guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
        # fd-calibrate's key steps index a whole schedule: image to image, which runs its tail, keeps the paper's
        calibrated = None if request.init_image is not None else calibrated_key_steps(m, request.scheduler,
                                                                                         request.steps)
        policy = request.policy.resolve(request.steps_run, m["limits"]["max_window"], family.noise_injection_tau,
                                        calibrated)
        max_batch = m["limits"]["max_batch_size"]
        if len(inputs) > max_batch:
            what = "class labels" if family.class_conditional else "prompts"
            raise FdError(f"{len(inputs)} {what}, but this engine folder was built for at most {max_batch} "
                          f"images per generation: rebuild with fd-build --max-batch-size {len(inputs)}")
        if not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in (height, width)):
            raise FdError(f"image size {height}x{width} is not allowed: give positive whole pixels")
        check_size(m, height, width, self.engine_dir)
        expected = (len(inputs), *self.latent_shape_at(height, width))
        if request.latents is not None and request.latents.shape != expected:
            hint = "; give --height/--width for latents of another size" if m.get("dynamic_shape") else ""
            axes = "batch x channels x frames x height/8 x width/8" if self.frames else \
                "batch x channels x height/8 x width/8"
            raise FdError(f"initial latents have shape {request.latents.shape}, a {height}x{width} "
                          f"{'video' if self.frames else 'image'} needs {expected} ({axes}){hint}")
        if policy.max_window > m["limits"]["max_window"]:
            raise FdError(f"window of {policy.max_window} steps is larger than this engine folder's max window "
                          f"{m['limits']['max_window']}: rebuild with a larger --max-window")
        policy.validate(request.steps)
        family.check_prompts(self.tokenizers, inputs, request.negative_prompt, m.get("family_options", {}))
        for flag, value in (("--original-size", request.original_size),
                            ("--crops-coords-top-left", request.crops_coords_top_left)):
            if value is not None and family.name != "sdxl":
                raise FdError(f"{flag} is SDXL's size conditioning; this engine folder is a {family.name} model: "
                              "drop it")
        control = prepare_control(m, list(request.control_images) or None, request.controlnet_scales, height, width)
        init = prepare_init(m, request, height, width, self.engine_dir)
        if init is not None:
            init.check_policy(policy)
        sampler = make_scheduler(request.scheduler, m["scheduler_config"])  # refuses unsupported options
        family.check_scheduler(sampler)
        family.check_image_condition(request.super_resolution, len(inputs), family.classifier_free_guidance(guidance),
                                     height, width, m["components"])
        if sampler.stochastic:
            check_seed(request.seed)
        check_folder_takes_loras(m, self.engine_dir, request.loras)
        return Plan(request, inputs, height, width, guidance, policy, control, init)

    def inputs_of(self, request: Request) -> list:
        """The request's prompts, or its class labels on a class-conditional folder (DiT); the other kind is
        refused in fd-run's words."""
        family = self.family
        if family.class_conditional and request.prompts:
            raise FdError(f"this engine folder is a class-conditional {family.name} model: give --class-label "
                          "ID_OR_NAME instead of --prompt")
        if not family.class_conditional and request.class_labels:
            raise FdError(f"--class-label is for class-conditional models (DiT); this engine folder is a "
                          f"{family.name} text-to-image model: give --prompt")
        return request.inputs

    def as_request(self, request=None, /, **fields) -> Request:
        """`request` itself, a copy with `fields` changed, or (a list) the folder's inputs with `fields`: prompts,
        or class labels on a class-conditional folder."""
        if isinstance(request, Request):
            return request.replace(**fields) if fields else request
        if request is not None:
            fields["class_labels" if self.family.class_conditional else "prompts"] = request
        return Request(**fields)



class FasterDiffusionPipeline(EngineFolder):
    """Generates images from an engine folder: the denoiser encoder at key steps only, the decoder batched per
    window. `pipe(Request(...))`, or `pipe(["a cat"], steps=20)`."""

    def __init__(self, engine_dir: str | Path, **backend_options):
        super().__init__(engine_dir)
        self.runner = load_runner(engine_dir, self.manifest, **backend_options)

    def __call__(self, request: Request | list | None = None, /, *, callback=None, **fields) -> GenerationResult:
        """Generate one image per prompt (or class label). Takes a Request, or its fields as keywords, or the
        prompts (class labels) as a list followed by other fields: `pipe(["a cat"], steps=20)`.
        `callback(i, t, latents)` is called after each scheduler step."""
        plan = self.prepare(self.as_request(request, **fields))  # 1. check inputs, all before any heavy work
        request, policy, control_inputs, init = plan.request, plan.policy, plan.control, plan.init
        swapped = apply_request_loras(self, request.loras)  # between generations; None: the set is current
        steps, seed, guidance_scale = request.steps, request.seed, plan.guidance_scale
        sampler = make_scheduler(request.scheduler, self.manifest["scheduler_config"])
        sampler.set_timesteps(steps, **self.family.timestep_options(self.manifest, steps, plan.height, plan.width))
        run = request.steps_run  # the steps that run, and the model evaluations they take
        policy = every_evaluation_a_key_step(policy, run, len(sampler.timesteps) - (steps - run))
        timer = StageTimer(self.runner.synchronize, stage_names(control_inputs, init))
        calls_before, rows_before = Counter(self.runner.calls), Counter(self.runner.rows)
        started = time.perf_counter()
        batch, guided = len(plan.inputs), self.family.classifier_free_guidance(guidance_scale)

        # 2. encode the prompt: the family's conditioning, rows [negative…, positive…] when guided
        with timer("text_encoder"):
            prompt = PromptRequest(plan.inputs, request.negative_prompt, guided, plan.height, plan.width,
                                   request.original_size, request.crops_coords_top_left or (0, 0), guidance_scale,
                                   request.super_resolution)
            conditions = self.family.encode_prompt(self.runner, self.tokenizers, prompt,
                                                   self.manifest.get("family_options", {}))

        # 3. timesteps (float32 where a scheduler's are fractional: they reach the graphs as they are) and
        # initial latents
        timesteps = sampler.timesteps[steps - run:]
        latents = request.latents
        if latents is None:
            latents = initial_noise(seed, (batch, *self.latent_shape_at(plan.height, plan.width)))
        # The unit initial noise ε (it is z_T only where init_noise_sigma is 1), reused by prior noise injection.
        noise = np.asarray(latents, dtype=np.float32)
        step_options = {"generator": step_noise_generator(seed) if request.step_noise is None
                        else GivenNoise(request.step_noise)} if sampler.stochastic else {}
        z = noise * np.float32(sampler.init_noise_sigma)
        if init is not None:  # image to image: the encoded image, noised to the first step that runs
            with timer("vae_encoder"):
                z = init.latents(self.runner, self.manifest, sampler, timesteps, noise, seed)

        # 4. denoising loop: one encoder call per window, one decoder call per chunk of the window. Steps
        # outside the guidance interval need only the conditional rows: a window none of whose steps is
        # guided encodes those alone; in a window that has both kinds each step decodes the rows it needs.
        injection = policy.noise_injection
        guide = [guided and g for g in policy.guided_steps(self.family.guidance_sigmas(sampler, timesteps))]
        skipping = guided and not all(guide)  # some step needs the conditional half alone
        conditional = stages.conditional_rows(self.runner, conditions, batch) if skipping else conditions
        for window in policy.windows(len(timesteps)):
            t_key, both_halves = timesteps[window.key_step], any(guide[i] for chunk in window.chunks for i in chunk)
            with timer("denoiser_encoder"):
                window_conditions = conditions if both_halves else conditional
                model_input = sampler.scale_model_input(np.concatenate([z, z]) if both_halves else z, t_key)
                cache = stages.encode_denoiser(self.runner, model_input, t_key, window_conditions)
            if control_inputs is not None:  # the ControlNets at the key step only; the window reuses the sums
                with timer("controlnet"):
                    cache = control_inputs.apply(self.runner, cache, model_input, t_key, window_conditions)
            for chunk in window.chunks:
                with timer("denoiser_decoder"):
                    rows = [(0, cache.rows) if guide[i] else (cache.rows - batch, cache.rows) for i in chunk]
                    predictions = stages.decode_denoiser(self.runner, cache, timesteps[list(chunk)],
                                                         window_conditions, rows)
                with timer("scheduler"):
                    for prediction, i in zip(predictions, chunk):
                        t = timesteps[i]
                        prediction = self.family.guide(prediction, batch, guidance_scale if guide[i] else None,
                                                       sampler)
                        if injection is not None and injection.applies(t):
                            # Prior noise injection in the variance-preserving frame, the same for every
                            # scheduler: z ← z + α·ε on the VP latent z. A sigma-space scheduler (Euler) holds
                            # x = z·sqrt(1 + σ_t²), so there it is x ← x + α·sqrt(1 + σ_t²)·ε (vp_scale is 1
                            # for the others, whose sample is z).
                            z = z + (np.float32(injection.alpha) * np.float32(sampler.vp_scale(t))) * noise
                        z = sampler.step(prediction, t, z, **step_options)
                        if callback is not None:
                            callback(i, t.item(), z)

        # 5. decode
        with timer("vae_decoder"):
            pixels = z if self.family.pixel_space else \
                stages.decode_vae(self.runner, z / np.float32(self.manifest["vae_scaling_factor"]))
        timings = dict(timer.seconds, total=time.perf_counter() - started)
        if swapped is not None:  # before the generation, so not in its total
            timings["lora_swap"] = swapped["seconds"]
        calls = dict(Counter(self.runner.calls) - calls_before)
        rows = dict(Counter(self.runner.rows) - rows_before)
        videos = [] if self.frames is None else [to_pil(video.transpose(1, 0, 2, 3)) for video in pixels]  # (3, F, …)
        images = [frames[0] for frames in videos] if videos else to_pil(pixels)
        return GenerationResult(images, z, timings, calls, policy.describe(), timesteps.tolist(), rows, videos)

    def set_loras(self, loras: list) -> dict:
        """Replace the run-time LoRAs ("FILE[:SCALE]" texts or (path, scale) pairs; [] for none) of a folder built
        with fd-build --refittable, reloading only the graphs they change (runtime/lora.py)."""
        from fd.runtime.lora import set_loras
        return set_loras(self, loras)

    def close(self) -> None:
        self.runner.close()


def stage_names(control_inputs, init) -> tuple[str, ...]:
    """The timed stages of a generation: the ControlNets after the denoiser encoder, the VAE encoder (image to
    image) after the text encoder, when used."""
    names = list(STAGES)
    if control_inputs is not None:
        names.insert(names.index("denoiser_encoder") + 1, "controlnet")
    if init is not None:
        names.insert(names.index("text_encoder") + 1, "vae_encoder")
    return tuple(names)


def step_noise_generator(seed) -> np.random.Generator:
    """Where stochastic schedulers (euler-a, lcm, ddpm) draw each step's noise: a stream of the seed that is
    independent of the initial noise (which initial_noise draws from the seed itself), so the same seed
    gives the same image whether the initial noise comes from the seed or is passed in as latents."""
    return np.random.default_rng(None if seed is None else [int(seed), STEP_NOISE_STREAM])


def every_evaluation_a_key_step(policy: FasterDiffusionPolicy, steps: int, evaluations: int):
    """PLMS evaluates the model once more than it steps (steps + 1 `timesteps`). A policy with every step a
    key step (the baseline, few-step sampling) keeps every evaluation a key step; others leave the extra
    evaluation in the last window."""
    if evaluations > steps and set(range(steps)) <= set(policy.key_steps):
        return dataclasses.replace(policy, key_steps=tuple(range(evaluations)))
    return policy


def initial_noise(seed, shape) -> np.ndarray:
    """The unit initial noise fd draws for a seed: one request's rows, or one row of a batch built from seeds."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def to_pil(pixels: np.ndarray) -> list:
    """[-1, 1] NCHW → uint8 images, rounding exactly as diffusers' image processor does."""
    images = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]
