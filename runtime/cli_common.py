"""What every fd command does with failures: one line on stderr and a non-zero exit, no traceback.

SIGINT and SIGTERM both become `Interrupted` (a KeyboardInterrupt, so `finally` blocks and staged writes
clean up) even where the shell started fd with SIGINT ignored (`fd-build … &` in a script), and the exit
status is the shell's 128 + signal number. `signals_seen()` also lets a step that must not run after an
interrupt (fd-build's final swap) refuse even if a library swallowed the exception.
"""
from __future__ import annotations

import contextlib
import signal
import sys

from fd.runtime.errors import FdError

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_seen: list[int] = []
_deferring: list[bool] = []  # non-empty inside signals_deferred()


class Interrupted(KeyboardInterrupt):
    """A stop asked for by SIGINT or SIGTERM; `detail` says what was kept."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail = signum, detail

    def line(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted ({name})" + (f": {self.detail}" if self.detail else "")


def signals_seen() -> list[int]:
    """The signals received since the command started (even if their exception was swallowed)."""
    return list(_seen)


def _raise_interrupted(signum, frame):
    _seen.append(signum)
    if not _deferring:
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_interrupts():
    """Install the handlers for the block (main thread only, as Python's signal module requires)."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM back over a step that must not be cut in two; one that came is raised when the
    block ends. (Python runs signal handlers in the main thread, so a flag is enough; pthread_sigmask is
    not, as the kernel may hand a process-wide signal to another thread, such as torch's.)"""
    seen_before = len(_seen)
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if len(_seen) > seen_before:
        raise Interrupted(_seen[seen_before])


def run_cli(job) -> int:
    _seen.clear()
    try:
        with signals_as_interrupts():
            job()
    except FdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if not _seen:
            raise
        # The interrupt surfaced as another error: raised inside a C extension (onnxruntime's import turns it
        # into "ImportError: initialization failed") or caught and re-raised by a library as its own.
        print(f"error: {Interrupted(_seen[0]).line()}", file=sys.stderr)
        return 128 + _seen[0]
    return 0
