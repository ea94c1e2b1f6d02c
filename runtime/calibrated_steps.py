"""Calibrated key steps in an engine folder's manifest: the entries fd-calibrate writes and the runtime reads.

manifest["calibrated_key_steps"] is a list of entries, at most one per (scheduler, steps):
  {"scheduler": "ddim", "steps": 50, "key_steps": [0, 1, …], "mean_drift": 0.012, "worst_drift": 0.05,
   "paper_mean_drift": 0.02, "samples": 8}
`scheduler` is a registry name ("model" is resolved before it is stored); `mean_drift` is the objective the
key steps minimise (runtime/key_step_choice.py), measured on `samples` baseline images; `paper_mean_drift` is
the same measure for the paper's key steps (runtime/policy.default_key_steps), for comparison.

The manifest's shape check (runtime/manifest_schema.py CALIBRATION) bounds every number; check_calibrations
adds what a schema cannot say (sorted keys from step 0, windows within the folder's max window, one entry per
scheduler and step count). write_calibration rewrites manifest.json atomically and changes nothing but its entry.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fd.runtime.errors import FdError

KEY = "calibrated_key_steps"
FIX = "run fd-calibrate on the folder again (or delete that entry)"


def calibrated_key_steps(manifest: dict, scheduler: str, steps: int) -> tuple[int, ...] | None:
    """The folder's calibrated key steps for this scheduler (a registry name or "model") and step count, or None."""
    from fd.runtime.schedulers import resolve_name
    name = resolve_name(scheduler, manifest["scheduler_config"])
    for entry in manifest.get(KEY, []):
        if entry["scheduler"] == name and entry["steps"] == steps:
            return tuple(entry["key_steps"])
    return None


def calibration_problem(manifest: dict) -> str | None:
    """What is wrong with the manifest's calibrated entries beyond their shape (already checked), or None."""
    from fd.runtime.schedulers import SCHEDULERS
    seen = set()
    max_window = manifest["limits"]["max_window"]
    for index, entry in enumerate(manifest.get(KEY, [])):
        where, keys, steps = f"{KEY}[{index}]", entry["key_steps"], entry["steps"]
        if entry["scheduler"] not in SCHEDULERS:
            return f"{where}.scheduler is {entry['scheduler']!r}, not one of {', '.join(SCHEDULERS)}"
        if (entry["scheduler"], steps) in seen:
            return f"{where} repeats scheduler {entry['scheduler']} at {steps} steps"
        seen.add((entry["scheduler"], steps))
        if not keys or keys[0] != 0 or any(b <= a for a, b in zip(keys, keys[1:])) or keys[-1] >= steps:
            return f"{where}.key_steps is not increasing step indices from 0 to at most {steps - 1}"
        window = max(b - a for a, b in zip(keys, [*keys[1:], steps]))
        if window > max_window:
            return f"{where}.key_steps has a window of {window} steps, above limits.max_window {max_window}"
    return None


def check_calibrations(manifest: dict, path: Path) -> None:
    problem = calibration_problem(manifest)
    if problem:
        raise FdError(f"{path}: {problem}: {FIX}")


def write_calibration(engine_dir: str | os.PathLike, entry: dict) -> None:
    """Put `entry` into the folder's manifest (replacing the one for its scheduler and steps), atomically.

    The manifest is read again here, just before the write, so a change made while the calibration ran (another
    fd-calibrate for other steps) is kept; every other key is written back as it was read."""
    from fd.runtime import manifest_schema
    from fd.runtime.manifest import MANIFEST_NAME, load_manifest, write_json_atomic
    load_manifest(engine_dir)  # the folder as it is now must be a valid one
    path = Path(engine_dir) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    others = [e for e in manifest.get(KEY, []) if (e["scheduler"], e["steps"]) != (entry["scheduler"], entry["steps"])]
    manifest[KEY] = sorted([*others, entry], key=lambda e: (e["scheduler"], e["steps"]))
    try:
        manifest_schema.check(manifest)
    except manifest_schema.SchemaError as exc:  # a bug here, never the user's: say which value
        raise FdError(f"fd-calibrate made a bad manifest entry ({exc}); nothing was written") from None
    check_calibrations(manifest, path)
    write_json_atomic(path, manifest)
