"""FasterDiffusionPipeline: prompt → image from an engine folder, encoder only at key steps.

The call reads as the stages of a diffusers pipeline: check inputs, encode the prompt, prepare
timesteps and latents, the denoising loop (window by window), decode. No backend branches inside it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fd.runtime import stages
from fd.runtime.backends import load_runner
from fd.runtime.control import prepare_control
from fd.runtime.errors import FdError
from fd.runtime.families import PromptRequest, family_of
from fd.runtime.img2img import prepare_init
from fd.runtime.manifest import load_manifest
from fd.runtime.policy import FasterDiffusionPolicy
from fd.runtime.schedulers import make_scheduler
from fd.runtime.sizes import check_size
from fd.runtime.tokenizer import PromptTokenizer

STAGES = ("text_encoder", "denoiser_encoder", "denoiser_decoder", "scheduler", "vae_decoder")
STEP_NOISE_STREAM = 1  # the seed's second stream: per-step noise of stochastic schedulers
MAX_STEPS = 1000


@dataclass
class GenerationResult:
    images: list  # PIL images, one per prompt
    latents: np.ndarray  # final denoised latents (what went into the VAE), float32 (B, C, h, w)
    timings: dict[str, float]  # seconds per stage, plus "total"
    calls: dict[str, int]  # graph executions per component during this generation
    policy: dict  # the FasterDiffusion settings that were used
    timesteps: list[int] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # rows (batch entries) computed per component, all calls


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


class FasterDiffusionPipeline:
    def __init__(self, engine_dir: str | Path, **backend_options):
        self.engine_dir = Path(engine_dir)
        self.manifest = load_manifest(engine_dir)
        self.family = family_of(self.manifest)
        self.runner = load_runner(engine_dir, self.manifest, **backend_options)
        self.tokenizers = [PromptTokenizer(self.engine_dir / tok["file"], tok["max_length"], tok["pad_token_id"])
                           for tok in self.manifest["tokenizers"]]

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels; None stands for the size the folder was built for."""
        m = self.manifest
        return m["height"] if height is None else height, m["width"] if width is None else width

    def latent_shape_at(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a height x width image (None: the built size)."""
        height, width = self.image_size(height, width)
        scale = self.manifest["vae_scale_factor"]
        return self.manifest["latent_channels"], height // scale, width // scale

    def default_policy(self, steps: int) -> FasterDiffusionPolicy:
        from fd.runtime.policy import NoiseInjection, default_key_steps
        return FasterDiffusionPolicy(default_key_steps(steps), self.manifest["limits"]["max_window"],
                                     NoiseInjection(tau=self.family.noise_injection_tau))

    def __call__(self, prompts: list[str], *, negative_prompt: str | list[str] | None = None, steps: int = 50,
                 scheduler: str = "ddim", guidance_scale: float | None = None, seed: int | None = 0,
                 latents: np.ndarray | None = None, policy: FasterDiffusionPolicy | None = None,
                 height: int | None = None, width: int | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), callback=None, control_images=None,
                 controlnet_scales=None, init_image=None, strength: float | None = None) -> GenerationResult:
        """Generate one image per prompt. `policy=None` uses the paper's key steps for `steps`;
        `FasterDiffusionPolicy.baseline(steps)` runs every step in full (the diffusers baseline).
        Class-conditional families (DiT) take class labels as prompts: ids (int or digits) or id2label names.
        `guidance_scale=None` is the family's default (SD/SDXL 7.5, DiT 4.0, as DiTPipeline).
        `negative_prompt=None` is "no negative prompt" (SD: "", SDXL: zero embeddings, as diffusers); a list
        gives each prompt its own (fd-serve batches requests that way, with one seed each through `latents`).
        `height`/`width` default to the size the folder was built for; other sizes need a folder built
        with --dynamic-shape. `original_size`/`crops_coords_top_left` are SDXL's size conditioning
        (default: the image size and (0, 0)). `callback(i, t, latents)` is called after each scheduler step.
        `control_images` (paths or PIL images, one per ControlNet of the folder) and `controlnet_scales` (one
        for all or one each, default 1.0) drive the folder's ControlNets, run at key steps only.
        `init_image` with `strength` (0 < strength <= 1, default 0.8) is image to image: the last
        int(steps x strength) steps run, from the encoded image noised to the first of them."""
        # 1. check inputs (all of them, before any heavy work)
        guidance_scale = self.family.default_guidance_scale if guidance_scale is None else guidance_scale
        height, width = self.image_size(height, width)
        control_inputs = prepare_control(self.manifest, control_images, controlnet_scales, height, width)
        init = prepare_init(self.manifest, init_image, strength, steps, height, width, self.engine_dir)
        policy = policy or self.default_policy(steps if init is None else init.steps_run)  # key steps index run steps
        self.check_request(prompts, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                           seed=seed, latents=latents, policy=policy, height=height, width=width)
        if init is not None:
            init.check_policy(policy)
        sampler = make_scheduler(scheduler, self.manifest["scheduler_config"])  # refuses unsupported options
        sampler.set_timesteps(steps, **self.family.timestep_options(self.manifest, steps, height, width))
        if sampler.stochastic:
            check_seed(seed)
        run = steps if init is None else init.steps_run  # the steps that run, and the model evaluations they take
        policy = every_evaluation_a_key_step(policy, run, len(sampler.timesteps) - (steps - run))
        timer = StageTimer(self.runner.synchronize, stage_names(control_inputs, init))
        calls_before, rows_before = Counter(self.runner.calls), Counter(self.runner.rows)
        started = time.perf_counter()
        batch, guided = len(prompts), self.family.classifier_free_guidance(guidance_scale)

        # 2. encode the prompt: the family's conditioning, rows [negative…, positive…] when guided
        with timer("text_encoder"):
            request = PromptRequest(list(prompts), negative_prompt, guided, height, width, original_size,
                                    tuple(crops_coords_top_left), guidance_scale)
            conditions = self.family.encode_prompt(self.runner, self.tokenizers, request,
                                                   self.manifest.get("family_options", {}))

        # 3. timesteps (float32 where a scheduler's are fractional: they reach the graphs as they are) and
        # initial latents
        timesteps = sampler.timesteps if init is None else sampler.timesteps[steps - init.steps_run:]
        if latents is None:
            latents = initial_noise(seed, (batch, *self.latent_shape_at(height, width)))
        # The unit initial noise ε (it is z_T only where init_noise_sigma is 1), reused by prior noise injection.
        noise = np.asarray(latents, dtype=np.float32)
        step_options = {"generator": step_noise_generator(seed)} if sampler.stochastic else {}
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
                        if guide[i]:
                            uncond, cond = prediction[:batch], prediction[batch:]
                            prediction = uncond + np.float32(guidance_scale) * (cond - uncond)
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
            pixels = stages.decode_vae(self.runner, z / np.float32(self.manifest["vae_scaling_factor"]))
        timings = dict(timer.seconds, total=time.perf_counter() - started)
        calls = dict(Counter(self.runner.calls) - calls_before)
        rows = dict(Counter(self.runner.rows) - rows_before)
        return GenerationResult(to_pil(pixels), z, timings, calls, policy.describe(), timesteps.tolist(), rows)

    def check_request(self, prompts: list[str], *, negative_prompt: str | list[str] | None = None, steps: int = 50,
                      guidance_scale: float | None = None, seed: int | None = 0, latents: np.ndarray | None = None,
                      policy: FasterDiffusionPolicy | None = None, height: int | None = None,
                      width: int | None = None) -> None:
        """Check a generation's options without running anything: raises the FdError line that calling the
        pipeline with them would raise first (prompts and negative prompts, batch size, steps, guidance, seed
        or latents, size, key-step policy, and last the family's own refusals of the prompts: an over-long
        text, a DiT class label that is not a class; `guidance_scale`/`policy`/`height`/`width` None as in the
        call). Servers check each request with it before batching (fd-serve). Not covered: the scheduler name
        (runtime.schedulers.make_scheduler) and control and init images (runtime.control.prepare_control,
        runtime.img2img.prepare_init)."""
        height, width = self.image_size(height, width)
        policy = policy or self.default_policy(steps)
        kinds = (str, int, np.integer) if self.family.class_conditional else str  # DiT: class ids too
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, kinds) for p in prompts):
            raise FdError("give at least one class label (a list of ints or names)" if self.family.class_conditional
                          else "give at least one prompt (a list of strings)")
        if not (negative_prompt is None or isinstance(negative_prompt, str) or (
                isinstance(negative_prompt, list) and len(negative_prompt) == len(prompts)
                and all(isinstance(n, str) for n in negative_prompt))):
            raise FdError(f"negative prompt must be one string or a list of {len(prompts)} strings, one per prompt")
        max_batch = self.manifest["limits"]["max_batch_size"]
        if len(prompts) > max_batch:
            what = "class labels" if self.family.class_conditional else "prompts"
            raise FdError(f"{len(prompts)} {what}, but this engine folder was built for at most {max_batch} "
                          f"images per generation: rebuild with fd-build --max-batch-size {len(prompts)}")
        if not 1 <= steps <= MAX_STEPS:
            raise FdError(f"--steps {steps} is out of range: use 1 to {MAX_STEPS}")
        check_guidance_scale(self.family.default_guidance_scale if guidance_scale is None else guidance_scale)
        if latents is None:
            check_seed(seed)
        if not all(isinstance(side, int) and 0 < side for side in (height, width)):
            raise FdError(f"image size {height}x{width} is not allowed: give positive whole pixels")
        check_size(self.manifest, height, width, self.engine_dir)
        expected = (len(prompts), *self.latent_shape_at(height, width))
        if latents is not None and tuple(np.shape(latents)) != expected:
            hint = ("; give --height/--width for latents of another size" if self.manifest.get("dynamic_shape")
                    else "")
            raise FdError(f"initial latents have shape {tuple(np.shape(latents))}, a {height}x{width} image needs "
                          f"{expected} (batch x channels x height/8 x width/8){hint}")
        if latents is not None and not np.isfinite(latents).all():
            raise FdError("initial latents contain NaN or infinite values: give finite noise")
        if policy.max_window > self.manifest["limits"]["max_window"]:
            raise FdError(f"window of {policy.max_window} steps is larger than this engine folder's max window "
                          f"{self.manifest['limits']['max_window']}: rebuild with a larger --max-window")
        policy.validate(steps)
        self.family.check_prompts(self.tokenizers, prompts, negative_prompt, self.manifest.get("family_options", {}))

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


def check_guidance_scale(guidance_scale: float) -> None:
    # NaN passes every comparison and inf overflows the guided prediction: both give black or noise images.
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise FdError(f"--guidance-scale {guidance_scale} is not allowed: give a finite number, 0 or more "
                      "(1 or less turns guidance off; 7.5 is usual)")


def check_seed(seed) -> None:
    """None draws fresh noise; numpy's generators take whole numbers of 0 or more (negative ones fail deep inside)."""
    if seed is not None and not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise FdError(f"--seed {seed} is not allowed: give a whole number, 0 or more")


def to_pil(pixels: np.ndarray) -> list:
    """[-1, 1] NCHW → uint8 images, rounding exactly as diffusers' image processor does."""
    images = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]
