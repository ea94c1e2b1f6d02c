"""Shared fixtures: the tiny model, built once per session into an ONNX Runtime engine folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_turn(tmp_path_factory):
    """The files that start a real fd-serve take turns: pyproject's addopts run files on parallel pytest-xdist
    workers, and two Ray clusters starting at once on one small machine is a test of Ray, not of fd. A file
    lock beside the workers' temporary folders, held for the whole module."""
    import fcntl
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # popen-gwN's parent is the run's
    with open(root / "fd-serve-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's OpenMP threads stall for seconds per call on a busy 2-core box; one thread is steady. Modules
    that run diffusers or the torch reference many times use it (pytestmark = usefixtures(...))."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_components():
    from fd.builder.families.sd import make_tiny_components
    return make_tiny_components()


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory) -> Path:
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("engines") / "tiny-fp32-onnxruntime"
    return build(BuildOptions(model="tiny", out=str(out)), log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_control_engine(tmp_path_factory) -> Path:
    """tiny with tiny-controlnet and the VAE encoder (--img2img), at most 2 images per generation (fd-serve's
    tests: test_serve.py, test_hostile.py)."""
    from fd.builder.build import BuildOptions, build
    out = tmp_path_factory.mktemp("engines") / "tiny-control"
    return build(BuildOptions(model="tiny", controlnets=("tiny-controlnet",), img2img=True, max_batch_size=2,
                              max_window=6, out=str(out)), log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_components) -> Path:
    """The tiny model saved as a diffusers pipeline folder (what `fd-build --model DIR` loads)."""
    from fd.builder.families import save_pipeline_folder
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    save_pipeline_folder(tiny_components, str(folder))
    return folder


def run_fd(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run an fd command-line module in a fresh process, as a user would run the console script."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
