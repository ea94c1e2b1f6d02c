"""fd-bench --quality arms with explicit key steps, for comparing key-step choices at one encoder budget K.

All run DDIM 50 steps with FasterDiffusion (noise injection on, as fd-run's default):
  fd-paper:K      the paper's nine keys' spacing stretched to K members (K = 9: the paper's own set; rounding
                  merges keys for K ≥ 11, so the set can have fewer than K: its size is in the arm's description)
  fd-uniform:K    K key steps spread evenly over the 50 steps (K = 9: 0, 5, 11, 16, 22, 27, 33, 38, 44; fd-calibrate's
                  "uniform" comparison set; the older `fd-uniform` arm is every 6th step, 0 … 48)
  fd-calibrated   the key steps fd-calibrate wrote into the folder's manifest for DDIM at 50 steps (its K is
                  whatever fd-calibrate chose); a folder without that entry is one error line naming the fix
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from fd.runtime.errors import FdError

STEPS = 50
KEY_STEP_ARMS_HELP = "fd-paper:K, fd-uniform:K (K key steps of DDIM-50) or fd-calibrated"
_PATTERN = re.compile(r"fd-(paper|uniform):(\d+)")


def paper_shaped(steps: int, count: int) -> tuple[int, ...]:
    """The paper's nine keys' spacing stretched to `count` members (count = 9 at 50 steps: the paper's set)."""
    from fd.runtime.policy import PAPER_KEY_STEPS_50
    positions = np.interp(np.arange(count) * (len(PAPER_KEY_STEPS_50) - 1) / max(count - 1, 1),
                          np.arange(len(PAPER_KEY_STEPS_50)), PAPER_KEY_STEPS_50) * steps / 50
    return tuple(sorted({int(round(p)) for p in positions}))


def key_step_arm(name: str):
    """The Arm for fd-paper:K, fd-uniform:K or fd-calibrated; None for any other name."""
    from fd.benchmarks.quality import Arm
    from fd.runtime.calibrate_cli import uniform_set  # fd-calibrate's uniform comparison set
    if name == "fd-calibrated":
        return Arm(name, "FD, calibrated key steps (fd-calibrate)", STEPS, keys="calibrated")
    match = _PATTERN.fullmatch(name)
    if match is None:
        return None
    kind, count = match.group(1), int(match.group(2))
    if not 1 <= count <= STEPS:
        raise FdError(f"--arms {name}: K = {count} is out of range: use 1 to {STEPS} key steps")
    keys = paper_shaped(STEPS, count) if kind == "paper" else uniform_set(STEPS, count)
    if kind == "paper":
        what = "FD, paper key steps" if count == 9 else "FD, paper-shaped key steps"
    else:
        what = "FD, uniform key steps"
    return Arm(name, f"{what} ({len(keys)} of {STEPS})", STEPS, keys=keys)


def resolve_calibrated(arms: list, manifest: dict, engine_dir) -> list:
    """Arms with keys="calibrated" made explicit from the folder's manifest (fd-calibrate's DDIM-50 entry)."""
    from fd.runtime.calibrated_steps import calibrated_key_steps
    resolved = []
    for arm in arms:
        if arm.keys == "calibrated":
            keys = calibrated_key_steps(manifest, arm.scheduler, arm.steps)
            if keys is None:
                raise FdError(f"--arms {arm.name}: {engine_dir} has no calibrated key steps for {arm.scheduler} at "
                              f"{arm.steps} steps: run fd-calibrate --engine-dir {engine_dir} --steps {arm.steps} "
                              "first, or drop the arm")
            arm = dataclasses.replace(arm, keys=tuple(keys),
                                      what=f"FD, calibrated key steps ({len(keys)} of {arm.steps}, fd-calibrate)")
        resolved.append(arm)
    return resolved
