"""Cold start: how long loading an engine folder takes, and where the time goes.

    python -m fd.benchmarks.cold_start --engine-dir engines/sd15-random-128-ort --repeats 3 --page-cache warm
    python -m fd.benchmarks.cold_start --engine-dir engines/sd15-random-128-ort --page-cache cold --json cold.json

Every repeat runs in a fresh Python process, as a new fd-serve replica or an fd-run call does. That process
times `FasterDiffusionPipeline(engine_dir)` (what both pay before the first image) split into its parts:
the manifest and file checks, the runner (one session per graph; the ONNX Runtime runner also reports each
graph's seconds and which file it loaded), the tokenizers. Then it runs fd-serve's warm-up generation
(2 steps) twice: the first one pays what loading left for later (weights the OS maps in on first use).

--page-cache cold drops the folder's files from the OS page cache before each repeat (posix_fadvise; pages
another process has mapped stay), as on a machine that has not read the folder yet; warm reads them once
first, as a restarted replica on the same machine finds them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WARM_UP_STEPS = 2  # serve/service.py's warm-up: a key step and a non-key step


def folder_files(engine_dir: Path) -> list[Path]:
    return [path for path in sorted(engine_dir.rglob("*")) if path.is_file() and not path.is_symlink()]


def drop_from_page_cache(engine_dir: Path) -> None:
    for path in folder_files(engine_dir):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(engine_dir: Path) -> None:
    for path in folder_files(engine_dir):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def measure_once(engine_dir: str, threads: int | None) -> dict:
    """One load in this process, its parts timed by wrapping what the pipeline's constructor calls."""
    started = time.perf_counter()
    import fd.runtime.pipeline as pipeline_module
    imports = time.perf_counter() - started
    parts: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    pipeline_module.load_manifest = timed("manifest", pipeline_module.load_manifest)
    pipeline_module.load_runner = timed("sessions", pipeline_module.load_runner)
    pipeline_module.PromptTokenizer = timed("tokenizers", pipeline_module.PromptTokenizer)
    start = time.perf_counter()
    pipe = pipeline_module.FasterDiffusionPipeline(engine_dir, **({"threads": threads} if threads else {}))
    load = time.perf_counter() - start
    generations = []
    for _ in range(2):
        start = time.perf_counter()
        pipe(["warm-up"] * pipe.manifest["limits"]["max_batch_size"], steps=WARM_UP_STEPS, seed=0)
        generations.append(time.perf_counter() - start)
    runner = pipe.runner
    return {"imports": imports, "load": load, **parts,
            "graphs": getattr(runner, "load_seconds", {}), "loaded": getattr(runner, "loaded_files", {}),
            "first_generation": generations[0], "second_generation": generations[1],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_repeats(args) -> list[dict]:
    folder = Path(args.engine_dir)
    results = []
    for repeat in range(args.repeats):
        if args.page_cache == "cold":
            drop_from_page_cache(folder)
        else:
            read_into_page_cache(folder)
        command = [sys.executable, "-m", "fd.benchmarks.cold_start", "--child", "--engine-dir", str(folder)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"error: repeat {repeat + 1} failed: {child.stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"repeat {repeat + 1}: load {results[-1]['load']:.2f} s", file=sys.stderr)
    return results


def summary(results: list[dict]) -> dict:
    keys = ["load", "manifest", "sessions", "tokenizers", "first_generation", "second_generation", "imports"]
    table = {key: statistics.median(r[key] for r in results) for key in keys if all(key in r for r in results)}
    graphs = {g: statistics.median(r["graphs"][g] for r in results) for g in results[0]["graphs"]}
    return {"median_seconds": table, "median_graph_seconds": graphs, "loaded": results[0]["loaded"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fd.benchmarks.cold_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--page-cache", choices=("warm", "cold"), default="warm")
    p.add_argument("--threads", type=int, help="the runner's threads option (default: the backend's)")
    p.add_argument("--json", help="write every repeat and the medians here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure_once(args.engine_dir, args.threads)))
        return 0
    results = run_repeats(args)
    report = {"engine_dir": args.engine_dir, "page_cache": args.page_cache, "repeats": results, **summary(results)}
    for key, seconds in report["median_seconds"].items():
        print(f"{key:<18}{seconds:8.2f} s")
    for graph, seconds in report["median_graph_seconds"].items():
        print(f"  {graph:<16}{seconds:8.2f} s  ({report['loaded'].get(graph, '?')})")
    print(f"peak RSS          {report['peak_rss_bytes'] / 2**30:8.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
