"""The engine side of fd-serve, without Ray: one pipeline, each request checked with the pipeline's own checks
(so a bad value gets fd-run's message), and requests that can share one generation run as one batched call.

Requests share a generation when everything but the prompt (or class label), negative prompt and seed is equal
(size, steps, scheduler, guidance, policy, SDXL's size conditioning, the control images and their scales, the
init image and strength, the run-time LoRA set). Each row keeps its own text or label and its own initial noise
(drawn from its seed exactly as a lone generation draws it), so a batched request gets the image it would get
alone. Image to image
also samples the encoded image with the generation's seed, so its requests share a generation only with the
same seed. Defaults that depend on the model (guidance scale, noise injection's tau) are the folder's family's,
as in fd-run.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from fd.runtime.control import controlnet_records
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline, initial_noise
from fd.runtime.policy import FasterDiffusionPolicy
from fd.runtime.request import MAX_STEPS, Request
from fd.runtime.schedulers import SCHEDULERS, make_scheduler
from fd.serve.loras import resolve_request_loras

log = logging.getLogger("ray.serve")
WARM_UP_STEPS = 2  # a key step and a non-key step: every graph runs once, at the largest batch


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
    loras: tuple = ()  # the run-time LoRA set, (path, scale) pairs: a generation runs with one set


@dataclass(frozen=True)
class Job:
    """One checked request, ready to be a row of a batch."""

    request: Request = field(compare=False)  # one prompt or class label, its negative prompt and seed
    key: GroupKey

    @property
    def seed(self) -> int:
        return self.request.seed


@dataclass
class Outcome:
    """What a request gets back: an image with its run's details, or an HTTP error status and one line."""

    status: int
    error: str | None = None
    png: bytes | None = None
    clip: bytes | None = None  # video folders: the video as an animated GIF (its first frame is `png`)
    seed: int | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage of the batched generation it ran in
    calls: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    batch_size: int = 0
    guidance_scale: float | None = None  # as used: the request's, or the family's default


class ImageService:
    def __init__(self, engine_dir: str, max_batch_size: int | None = None, pipeline=None, lora_dir: str | None = None):
        self.pipe = pipeline or FasterDiffusionPipeline(engine_dir)
        self.max_batch_size = check_batch_size(max_batch_size, self.pipe.manifest)
        self.lora_folder = None if lora_dir is None else check_lora_dir(lora_dir, self.pipe.manifest)
        self.current_loras: tuple = ()  # the set the pipeline has now: groups with it run first (no swap)
        self._lock = threading.Lock()  # one generation at a time: runners keep per-graph buffers

    def warm_up(self):
        """One short generation at the largest batch, so the first request does not pay for first-run setup
        (allocations, CUDA contexts) and a replica that cannot run its engines fails before it takes traffic.
        Guided, as requests are by default (every family's default guidance is above 1)."""
        first_input = 0 if self.pipe.family.class_conditional else "warm-up"  # DiT: the first class id
        return self.pipe([first_input] * self.max_batch_size, steps=WARM_UP_STEPS, seed=0, **self.warm_up_images())

    def warm_up_images(self) -> dict:
        """Synthetic inputs for the folder's image graphs: a mid-gray control image per ControlNet (a ControlNet
        folder refuses a generation without them) and, on an --img2img folder, a start image at strength 1, so
        the VAE encoder and every step run too."""
        from PIL import Image
        m = self.pipe.manifest
        gray = Image.new("RGB", (m["width"], m["height"]), (128, 128, 128))
        images = {}
        if controlnet_records(m):
            images["control_images"] = [gray] * len(controlnet_records(m))
        if "vae_encoder" in m["components"]:
            images.update(init_image=gray, strength=1.0)
        return images

    def prepare(self, request: Request) -> Job:
        """The request as a job, or FdError with the line fd-run prints for the same options (the pipeline's own
        check against the folder)."""
        request = resolve_request_loras(request, self.lora_folder)  # names → files of --lora-dir, or FdError
        plan = self.pipe.prepare(request)
        sizes = (request.original_size, request.crops_coords_top_left)
        key = GroupKey(plan.height, plan.width, request.steps, request.scheduler, plan.guidance_scale, plan.policy,
                       request.negative_prompt is not None, sizes if any(sizes) else (), images_digest(request),
                       request.seed if plan.init is not None else None, request.loras or ())
        return Job(request, key)

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """One outcome per job, in order. Jobs are grouped by key into generations of at most max_batch_size
        rows; a failing generation fails only its own rows."""
        outcomes: list[Outcome | None] = [None] * len(jobs)
        groups: dict[GroupKey, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(index)
        # One LoRA set per generation: the groups that run with the pipeline's current set first, then each other
        # set's groups one after another, so each set is swapped in once per batch.
        first_seen = {}
        for key in groups:
            first_seen.setdefault(key.loras, len(first_seen))
        order = sorted(groups, key=lambda k: (k.loras != self.current_loras, first_seen[k.loras]))
        for key in order:
            indices = groups[key]
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
        first = jobs[0].request  # the fields the key says are equal on every row (images, size conditioning)
        together = first.replace(
            **{"class_labels" if first.class_labels else "prompts": [job.request.inputs[0] for job in jobs]},
            negative_prompt=[job.request.negative_prompt for job in jobs] if key.negative else None,
            latents=np.concatenate([initial_noise(job.seed, shape) for job in jobs]), guidance_scale=key.guidance_scale,
            height=key.height, width=key.width, policy=key.policy)
        result = self.pipe(together)  # swaps to the key's LoRA set first where it is not the current one
        self.current_loras = key.loras
        clips = [gif_bytes(frames) for frames in result.videos] or [None] * len(jobs)
        return [Outcome(200, png=png_bytes(image), clip=clip, seed=job.seed, timings=result.timings,
                        calls=result.calls, policy=result.policy, batch_size=len(jobs),
                        guidance_scale=key.guidance_scale)
                for image, clip, job in zip(result.images, clips, jobs)]

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
                                 "img2img": "vae_encoder" in m["components"]},
                "loras": None if self.lora_folder is None else self.lora_folder.names()}


def check_batch_size(requested: int | None, manifest: dict) -> int:
    built = manifest["limits"]["max_batch_size"]
    if requested is None:
        return built
    if not 1 <= requested <= built:
        raise FdError(f"--max-batch-size {requested} is not allowed: this engine folder runs 1 to {built} images per "
                      f"generation (rebuild with fd-build --max-batch-size {max(requested, 1)} for more)")
    return requested


def check_lora_dir(lora_dir: str, manifest: dict):
    """fd-serve --lora-dir: a folder, and an engine folder whose weights can be swapped."""
    from fd.runtime.lora import REFIT_HINT, SWAPPING_BACKENDS
    from fd.serve.loras import LoraFolder
    if not manifest.get("refit") or manifest["backend"] not in SWAPPING_BACKENDS:
        raise FdError(f"--lora-dir: this engine folder was built without --refittable, so requests cannot swap "
                      f"LoRAs: {REFIT_HINT}")
    return LoraFolder(lora_dir)


def images_digest(request: Request) -> str:
    """Equal for requests whose control images, scales, init image and strength are equal ("" for none)."""
    images = [*request.control_images, *([] if request.init_image is None else [request.init_image])]
    if not images and request.controlnet_scales is None and request.strength is None:
        return ""
    digest = hashlib.sha256(repr((request.controlnet_scales, request.strength, len(request.control_images))).encode())
    for image in images:  # decoded images (fd-serve decodes them at the door): their pixels
        digest.update(repr((image.mode, image.size)).encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def gif_bytes(frames) -> bytes:
    from fd.runtime.video import gif_bytes as clip_bytes
    return clip_bytes(frames)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
