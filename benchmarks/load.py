"""Load generator for fd-serve: requests/s and p50/p95/p99 latency at several numbers of concurrent clients.

    python -m fd.benchmarks.load --url http://127.0.0.1:8000 --clients 1,4,16 --requests 64 --steps 20

Each client is a thread with its own keep-alive connection that sends POST /v1/images back to back
(distinct seeds, so no two requests are the same); latency is measured from send to the last byte of the
response. Only the standard library and numpy: it runs wherever fd's runtime does.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Reply:
    status: int
    seconds: float
    batch_size: int = 0  # X-Batch-Size: images in the generation that served it
    body: bytes = b""
    headers: dict = field(default_factory=dict)


class Client:
    """One keep-alive HTTP connection to fd-serve (reconnects after the server closes it)."""

    def __init__(self, url: str, timeout: float = 120.0):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.connection = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        for attempt in (0, 1):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            start = time.perf_counter()
            try:
                self.connection.request(method, path, body=body, headers=headers or {})
                response = self.connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()  # a keep-alive connection the server dropped: one fresh try
                if attempt:
                    raise
                continue
            seconds = time.perf_counter() - start
            found = {k.lower(): v for k, v in response.getheaders()}
            return Reply(response.status, seconds, int(found.get("x-batch-size", 0)), data, found)
        raise AssertionError("unreachable")

    def generate(self, options: dict, accept: str = "image/png") -> Reply:
        return self.request("POST", "/v1/images", json.dumps(options).encode(),
                            {"content-type": "application/json", "accept": accept})

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@dataclass
class LevelResult:
    clients: int
    requests: int
    ok: int
    statuses: dict  # HTTP status -> count
    seconds: float  # wall time of the level
    requests_per_s: float
    latency_s: dict  # p50 / p95 / p99 / mean of the successful requests
    mean_batch_size: float
    batch_sizes: dict  # batch size -> requests served in a batch of that size


def run_level(url: str, clients: int, requests: int, options: dict, first_seed: int = 0) -> LevelResult:
    """`requests` requests spread over `clients` threads, each sending its share back to back."""
    replies: list[Reply] = []
    lock = threading.Lock()
    seeds = iter(range(first_seed, first_seed + requests))

    def worker():
        client = Client(url)
        try:
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                reply = client.generate({**options, "seed": seed})
                reply.body = b""  # keep memory flat over long runs
                with lock:
                    replies.append(reply)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return summarize(clients, replies, wall)


def summarize(clients: int, replies: list[Reply], wall: float) -> LevelResult:
    ok = [r for r in replies if r.status == 200]
    statuses: dict[int, int] = {}
    for reply in replies:
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
    latencies = np.array([r.seconds for r in ok]) if ok else np.array([np.nan])
    batches: dict[int, int] = {}
    for reply in ok:
        batches[reply.batch_size] = batches.get(reply.batch_size, 0) + 1
    return LevelResult(
        clients, len(replies), len(ok), statuses, wall, len(ok) / wall if wall else 0.0,
        {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
         "p99": float(np.percentile(latencies, 99)), "mean": float(latencies.mean())},
        float(np.mean([r.batch_size for r in ok])) if ok else 0.0, batches)


def format_table(results: list[LevelResult]) -> str:
    rows = [f"{'clients':>7} {'requests':>8} {'ok':>5} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
            f"{'batch':>6}  statuses"]
    for r in results:
        rows.append(f"{r.clients:>7} {r.requests:>8} {r.ok:>5} {r.requests_per_s:>7.2f} {r.latency_s['p50']:>7.3f} "
                    f"{r.latency_s['p95']:>7.3f} {r.latency_s['p99']:>7.3f} {r.mean_batch_size:>6.2f}  "
                    + ", ".join(f"{code}: {n}" for code, n in sorted(r.statuses.items())))
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fd.benchmarks.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="fd-serve's base URL")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="requests per level (spread over its clients)")
    p.add_argument("--warm-up", type=int, default=2, help="requests sent (and not counted) before the first level")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--json", help="also write the results as JSON to this path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        print(f"error: --clients {args.clients!r} is not a comma-separated list of whole numbers, e.g. 1,4,16",
              file=sys.stderr)
        return 2
    if not levels or min(levels) < 1 or args.requests < 1:
        print("error: --clients and --requests must be at least 1", file=sys.stderr)
        return 2
    options = {"prompt": args.prompt, "steps": args.steps, "scheduler": args.scheduler}
    try:
        info = json.loads(Client(args.url).request("GET", "/v1/info").body)
        run_level(args.url, 1, args.warm_up, options, first_seed=10**6)
        results = [run_level(args.url, clients, args.requests, options, first_seed=i * args.requests)
                   for i, clients in enumerate(levels)]
    except (OSError, ValueError) as exc:
        print(f"error: cannot load-test {args.url} ({exc}): start fd-serve first, or give --url", file=sys.stderr)
        return 2
    print(f"{info.get('model')} {info.get('backend')} {info.get('precision')} {info.get('height')}x{info.get('width')}, "
          f"{args.steps} {args.scheduler} steps, max batch {info.get('serve', {}).get('max_batch_size')}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": args.url, "options": options, "info": info,
                       "levels": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
