"""The engine side of fd-serve, without Ray: one pipeline, each request checked with the pipeline's own checks
(so a bad value gets fd-run's message), and requests that can share one generation run as one batched call.

Requests share a generation when everything but the prompt (or class label), negative prompt and seed is equal
(size, steps, scheduler, guidance, policy, SDXL's size conditioning, the control images and their scales, the
init image and strength). Each row keeps its own text or label and its own initial noise (drawn from its seed
exactly as a lone generation draws it), so a batched request gets the image it would get alone. Image to image
also samples the encoded image with the generation's seed, so its requests share a generation only with the
same seed. Defaults that depend on the model (guidance scale, noise injection's tau) are the folder's family's,
as in fd-run.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from PIL import Image, UnidentifiedImageError

from fd.runtime.control import controlnet_records, prepare_control
from fd.runtime.errors import FdError
from fd.runtime.img2img import DEFAULT_STRENGTH, check_strength, prepare_init
from fd.runtime.pipeline import MAX_STEPS, FasterDiffusionPipeline, initial_noise
from fd.runtime.policy import FasterDiffusionPolicy, policy_from_options
from fd.runtime.schedulers import SCHEDULERS, make_scheduler
from fd.serve.api import ImageRequest

log = logging.getLogger("ray.serve")
WARM_UP_STEPS = 2  # a key step and a non-key step: every graph runs once, at the largest batch
MAX_IMAGE_PIXELS = 4096 * 4096  # a sent image is resized to the generation size; bigger ones are refused unread


@dataclass(frozen=True)
class GroupKey:
    """What two requests must share to run as rows of one generation."""

    height: int
    width: int
    steps: int
    scheduler: str
    guidance_scale: float
    policy: FasterDiffusionPolicy
    negative: bool  # with or without a negative prompt (SDXL conditions on zeros without one)
    size_conditioning: tuple = ()  # SDXL's original_size / crops_coords_top_left, as given
    images: str = ""  # digest of the control images, their scales, the init image and strength ("": none)
    img2img_seed: int | None = None  # image to image: the seed that samples the encoded image


@dataclass(frozen=True)
class Job:
    """One checked request, ready to be a row of a batch."""

    prompt: str | int  # the text, or the class label of a class-conditional folder (the pipeline takes both)
    negative_prompt: str | None
    seed: int
    key: GroupKey
    inputs: dict = field(default_factory=dict, compare=False)  # the pipeline's image and size keyword arguments


@dataclass
class Outcome:
    """What a request gets back: an image with its run's details, or an HTTP error status and one line."""

    status: int
    error: str | None = None
    png: bytes | None = None
    seed: int | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage of the batched generation it ran in
    calls: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    batch_size: int = 0
    guidance_scale: float | None = None  # as used: the request's, or the family's default


class ImageService:
    def __init__(self, engine_dir: str, max_batch_size: int | None = None, pipeline=None):
        self.pipe = pipeline or FasterDiffusionPipeline(engine_dir)
        self.max_batch_size = check_batch_size(max_batch_size, self.pipe.manifest)
        self._lock = threading.Lock()  # one generation at a time: runners keep per-graph buffers

    def warm_up(self) -> None:
        """One short generation at the largest batch, so the first request does not pay for first-run setup
        (allocations, CUDA contexts) and a replica that cannot run its engines fails before it takes traffic.
        Guided, as requests are by default (every family's default guidance is above 1)."""
        first_input = 0 if self.pipe.family.class_conditional else "warm-up"  # DiT: the first class id
        self.pipe([first_input] * self.max_batch_size, steps=WARM_UP_STEPS, seed=0)

    def prepare(self, request: ImageRequest) -> Job:
        """The request as a job, or FdError with the line fd-run prints for the same options (in fd-run's
        order: prompt or class label, image to image's strength, the policy, the pipeline's checks, the images,
        the sampler)."""
        pipe, manifest = self.pipe, self.pipe.manifest
        given = check_input_kind(pipe.family, request)
        init_image = None if request.init_image is None else decode_image(request.init_image, "init_image")
        steps_run = request.steps  # image to image runs the last steps only; key steps index those
        if init_image is not None:
            steps_run = check_strength(DEFAULT_STRENGTH if request.strength is None else request.strength,
                                       request.steps)
        policy = policy_from_options(steps_run, manifest["limits"]["max_window"],
                                     key_steps=request.key_steps_text(), uniform=request.uniform,
                                     baseline=not request.fd, noise_injection=request.noise_injection,
                                     guidance_interval=request.guidance_interval_text(),
                                     noise_injection_tau=pipe.family.noise_injection_tau)
        height, width = pipe.image_size(request.height, request.width)
        guidance = float(pipe.family.default_guidance_scale if request.guidance_scale is None
                         else request.guidance_scale)
        # the size first: the images below are resized to it
        pipe.check_request([given], negative_prompt=request.negative_prompt, steps=request.steps,
                           guidance_scale=guidance, seed=request.seed, policy=policy, height=height, width=width)
        controls = [decode_image(data, f"control_images[{i}]") for i, data in enumerate(request.control_images or [])]
        prepare_control(manifest, controls or None, request.controlnet_scale, height, width)
        init = prepare_init(manifest, init_image, request.strength, request.steps, height, width, pipe.engine_dir)
        if init is not None:
            init.check_policy(policy)
        make_scheduler(request.scheduler, manifest["scheduler_config"])
        from fd.runtime.cli import sdxl_size_options  # fd-run's parsing and lines for the same two options
        sizes = sdxl_size_options(SimpleNamespace(original_size=request.pair_text("original_size"),
                                                  crops_coords_top_left=request.pair_text("crops_coords_top_left")),
                                  pipe.family.name)
        inputs = {"control_images": controls or None, "controlnet_scales": request.controlnet_scale,
                  "init_image": init_image, "strength": request.strength, **sizes}
        key = GroupKey(height, width, request.steps, request.scheduler, guidance, policy,
                       request.negative_prompt is not None, tuple(sorted(sizes.items())), images_digest(request),
                       request.seed if init is not None else None)
        return Job(given, request.negative_prompt, request.seed, key, inputs)

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """One outcome per job, in order. Jobs are grouped by key into generations of at most max_batch_size
        rows; a failing generation fails only its own rows."""
        outcomes: list[Outcome | None] = [None] * len(jobs)
        groups: dict[GroupKey, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(index)
        for key, indices in groups.items():
            # A stochastic sampler's per-step noise comes from the generation's one seed: such requests run
            # alone, so each gets the image fd-run gives for its seed.
            stochastic = make_scheduler(key.scheduler, self.pipe.manifest["scheduler_config"]).stochastic
            size = 1 if stochastic else self.max_batch_size
            for start in range(0, len(indices), size):
                rows = indices[start:start + size]
                for index, outcome in zip(rows, self._generate_safely(key, [jobs[i] for i in rows])):
                    outcomes[index] = outcome
        return outcomes

    def _generate_safely(self, key: GroupKey, jobs: list[Job]) -> list[Outcome]:
        try:
            with self._lock:
                return self._generate(key, jobs)
        except FdError as exc:  # checked before batching, so this is rare (e.g. a folder changed under us)
            return [Outcome(422, error=str(exc)) for _ in jobs]
        except Exception as exc:  # noqa: BLE001 - a bug or a device failure: 500, logged, the replica goes on
            log.exception("fd-serve: generation of %d image(s) failed", len(jobs))
            line = (str(exc).strip().splitlines() or [""])[0][:200]
            message = f"internal error while generating ({type(exc).__name__}: {line}); the server log has the traceback"
            return [Outcome(500, error=message) for _ in jobs]

    def _generate(self, key: GroupKey, jobs: list[Job]) -> list[Outcome]:
        shape = (1, *self.pipe.latent_shape_at(key.height, key.width))
        latents = np.concatenate([initial_noise(job.seed, shape) for job in jobs])
        negative = [job.negative_prompt for job in jobs] if key.negative else None
        # the images and size conditioning are equal on every row (the key says so): the first job's serve all
        result = self.pipe([job.prompt for job in jobs], negative_prompt=negative, steps=key.steps,
                           scheduler=key.scheduler, guidance_scale=key.guidance_scale, latents=latents,
                           seed=jobs[0].seed, policy=key.policy, height=key.height, width=key.width, **jobs[0].inputs)
        return [Outcome(200, png=png_bytes(image), seed=job.seed, timings=result.timings, calls=result.calls,
                        policy=result.policy, batch_size=len(jobs), guidance_scale=key.guidance_scale)
                for image, job in zip(result.images, jobs)]

    def info(self) -> dict:
        """GET /v1/info: what the engine folder is and what requests it accepts."""
        m, family = self.pipe.manifest, self.pipe.family
        source = m.get("source", {})
        # what a request names its image by: text, or (class-conditional folders) one of num_classes classes,
        # by id or by a name in the manifest's family_options.id2label
        conditioning = ({"conditioning": "class_label", "num_classes": int(m["family_options"]["num_classes"])}
                        if family.class_conditional else {"conditioning": "prompt"})
        return {"model": source.get("model") or source.get("path"), "family": m["family"], **conditioning,
                "defaults": {"guidance_scale": family.default_guidance_scale,
                             "noise_injection_tau": family.noise_injection_tau},
                "backend": m["backend"], "precision": m["precision"], "height": m["height"], "width": m["width"],
                "dynamic_shape": m.get("dynamic_shape"),
                "limits": {**m["limits"], "max_steps": MAX_STEPS,  # no text encoder (DiT): no prompt tokens
                           "max_prompt_tokens": min((t["max_length"] for t in m["tokenizers"]), default=None)},
                "schedulers": list(SCHEDULERS), "serve": {"max_batch_size": self.max_batch_size},
                "image_inputs": {"controlnets": [r.get("source", {}).get("model", r["graph"])
                                                 for r in controlnet_records(m)],
                                 "img2img": "vae_encoder" in m["components"]}}


def check_input_kind(family, request: ImageRequest) -> str | int:
    """The request's prompt or class label, whichever the folder's family takes; neither, both or the other
    one is refused with fd-run's line for --prompt / --class-label."""
    from fd.runtime.cli import check_one_input_kind, check_prompt_kind
    given = SimpleNamespace(prompt=[] if request.prompt is None else [request.prompt],
                            class_label=[] if request.class_label is None else [request.class_label])
    check_one_input_kind(given)
    (value,) = check_prompt_kind(given, family)
    return value


def check_batch_size(requested: int | None, manifest: dict) -> int:
    built = manifest["limits"]["max_batch_size"]
    if requested is None:
        return built
    if not 1 <= requested <= built:
        raise FdError(f"--max-batch-size {requested} is not allowed: this engine folder runs 1 to {built} images per "
                      f"generation (rebuild with fd-build --max-batch-size {max(requested, 1)} for more)")
    return requested


def decode_image(data: str, field_name: str) -> Image.Image:
    """A base64-encoded image file (a data: URL's prefix allowed) as a PIL image, or one FdError line."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FdError(f'"{field_name}" is not base64: send the image file (PNG or JPEG) base64-encoded') from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise FdError(f'"{field_name}" is {image.width}x{image.height} pixels; at most {MAX_IMAGE_PIXELS} '
                              "are accepted: send it at (about) the image size")
            image.load()  # decode now: a truncated file fails here, not mid-generation
            return image.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FdError(f'"{field_name}" is not an image PIL can read ({reason}): send a base64-encoded PNG or '
                      "JPEG file") from None


def images_digest(request: ImageRequest) -> str:
    """Equal for requests whose control images, scales, init image and strength are equal ("" for none)."""
    parts = [request.control_images, request.controlnet_scale, request.init_image, request.strength]
    if all(part is None for part in parts):
        return ""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
