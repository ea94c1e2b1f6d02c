"""fd-serve on Ray Serve: an HTTP front deployment and an engine deployment.

- `FdHttp` (the ingress, no CPU reserved) parses JSON, answers /healthz and /v1/info at once even when the
  engines are busy, and turns Ray's back-pressure (`max_queued_requests`) and replica failures into 503s.
- `FdEngine` holds one pipeline per replica (`num_gpus` per replica on GPU clusters); it checks each request's
  values with the pipeline's checks and gathers requests with `@serve.batch` into batched generations.

`build_app` is also a Ray Serve application builder, so Ray's own tools can run it from a config file
(`serve run fd.serve.app:build_app engine_dir=...`, or `import_path: fd.serve.app:build_app` in a config).

Ray Serve pickles the FastAPI app (with the route methods, by value) when @serve.ingress runs, so everything
the routes use is defined above FdHttp, and annotations stay real objects (no `from __future__ import
annotations`: FastAPI must see `Request` itself).
"""
import asyncio
import base64
import hashlib
import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import metrics

from fd.runtime.errors import FdError
from fd.runtime.request import Request as FdRequest
from fd.serve.api import MAX_BODY_BYTES, BadRequest, ImageInputs, parse_image_request
from fd.serve.service import ImageService, Outcome

log = logging.getLogger("ray.serve")
ENGINE = "FdEngine"
SERVING_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # Ray Serve's DeploymentStatus values
STAGE_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120]

http = FastAPI(title="fd-serve", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name=ENGINE, graceful_shutdown_timeout_s=5, max_constructor_retry_count=2)
class FdEngine:
    def __init__(self, engine_dir: str, max_batch_size: int | None, batch_wait_ms: float, lora_dir: str | None = None):
        self.service = ImageService(engine_dir, max_batch_size, lora_dir=lora_dir)
        self.service.warm_up()  # before the constructor returns, so Ray routes nothing to a cold replica
        self.generate_batch.set_max_batch_size(self.service.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.stage_seconds = metrics.Histogram("fd_stage_seconds", description="seconds per pipeline stage of each "
                                               "batched generation", boundaries=STAGE_BUCKETS, tag_keys=("stage",))
        self.batch_images = metrics.Histogram("fd_generation_images", description="images per pipeline call (Ray's "
                                              "serve_actual_batch_size counts a gathered batch; it splits by settings)",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64])

    async def generate(self, request: FdRequest) -> Outcome:
        try:
            job = self.service.prepare(request)
        except FdError as exc:
            return Outcome(422, error=str(exc))
        return await self.generate_batch(job)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.02)  # both set from the options in __init__
    async def generate_batch(self, jobs: list) -> list[Outcome]:
        # The generation runs in a thread so the replica keeps answering Ray's health checks meanwhile.
        outcomes = await asyncio.to_thread(self.service.run, jobs)
        self._record(outcomes)
        return outcomes

    def _record(self, outcomes: list[Outcome]) -> None:
        seen = set()
        for outcome in outcomes:
            if outcome.status != 200 or id(outcome.timings) in seen:
                continue
            seen.add(id(outcome.timings))  # rows of one generation share its timings: count it once
            self.batch_images.observe(outcome.batch_size)
            for stage, seconds in outcome.timings.items():
                self.stage_seconds.observe(seconds, tags={"stage": stage})

    def info(self) -> dict:
        return self.service.info()


async def read_body(request: Request) -> bytes:
    """The body, or BadRequest 413 before more than MAX_BODY_BYTES are held: refused on its Content-Length
    unread, else (chunked, or a length that lies) read in chunks up to the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body is {declared} bytes; at most {MAX_BODY_BYTES} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body is over {MAX_BODY_BYTES} bytes; at most {MAX_BODY_BYTES} are "
                                  "accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def key_digest(key: str | None) -> str | None:
    """What the front keeps of --api-key: its SHA-256 (the key itself never enters Ray's deployment state)."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()


def unauthorized(request: Request, digest: str | None) -> JSONResponse | None:
    """401 unless the request carries `Authorization: Bearer KEY` for fd-serve's --api-key (None: no key set)."""
    if digest is None:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), digest):
        return None
    return JSONResponse({"error": "this server needs an API key: send the header 'Authorization: Bearer KEY' "
                                  "(fd-serve --api-key / FD_SERVE_API_KEY)"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def folder_image_inputs(engine_dir: str | None):
    """The images the engine folder takes, from its manifest, where the front can read it (a cluster's head node
    may not hold the folder: then the replicas refuse what the folder cannot use)."""
    if engine_dir is None:
        return None
    from fd.runtime.manifest import load_manifest
    try:
        return ImageInputs.of(load_manifest(engine_dir))
    except FdError:
        return None


def name_of(state) -> str:
    return str(getattr(state, "value", state))


def image_response(outcome: Outcome, as_json: bool) -> Response:
    """The PNG, with the seed, guidance scale, key steps, batch size and timings in headers; or all of it (and
    the whole policy) as JSON."""
    if as_json:
        clip = {} if outcome.clip is None else {"video": base64.b64encode(outcome.clip).decode("ascii"),
                                                "video_media_type": "image/gif"}
        return JSONResponse({"image": base64.b64encode(outcome.png).decode("ascii"), **clip, "seed": outcome.seed,
                             "guidance_scale": outcome.guidance_scale, "timings": outcome.timings,
                             "calls": outcome.calls, "policy": outcome.policy, "batch_size": outcome.batch_size})
    headers = {"X-Seed": str(outcome.seed), "X-Guidance-Scale": f"{outcome.guidance_scale:g}",
               "X-Key-Steps": ",".join(str(k) for k in outcome.policy.get("key_steps", [])),
               "X-Batch-Size": str(outcome.batch_size),
               "X-Timings": json.dumps({stage: round(s, 6) for stage, s in outcome.timings.items()},
                                       separators=(",", ":"))}
    if outcome.clip is not None:  # a video folder: the clip itself, an animated GIF
        return Response(outcome.clip, media_type="image/gif", headers=headers)
    return Response(outcome.png, media_type="image/png", headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
@serve.ingress(http)
class FdHttp:
    def __init__(self, engine, batch_wait_ms: float, engine_dir: str | None = None,
                 api_key_digest: str | None = None):
        self.engine = engine
        self.batch_wait_ms = batch_wait_ms
        self.info_cache: dict | None = None
        self.api_key_digest = api_key_digest
        self.image_inputs = folder_image_inputs(engine_dir)
        self.in_flight = 0  # POST /v1/images being handled (drain waits for them)
        self.draining = False

    async def drain(self, grace_s: float) -> int:
        """Stop taking images (503 with Retry-After) and wait up to grace_s seconds for those in flight to be
        answered; fd-serve calls it on SIGINT/SIGTERM before it shuts Serve down. Returns how many remain."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    @http.post("/v1/images")
    async def images(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"error": "the server is stopping: retry on another server or after it restarts"},
                                status_code=503, headers={"Retry-After": "10"})
        self.in_flight += 1
        try:
            return await self._images(request)
        finally:
            self.in_flight -= 1

    async def _images(self, request: Request) -> Response:
        refused = unauthorized(request, self.api_key_digest)
        if refused is not None:
            return refused
        try:
            # parsed and its images decoded in a thread: a large body does not stall /healthz or other requests
            image_request = await asyncio.to_thread(
                parse_image_request, await read_body(request), self.image_inputs)
        except BadRequest as exc:
            return error_response(exc.status, exc.message)
        try:
            outcome = await self.engine.generate.remote(image_request)
        except Exception as exc:  # noqa: BLE001 - every failure of the call is one line, never a traceback
            return self._call_failed(exc)
        if outcome.status != 200:
            return error_response(outcome.status, outcome.error)
        return image_response(outcome, "application/json" in request.headers.get("accept", ""))

    def _call_failed(self, exc: Exception) -> JSONResponse:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        if isinstance(exc, BackPressureError):
            return error_response(503, "the server is at its queue limit (max_queued_requests): retry later")
        if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)):
            return error_response(503, f"an engine replica stopped while handling the request "
                                       f"({type(exc).__name__}); Ray restarts it: retry")
        log.exception("fd-serve: request to the engine failed")
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the traceback")

    @http.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when the engine replicas are up (each warmed up before it reported ready) and none is missing
        or starting; 503 while they start, restart or fail. Autoscaling in progress still serves: 200."""
        app = serve.get_replica_context().app_name
        try:
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[app].deployments[ENGINE]
        except Exception as exc:  # noqa: BLE001 - the controller is unreachable or the app is being removed
            return error_response(503, f"cannot read the deployment's status ({type(exc).__name__})")
        state = name_of(deployment.status)
        healthy = state in SERVING_STATES
        return JSONResponse({"status": "ok" if healthy else state,
                             "replicas": {name_of(k): v for k, v in deployment.replica_states.items()}},
                            status_code=200 if healthy else 503)

    @http.get("/v1/info")
    async def info(self, request: Request) -> JSONResponse:
        refused = unauthorized(request, self.api_key_digest)
        if refused is not None:
            return refused
        if self.info_cache is None:
            try:
                info = await self.engine.info.remote()
            except Exception as exc:  # noqa: BLE001 - no engine replica answers (yet)
                return self._call_failed(exc)
            info["serve"]["batch_wait_ms"] = self.batch_wait_ms
            self.info_cache = info
        return JSONResponse(self.info_cache)


class ServeArgs(BaseModel):
    """The application's arguments (fd-serve's options; in a Ray Serve config file, the app's `args`)."""

    model_config = ConfigDict(extra="forbid")

    engine_dir: str
    replicas: int = 1
    max_batch_size: int | None = None  # default: the engine folder's
    batch_wait_ms: float = 20.0
    max_ongoing_requests: int | None = None  # per engine replica; default: two batches (one running, one filling)
    max_queued_requests: int = 64  # waiting for an engine replica; more get 503
    num_gpus: float | None = None  # per engine replica; default: 1 on a cluster with GPUs, else 0
    num_cpus: float = 1.0
    api_key: str | None = None  # POST /v1/images and GET /v1/info need "Authorization: Bearer KEY"; /healthz: open
    lora_dir: str | None = None  # the folder whose .safetensors LoRAs requests may name ("loras"); None: no LoRAs


def build_app(args: ServeArgs) -> serve.Application:
    """The fd-serve application (a Ray Serve application builder)."""
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    if args.replicas < 1 or args.batch_wait_ms < 0 or args.max_queued_requests < 1:
        raise FdError("replicas and max_queued_requests must be at least 1 and batch_wait_ms 0 or more")
    ongoing = args.max_ongoing_requests or 2 * (args.max_batch_size or engine_batch_size(args.engine_dir))
    engine = FdEngine.options(
        num_replicas=args.replicas, max_ongoing_requests=ongoing, max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": gpus_per_replica(args)},
    ).bind(args.engine_dir, args.max_batch_size, args.batch_wait_ms, args.lora_dir)
    return FdHttp.bind(engine, args.batch_wait_ms, args.engine_dir, key_digest(args.api_key))


def engine_batch_size(engine_dir: str) -> int:
    """The folder's max batch size where the folder is readable here (else 1: the replicas check it)."""
    try:
        with open(f"{engine_dir}/manifest.json") as f:
            return int(json.load(f)["limits"]["max_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def gpus_per_replica(args: ServeArgs) -> float:
    if args.num_gpus is not None:
        return args.num_gpus
    import ray
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
