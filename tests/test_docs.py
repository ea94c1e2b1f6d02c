"""The documentation stays true: every fenced shell (and Python) block of README.md and docs/*.md that uses only the
tiny models runs, in order, in a fresh folder per page, as a reader would paste it.

Blocks that install (pip), serve (fd-serve, curl) or name a model other than the generated tiny ones are not run:
they need a network, a server or minutes of CPU. `fd-build` runs for real the first time the suite sees its
arguments; a later block with the same arguments gets a copy of that folder (the build is deterministic and
tested elsewhere), so six pages that build `tiny` pay for it once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(bash|sh|python)\n(.*?)^```", re.M | re.S)
NOT_RUN = ("pip install", "fd-serve", "curl ")
MODEL_NAMES = re.compile(r"--(?:model|controlnet)\s+(\S+)|(?:--engine-dir\s+|[\"'])engines/([^\s\"']+)")

SHIM = '''import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
args = sys.argv[1:]
entry = Path(os.environ["FD_DOCS_BUILD_CACHE"]) / hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
if (entry / "done.json").is_file():
    record = json.loads((entry / "done.json").read_text())
    for rel in record["outputs"]:
        shutil.copytree(entry / "tree" / rel, rel)
    sys.stdout.write(record["stdout"])
    sys.exit(0)
engines = Path("engines")
before = set(engines.iterdir()) if engines.is_dir() else set()
done = subprocess.run([os.environ["FD_DOCS_REAL_FD_BUILD"], *args], capture_output=True, text=True)
sys.stdout.write(done.stdout), sys.stderr.write(done.stderr)
if done.returncode == 0:
    outputs = [str(p) for p in (set(engines.iterdir()) if engines.is_dir() else set()) - before]
    for rel in outputs:
        shutil.copytree(rel, entry / "tree" / rel)
    (entry / "done.json").write_text(json.dumps({"outputs": outputs, "stdout": done.stdout}))
sys.exit(done.returncode)
'''


def runnable_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of the page's blocks that use only the tiny models and need no install or server."""
    blocks = []
    for language, code in BLOCK.findall(page.read_text()):
        names = [a or b for a, b in MODEL_NAMES.findall(code)]
        if any(marker in code for marker in NOT_RUN) or not names:
            continue
        if all(name.startswith("tiny") for name in names):
            blocks.append((language, code))
    return blocks


def test_the_block_rule_picks_tiny_blocks_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nfd-build --model tiny\n```\n```bash\nfd-build --model sd15\n```\n"
                    "```bash\npip install x && fd-build --model tiny\n```\n```python\nPipeline('engines/tiny-x')\n```\n"
                    "```bash\nfd-run --engine-dir engines/sd15-fp16 --prompt a\n```\n```\nfd-build --model tiny\n```\n")
    assert [code for _, code in runnable_blocks(page)] == ["fd-build --model tiny\n", "Pipeline('engines/tiny-x')\n"]


@pytest.fixture(scope="module")
def shim_bin(tmp_path_factory, tiny_engine) -> Path:
    """A folder whose `fd-build` caches builds by their arguments (seeded with the suite's own `tiny` build)."""
    real = shutil.which("fd-build")
    assert real, "fd-build is not installed: pip install -e ."
    cache, bin_dir = tmp_path_factory.mktemp("docs-builds"), tmp_path_factory.mktemp("docs-bin")
    seed = cache / __import__("hashlib").sha256(json.dumps(["--model", "tiny"]).encode()).hexdigest()[:16]
    shutil.copytree(tiny_engine, seed / "tree" / "engines" / "tiny-fp32-onnxruntime")
    (seed / "done.json").write_text(json.dumps({"outputs": ["engines/tiny-fp32-onnxruntime"], "stdout": ""}))
    shim = bin_dir / "fd-build"
    shim.write_text(f"#!{sys.executable}\n{SHIM}")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    os.environ["FD_DOCS_BUILD_CACHE"], os.environ["FD_DOCS_REAL_FD_BUILD"] = str(cache), real
    return bin_dir


# The pages whose blocks cost minutes (fd-bench arms, calibration, family tours) run with `pytest -m slow`; the
# default run (CI, 20 minutes on 2 cores) runs the rest. The commands they show are tested one by one elsewhere.
SLOW_PAGES = {"families.md", "fd-bench.md", "calibration.md", "if.md", "sd3-flux.md", "video.md"}


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p
                                  for p in PAGES if runnable_blocks(p)], ids=lambda p: getattr(p, "name", p))
def test_every_tiny_block_of_the_page_runs(page, shim_bin, tmp_path):
    env = dict(os.environ, PATH=f"{shim_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for language, code in runnable_blocks(page):
        command = ["bash", "-euo", "pipefail", "-c", code] if language != "python" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{page.name} block failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
