"""The engine side of fd-serve, without Ray: one pipeline, each request checked with the pipeline's own checks
(so a bad value gets fd-run's message), and requests that can share one generation run as one batched call.

Requests share a generation when everything but the prompt, negative prompt and seed is equal (size, steps,
scheduler, guidance, policy). Each row keeps its own text and its own initial noise (drawn from its seed
exactly as a lone generation draws it), so a batched request gets the image it would get alone.
"""
from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import FdError
from runtime.pipeline import MAX_STEPS, FasterDiffusionPipeline, initial_noise
from runtime.policy import FasterDiffusionPolicy, policy_from_options
from runtime.schedulers import SCHEDULERS, make_scheduler
from serve.api import ImageRequest

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


@dataclass(frozen=True)
class Job:
    """One checked request, ready to be a row of a batch."""

    prompt: str
    negative_prompt: str | None
    seed: int
    key: GroupKey


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


class ImageService:
    def __init__(self, engine_dir: str, max_batch_size: int | None = None, pipeline=None):
        self.pipe = pipeline or FasterDiffusionPipeline(engine_dir)
        self.max_batch_size = check_batch_size(max_batch_size, self.pipe.manifest)
        self._lock = threading.Lock()  # one generation at a time: runners keep per-graph buffers

    def warm_up(self) -> None:
        """One short generation at the largest batch, so the first request does not pay for first-run setup
        (allocations, CUDA contexts) and a replica that cannot run its engines fails before it takes traffic."""
        self.pipe(["warm-up"] * self.max_batch_size, steps=WARM_UP_STEPS, seed=0)

    def prepare(self, request: ImageRequest) -> Job:
        """The request as a job, or FdError with the line fd-run prints for the same options."""
        pipe = self.pipe
        policy = policy_from_options(request.steps, pipe.manifest["limits"]["max_window"],
                                     key_steps=request.key_steps_text(), uniform=request.uniform,
                                     baseline=not request.fd, noise_injection=request.noise_injection,
                                     guidance_interval=request.guidance_interval_text())
        height, width = pipe.image_size(request.height, request.width)
        guidance = float(request.guidance_scale)
        pipe._check_inputs(prompts=[request.prompt], negative_prompt=request.negative_prompt, steps=request.steps,
                           guidance_scale=guidance, seed=request.seed, latents=None, policy=policy, height=height,
                           width=width)
        make_scheduler(request.scheduler, pipe.manifest["scheduler_config"])
        texts = [request.prompt] + ([request.negative_prompt] if request.negative_prompt is not None else [])
        for tokenizer in pipe.tokenizers:  # an over-long prompt is refused here, not in the middle of a batch
            tokenizer(texts)
        key = GroupKey(height, width, request.steps, request.scheduler, guidance, policy,
                       request.negative_prompt is not None)
        return Job(request.prompt, request.negative_prompt, request.seed, key)

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
        result = self.pipe([job.prompt for job in jobs], negative_prompt=negative, steps=key.steps,
                           scheduler=key.scheduler, guidance_scale=key.guidance_scale, latents=latents,
                           seed=jobs[0].seed, policy=key.policy, height=key.height, width=key.width)
        return [Outcome(200, png=png_bytes(image), seed=job.seed, timings=result.timings, calls=result.calls,
                        policy=result.policy, batch_size=len(jobs))
                for image, job in zip(result.images, jobs)]

    def info(self) -> dict:
        """GET /v1/info: what the engine folder is and what requests it accepts."""
        m = self.pipe.manifest
        source = m.get("source", {})
        return {"model": source.get("model") or source.get("path"), "family": m["family"], "backend": m["backend"],
                "precision": m["precision"], "height": m["height"], "width": m["width"],
                "dynamic_shape": m.get("dynamic_shape"),
                "limits": {**m["limits"], "max_steps": MAX_STEPS,
                           "max_prompt_tokens": min(t["max_length"] for t in m["tokenizers"])},
                "schedulers": list(SCHEDULERS), "serve": {"max_batch_size": self.max_batch_size}}


def check_batch_size(requested: int | None, manifest: dict) -> int:
    built = manifest["limits"]["max_batch_size"]
    if requested is None:
        return built
    if not 1 <= requested <= built:
        raise FdError(f"--max-batch-size {requested} is not allowed: this engine folder runs 1 to {built} images per "
                      f"generation (rebuild with fd-build --max-batch-size {max(requested, 1)} for more)")
    return requested


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
