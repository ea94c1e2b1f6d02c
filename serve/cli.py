"""fd-serve: serve an engine folder over HTTP on Ray Serve (batching, replicas, health checks).

With no --address it starts a local Ray instance inside this process, deploys, prints the URL and serves
until Ctrl-C (or SIGTERM), which shuts Ray down and exits 0. With --address it deploys onto an existing
Ray cluster (every node that runs a replica needs fd installed and the engine folder at the same path)
and removes the application again on Ctrl-C.

A problem is one line and exit status 2: the folder (manifest, files, their sizes) is checked here before Ray
starts, and a replica that cannot load it is reported by the line of its FdError. Ray's and the replicas' own
logs (the access log, tracebacks of internal errors) go to Ray's log folder, which the start line names;
--verbose also prints them here.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from fd.runtime.cli_common import run_cli
from fd.runtime.errors import FdError

APP_NAME = "fd"
DRAIN_SECONDS = 30  # on SIGINT/SIGTERM, how long the requests in flight get to finish
EXAMPLES = """examples:
  fd-serve --engine-dir engines/tiny-fp32-onnxruntime
  curl -s localhost:8000/v1/images -H 'content-type: application/json' -d '{"prompt": "a cat", "seed": 1}' -o cat.png
  curl -s localhost:8000/v1/images -H 'content-type: application/json' -d '{"class_label": 207}' -o dog.png  # DiT
  fd-serve --engine-dir /models/sd15-fp16-tensorrt --replicas 4 --address auto   # on a Ray cluster, 1 GPU each
  fd-serve --engine-dir engines/sd15-refit --lora-dir /models/loras   # requests: "loras": [{"name": "x.safetensors"}]
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fd-serve", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="engine folder made by fd-build")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="engine replicas, each loading the folder once")
    p.add_argument("--max-batch-size", type=int, help="most requests per batched generation (default and maximum: "
                                                      "the folder's --max-batch-size)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long a replica waits to fill a batch before it starts a generation")
    p.add_argument("--max-ongoing-requests", type=int,
                   help="requests each engine replica holds at once (default: two batches)")
    p.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests waiting for a replica; more are answered 503 at once")
    p.add_argument("--num-gpus", type=float, help="GPUs per engine replica (default: 1 when the cluster has GPUs)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per engine replica")
    p.add_argument("--address", help="Ray cluster to deploy onto (auto, or ray://HOST:10001); "
                                     "default: a local Ray instance in this process")
    p.add_argument("--api-key", default=os.environ.get("FD_SERVE_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on POST /v1/images and GET /v1/info (/healthz stays "
                        "open); default: the FD_SERVE_API_KEY environment variable (which, unlike this flag, other "
                        "users' `ps` does not show), else no key")
    p.add_argument("--lora-dir", metavar="FOLDER",
                   help="requests may name LoRA .safetensors files in this folder (\"loras\": [{\"name\": ..., "
                        "\"scale\": ...}]), applied at run time; the engine folder must be built with fd-build "
                        "--refittable. Requests never name other paths")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's and the replicas' logs here (they always go to Ray's log folder)")
    return p.parse_args(argv)


def check_local_options(args) -> str:
    """Problems found before Ray starts: the folder, the batch size, the port. Returns the folder's absolute path."""
    from fd.runtime.cli import check_engine_dir
    from fd.runtime.manifest import load_manifest
    from fd.serve.service import check_batch_size
    check_engine_dir(args.engine_dir)
    manifest = load_manifest(args.engine_dir)  # the manifest, and every file it names inside the folder
    if manifest["backend"] == "onnxruntime":  # the graph files' sizes as fd-build wrote them
        from fd.runtime.backends.onnxruntime import check_file_sizes
        check_file_sizes(args.engine_dir, manifest)
    check_batch_size(args.max_batch_size, manifest)
    if args.lora_dir is not None:
        from fd.serve.service import check_lora_dir
        args.lora_dir = str(check_lora_dir(args.lora_dir, manifest).folder)  # absolute, for the replicas
    if not 0 < args.port < 65536:
        raise FdError(f"--port {args.port} is not a port: use 1 to 65535")
    with socket.socket() as probe:  # Ray's proxy would otherwise fail later, deep in its own logs
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise FdError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}): choose another --port "
                          "or --host") from None
    return str(Path(args.engine_dir).resolve())


def check_local_resources(ray, args) -> None:
    """On a local instance, replicas that do not fit would wait for resources forever: refuse them instead."""
    have = ray.cluster_resources()
    for name, per_replica in (("CPU", args.num_cpus), ("GPU", args.num_gpus or 0)):
        need = per_replica * args.replicas
        if need > have.get(name, 0):
            flag = "--num-cpus" if name == "CPU" else "--num-gpus"
            raise FdError(f"{args.replicas} replica(s) x {flag} {per_replica:g} need {need:g} {name}s; this machine has "
                          f"{have.get(name, 0):g}: lower --replicas or {flag}, or deploy onto a cluster with --address")


def serve_args(args, engine_dir: str):
    from fd.serve.app import ServeArgs
    return ServeArgs(engine_dir=engine_dir, replicas=args.replicas, max_batch_size=args.max_batch_size,
                     batch_wait_ms=args.batch_wait_ms, max_ongoing_requests=args.max_ongoing_requests,
                     max_queued_requests=args.max_queued_requests, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                     api_key=args.api_key, lora_dir=args.lora_dir)


def deploy_failure(serve, exc: Exception, logs: str | None) -> FdError:
    """One line for a deployment that failed: the replicas' FdError where Serve's status records one (its
    message holds the replica's traceback), else the first line of Ray's error and where Ray's logs are."""
    text = str(exc)
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
        text = "\n".join(d.message for d in deployments if d.message) + "\n" + text
    except Exception:  # noqa: BLE001 - no status to add; Ray's own message stays
        pass
    found = re.search(r"FdError: (.+)", text)
    if found:
        return FdError(f"the engine replicas did not start: {found.group(1).strip()}")
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
    return FdError(f"the engine replicas did not start: {line}" + (f" (Ray's logs: {logs})" if logs else ""))


def quiet_driver_logs() -> None:
    """This process's own Ray and Serve loggers print warnings and errors only (the start line says the rest)."""
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray's notice that a new local instance uses token authentication, on every start; fd's instance is
    # private to this process, so the notice is noise before the one line fd prints.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def logs_folder(context) -> str | None:
    """Where Ray writes this instance's logs (Serve's under serve/), from ray.init's context."""
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    return str(Path(session) / "logs") if session else None


def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM (replacing any handler Ray installed), then return normally."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


# Ray Serve gives its HTTP proxy 5 s to import and answer its first readiness check, then kills and restarts it
# after three misses; on a busy 2-core host the import alone can take longer, so fd-serve never came up. Values
# set in the environment win.
SLOW_HOST_TIMEOUTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        local = args.address is None
        if args.replicas < 1 or args.max_queued_requests < 1 or args.batch_wait_ms < 0:
            raise FdError("--replicas and --max-queued-requests must be at least 1, --batch-wait-ms 0 or more")
        if args.api_key is not None and (not args.api_key.strip() or not args.api_key.isprintable()):
            raise FdError("--api-key (or FD_SERVE_API_KEY) is empty or holds control characters: give a key of "
                          "printable characters, such as one from `openssl rand -hex 32`")
        engine_dir = check_local_options(args) if local else args.engine_dir
        try:
            import ray
            from ray import serve
        except ImportError:
            raise FdError("fd-serve needs Ray Serve: pip install 'fd[serve]'") from None
        from fd.serve.app import build_app
        if not args.verbose:
            quiet_driver_logs()
        # "local" starts a fresh instance even where RAY_ADDRESS names another cluster. Workers' output (the
        # replicas' and Serve's logs, Ray's tracebacks of a failed replica) reaches this terminal only with
        # --verbose; it is in Ray's log folder either way.
        if local:  # the local instance's processes inherit this environment (an existing cluster keeps its own)
            for name, seconds in SLOW_HOST_TIMEOUTS.items():
                os.environ.setdefault(name, seconds)
        context = ray.init(address="local" if local else args.address, include_dashboard=False,
                           logging_level=logging.WARNING, log_to_driver=args.verbose)
        logs, deployed = logs_folder(context), False
        try:
            if local:
                check_local_resources(ray, args)
            serve.start(http_options={"host": args.host, "port": args.port})
            try:
                serve.run(build_app(serve_args(args, engine_dir)), name=APP_NAME, route_prefix="/")
            except RuntimeError as exc:
                raise deploy_failure(serve, exc, logs) from None
            deployed = True
            print(f"fd-serve: serving {engine_dir} at http://{args.host}:{args.port} "
                  "(POST /v1/images, GET /healthz, GET /v1/info); Ctrl-C stops"
                  + (f"; logs in {logs}" if logs else ""), flush=True)
            wait_for_stop_signal()
            print(f"fd-serve: stopping (answering the requests in flight, up to {DRAIN_SECONDS} s)", flush=True)
            drain(serve)
        finally:
            with quiet_stdout(not args.verbose):
                stop_serving(serve, ray, local, deployed)

    return run_cli(job)


def drain(serve) -> None:
    """Let the front answer the images in flight (new ones get 503 with Retry-After) before Serve shuts down,
    so no client's connection is closed without a reply."""
    try:
        left = serve.get_app_handle(APP_NAME).drain.remote(DRAIN_SECONDS).result(timeout_s=DRAIN_SECONDS + 10)
        time.sleep(0.5)  # the proxy sends the last replies
    except Exception as exc:  # noqa: BLE001 - the front is gone already: nothing to wait for
        print(f"fd-serve: could not drain the requests in flight ({type(exc).__name__})", file=sys.stderr)
        return
    if left:
        print(f"fd-serve: {left} request(s) still running after {DRAIN_SECONDS} s are dropped", file=sys.stderr)


@contextlib.contextmanager
def quiet_stdout(quiet: bool):
    """While fd-serve shuts Serve down, Ray relays to this process's stdout the retries of the Serve controller's
    tasks that the shutdown itself kills ("(raylet) Task ServeController.graceful_shutdown failed ..."): noise
    after fd's own "stopping" line, so it is dropped (--verbose keeps it; Ray's log folder has it either way)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def stop_serving(serve, ray, local: bool, deployed: bool) -> None:
    """Local: shut Serve and the Ray instance down (no Ray process outlives fd-serve); after a failed deployment
    only the instance (Serve's graceful stop would wait on replicas that never started, and Ray reports the
    stop it cuts short). Cluster: remove the app."""
    try:
        if not local:
            serve.delete(APP_NAME)
        elif deployed:
            serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
