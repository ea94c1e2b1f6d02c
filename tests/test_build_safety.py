"""fd-build never loses a user's files: --force replaces only fd engine folders, output problems are found
before the model loads, and an interrupt (SIGINT or SIGTERM, at any point) leaves the old folder as it was."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO, run_fd
from tests.test_cli_errors import assert_one_line_error


def tree_digest(folder) -> dict:
    """Every file under `folder` with its sha256: equal digests mean a byte-identical folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def old_folder(tiny_engine, tmp_path):
    """A complete engine folder that a build with --force would replace."""
    folder = tmp_path / "engines" / "tiny"
    shutil.copytree(tiny_engine, folder)
    return folder


# --- what --force may replace, checked before the model loads ------------------------------------------

@pytest.mark.parametrize("make,args,fragment", [
    (lambda p: (p.mkdir(), (p / "thesis.txt").write_text("precious")), ["--force"],
     "--force replaces only fd engine folders"),
    (lambda p: p.write_text("precious"), ["--force"], "is a file, not an engine folder"),
    (lambda p: p.write_text("precious"), [], "is a file, not an engine folder"),
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text("[1, 2]")), ["--force"], "not fd's"),
])
def test_force_never_replaces_what_fd_did_not_build(tmp_path, make, args, fragment):
    target = tmp_path / "target"
    make(target)
    before = tree_digest(tmp_path)
    done = run_fd("fd.builder.cli", "--model", "tiny", "--out", str(target), *args)
    assert_one_line_error(done, fragment)
    assert "loaded" not in done.stdout  # refused before any model was loaded
    assert tree_digest(tmp_path) == before
    assert hidden_leftovers(tmp_path) == []


def test_force_refuses_an_engine_folder_holding_other_files(old_folder):
    (old_folder / "notes.txt").write_text("mine")
    before = tree_digest(old_folder)
    done = run_fd("fd.builder.cli", "--model", "tiny", "--out", str(old_folder), "--force")
    assert_one_line_error(done, "holds files fd did not write (notes.txt)")
    assert tree_digest(old_folder) == before


@pytest.mark.parametrize("out,fragment", [
    (".", "names no new folder"),
    ("plain.txt/engines", "lies under"),
    ("/proc/no-such-dir/engines", "cannot write the engine folder"),
])
def test_output_problems_are_found_before_loading(tmp_path, out, fragment):
    (tmp_path / "plain.txt").write_text("x")
    before = tree_digest(tmp_path)
    done = run_fd("fd.builder.cli", "--model", "tiny", "--out", out, "--force", cwd=tmp_path)
    assert_one_line_error(done, fragment)
    assert "loaded" not in done.stdout
    assert tree_digest(tmp_path) == before and hidden_leftovers(tmp_path) == []


def test_leftovers_of_killed_builds_are_removed_and_an_orphaned_old_folder_restored(old_folder, tmp_path):
    parent, dead = old_folder.parent, dead_pid()
    (parent / f".tiny.building-{dead}-abc").mkdir()
    (parent / f".tiny.building-{dead}-abc" / "denoiser_decoder.onnx").write_text("half")
    live = parent / f".tiny.building-{os.getpid()}-xyz"  # a build still running (this process): left alone
    live.mkdir()
    shutil.move(old_folder, parent / "elsewhere")  # a swap killed between its two renames:
    (parent / f".tiny.old-{dead}-q").mkdir()      # the old folder sits in the retired one, none in place
    shutil.move(parent / "elsewhere", parent / f".tiny.old-{dead}-q" / "folder")
    before = tree_digest(parent / f".tiny.old-{dead}-q" / "folder")
    # a build that fails at loading still tidies first
    done = run_fd("fd.builder.cli", "--model", str(tmp_path / "no-such-model"), "--out", str(old_folder), "--force")
    assert done.returncode != 0
    assert tree_digest(old_folder) == before
    assert hidden_leftovers(parent) == [live.name]


def dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


# --- interrupts at every point ----------------------------------------------------------------------

# A real fd-build process that sends itself a signal at one point of the build: just as loading starts,
# after the second graph's export, during the second graph's check, just before the final swap, and
# inside the swap itself (where signals are held back until it is done).
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from fd.builder import build, export, staging
    point, signum = sys.argv[1], getattr(signal, sys.argv[2])
    calls = {"n": 0}

    def hit(original, after=False, nth=1):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if after:
                result = original(*args, **kwargs)
            if calls["n"] == nth and point == "swallowed":
                try:  # a library that catches the interrupt and carries on
                    os.kill(os.getpid(), signum)
                except KeyboardInterrupt:
                    pass
            elif calls["n"] == nth:
                os.kill(os.getpid(), signum)
            return result if after else original(*args, **kwargs)
        return wrapper

    if point == "loading":
        import fd.builder.models as models
        models.load_components = hit(models.load_components)
    elif point == "export":
        export.export_onnx = hit(export.export_onnx, after=True, nth=2)
    elif point == "check":
        export.check_onnx = hit(export.check_onnx, nth=2)
    elif point == "before-swap":
        staging._swap_into_place = hit(staging._swap_into_place)
    elif point == "in-swap":
        staging.engine_folder_problem = hit(staging.engine_folder_problem, nth=2)
    elif point == "swallowed":
        export.check_onnx = hit(export.check_onnx, nth=2)
    from fd.builder.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def run_build_with_signal(point: str, signame: str, out) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", SCRIPT, point, signame, "--model", "tiny", "--out", str(out),
                           "--force"], capture_output=True, text=True, env=env, timeout=600)


# Two points run by default (CI's 20 minutes); every point with `pytest -m slow`.
@pytest.mark.parametrize("point,signame", [
    ("loading", "SIGINT"), pytest.param("export", "SIGTERM", marks=pytest.mark.slow), ("check", "SIGINT"),
    pytest.param("before-swap", "SIGTERM", marks=pytest.mark.slow), pytest.param("swallowed", "SIGINT", marks=pytest.mark.slow),
])
def test_interrupt_leaves_the_old_folder_untouched(old_folder, point, signame):
    before = tree_digest(old_folder)
    done = run_build_with_signal(point, signame, old_folder)
    assert done.returncode == 128 + getattr(signal, signame), done.stderr
    assert_one_line_error(done, f"interrupted ({signame})", f"{old_folder} is unchanged")
    assert tree_digest(old_folder) == before
    assert hidden_leftovers(old_folder.parent) == []
    if point == "before-swap":  # byte-identical already; once, show it also still generates
        from fd.runtime.pipeline import FasterDiffusionPipeline
        assert FasterDiffusionPipeline(old_folder)(["a cat"], steps=2).calls["denoiser_decoder"] == 2


def test_interrupt_inside_the_swap_is_held_until_the_new_folder_is_whole(old_folder):
    before = tree_digest(old_folder)
    done = run_build_with_signal("in-swap", "SIGINT", old_folder)
    assert done.returncode == 130, done.stderr
    assert_one_line_error(done, "interrupted (SIGINT)", "holds the new engine folder")
    after = tree_digest(old_folder)
    assert after != before and after.keys() == before.keys()  # the new build, complete (new creation time)
    assert hidden_leftovers(old_folder.parent) == []


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_signal_from_outside_stops_a_build_started_with_sigint_ignored(old_folder, signum):
    """`fd-build … &` in a script starts fd with SIGINT ignored; fd still stops, and keeps the old folder."""
    before = tree_digest(old_folder)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "fd.builder.cli", "--model", "tiny", "--out", str(old_folder),
                             "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    line = proc.stdout.readline()  # "loaded tiny in …": the export has begun
    assert line.startswith("loaded"), line
    time.sleep(0.5)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line_error(done, "interrupted", "is unchanged")
    assert tree_digest(old_folder) == before
    assert hidden_leftovers(old_folder.parent) == []


# --- an interrupt that surfaces as another error ------------------------------------------------------

@pytest.fixture
def signal_record():
    """fd.runtime.cli_common's record of the signals a command received (its handler appends to it)."""
    from fd.runtime import cli_common
    cli_common._seen.clear()
    yield cli_common._seen
    cli_common._seen.clear()


def test_an_interrupt_raised_as_another_error_is_still_the_interrupt(tmp_path, signal_record):
    """A signal arriving inside a C extension's import comes out as "ImportError: initialization failed"
    (onnxruntime does this): after a signal, the build's failure is the interrupt, with its one line."""
    from fd.builder.staging import staged_folder
    from fd.runtime.cli_common import Interrupted, run_cli
    out = tmp_path / "engines" / "x"
    with pytest.raises(Interrupted) as caught:
        with staged_folder(out, force=False):
            signal_record.append(signal.SIGTERM)
            raise ImportError("initialization failed")
    assert caught.value.signum == signal.SIGTERM and f"{out} is unchanged" in caught.value.detail
    assert not out.parent.exists()  # no stage left, not even the engines/ folder the build made

    def job():  # the same outside a build (fd-run, fd-bench): one line and 128 + the signal
        signal_record.append(signal.SIGINT)
        raise ImportError("initialization failed")
    assert run_cli(job) == 128 + signal.SIGINT


def test_an_error_without_a_signal_is_not_called_an_interrupt(tmp_path, signal_record):
    from fd.builder.staging import staged_folder
    with pytest.raises(ImportError):
        with staged_folder(tmp_path / "engines" / "x", force=False):
            raise ImportError("initialization failed")
