"""What every fd command does with failures: one line on stderr and a non-zero exit, no traceback."""
from __future__ import annotations

import sys

from runtime.errors import FdError


def run_cli(job) -> int:
    try:
        job()
    except FdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
