"""benchmarks/gpu.sh's report: every part's status and figures gathered into OUTDIR/results.json and results.md.

gpu.sh calls this after each part, so OUTDIR always holds what is done so far (a lent GPU machine returns only
a few files and may stop at its time limit). `--environment FILE` is the script's first part: the machine, the
libraries and what torch sees, written before anything heavy runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from fd.benchmarks import report

SCHEMA = "fd-gpu-run/1"


def environment() -> dict:
    """What a reader of the results needs to know about the machine before trusting a figure."""
    info = {"machine": report.machine_info(), "versions": report.library_versions(),
            "fd_revision": report.source_revision(), "torch": None}
    try:
        import torch
    except ImportError:
        return info
    cuda = torch.cuda.is_available()
    info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
                     "device": torch.cuda.get_device_name(0) if cuda else None,
                     "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
                     "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled()}
    return info


def read_parts(path: Path) -> list[dict]:
    """gpu.sh's parts.tsv: one line per part (name, status, seconds, limit, command)."""
    parts = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, limit, command = (line.split("\t") + [""] * 5)[:5]
        parts.append({"name": name, "status": status, "seconds": int(seconds or 0), "limit_s": int(limit or 0),
                      "command": command})
    return parts


def gather(mode: str, parts: list[dict], work: Path) -> dict:
    """Every part with the JSON its fd-bench (or DeepCache) run wrote, if it wrote one."""
    for part in parts:
        written = work / f"{part['name']}.json"  # gpu.sh names each part's JSON after the part
        if written.exists():
            part["result"] = json.loads(written.read_text())
    env = work / "environment.json"
    return {"schema": SCHEMA, "mode": mode, "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": json.loads(env.read_text()) if env.exists() else None, "parts": parts}


def markdown(run: dict, work: Path) -> str:
    lines = [f"# fd on a GPU: benchmarks/gpu.sh ({run['mode']}), {run['written']}", ""]
    torch_info = (run["environment"] or {}).get("torch") or {}
    lines += [f"torch {torch_info.get('version')}, CUDA {torch_info.get('cuda')}, device {torch_info.get('device')}", "",
              "| part | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} | {p['limit_s']} |" for p in run["parts"]]
    for part in run["parts"]:
        table = work / f"{part['name']}.md"
        if table.exists():
            lines += ["", f"## {part['name']}", "", f"`{part['command']}`", "", table.read_text().rstrip()]
        elif "deepcache" in part["name"] and "result" in part:
            lines += ["", f"## {part['name']}", "", f"`{part['command']}`", ""]
            lines += deepcache_lines(part["result"])
    return "\n".join(lines) + "\n"


def deepcache_lines(result: dict) -> list[str]:
    lines = ["| arm | median s/image | runs |", "|---|---|---|"]
    for arm, record in result["arms"].items():
        lines.append(f"| {arm} | {record['median_seconds']:.3f} | {len(record['seconds'])} |")
    return lines + ["", f"DeepCache over diffusers, same run: {result['speedup']:.2f}x"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fd.benchmarks.gpu_report", description=__doc__)
    p.add_argument("--environment", metavar="FILE", help="write the machine's description and exit")
    p.add_argument("--mode", default="gpu")
    p.add_argument("--parts", type=Path)
    p.add_argument("--work", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.environment:
        info = environment()
        report.write_json(args.environment, info)
        print(json.dumps(info["torch"]))
        return 0
    run = gather(args.mode, read_parts(args.parts), args.work)
    report.write_json(str(args.out / "results.json"), run)
    report.write_text(str(args.out / "results.md"), markdown(run, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
