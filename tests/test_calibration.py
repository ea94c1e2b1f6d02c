"""fd-calibrate: the key-step chooser against brute force, the drift measurement, the manifest entries, and the
command end to end on tiny (UNet: mid and skips) and tiny-dit (transformer: the token cache)."""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil

import numpy as np
import pytest

from fd.runtime.calibrated_steps import calibrated_key_steps
from fd.runtime.drift import RecordingRunner, drift_matrix, measure_drift
from fd.runtime.errors import FdError
from fd.runtime.key_step_choice import choose_key_steps, fewest_key_steps, mean_drift, worst_drift
from fd.runtime.manifest import load_manifest


# --- the chooser ------------------------------------------------------------------------------------------

def random_drift(steps: int, seed: int) -> np.ndarray:
    """Pairwise drifts with no structure at all, so only a search of every set finds the optimum."""
    return np.triu(np.random.default_rng(seed).uniform(0, 1, (steps, steps)), 1)


def windows_fit(keys, steps: int, max_window: int) -> bool:
    return all(b - a <= max_window for a, b in zip(keys, [*keys[1:], steps]))


def brute_force(drift, most_keys: int, max_window: int) -> float:
    """The least J over every key set with step 0, at most `most_keys` members and windows ≤ max_window, written
    from the definition (for each step, the drift from the last key at or before it)."""
    steps, best = len(drift), np.inf
    for size in range(most_keys):
        for rest in itertools.combinations(range(1, steps), size):
            keys = (0, *rest)
            if windows_fit(keys, steps, max_window):
                seen = [drift[max(k for k in keys if k <= i), i] for i in range(steps)]
                best = min(best, sum(seen) / steps)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_window", [3, 9])
def test_chosen_key_steps_are_optimal_against_brute_force(seed, max_window):
    steps = 9
    drift = random_drift(steps, seed)
    previous = np.inf
    for budget in range(-(-steps // max_window), steps + 1):
        keys = choose_key_steps(drift, budget, max_window)
        assert keys[0] == 0 and len(keys) <= budget and list(keys) == sorted(set(keys))
        assert windows_fit(keys, steps, max_window)
        assert mean_drift(drift, keys) == pytest.approx(brute_force(drift, budget, max_window), abs=1e-12)
        assert mean_drift(drift, keys) <= previous + 1e-12  # more budget never worse
        previous = mean_drift(drift, keys)


def test_an_objective_of_adjacent_drift_alone_would_choose_differently():
    """The chooser reads the pairwise drift D[k, i], not the sum of the adjacent drifts: here the features return
    close to step 0's at step 3 (D[0, 3] small although every adjacent step moves), and the optimum uses that."""
    drift = np.zeros((5, 5))
    for k, i in itertools.combinations(range(5), 2):
        drift[k, i] = 1.0 * (i - k)
    drift[0, 3] = drift[0, 4] = 0.01
    keys = choose_key_steps(drift, 2, max_window=5)
    assert keys == (0, 4)  # J = (1 + 2 + 0.01) / 5; the next best, (0, 2) and (0, 3), have 4 / 5
    adjacent_sum = np.zeros_like(drift)  # the wrong variant: drift accumulated along adjacent steps
    for k, i in itertools.combinations(range(5), 2):
        adjacent_sum[k, i] = sum(drift[j - 1, j] for j in range(k + 1, i + 1))
    wrong = choose_key_steps(adjacent_sum, 2, max_window=5)
    assert mean_drift(drift, keys) < mean_drift(drift, wrong)


def test_known_curves_give_known_key_steps():
    # Drift growing linearly with the distance: two equal windows.
    linear = np.triu(np.subtract.outer(np.arange(10), np.arange(10)).T.astype(float), 1)
    assert choose_key_steps(linear, 2, max_window=10) == (0, 5)
    # Features that move fast in the first steps and hardly later: the keys go to the start (the paper's shape).
    moves = np.array([0, 10, 10, 10, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    cumulative = np.cumsum(moves)
    early = np.triu(np.subtract.outer(cumulative, cumulative).T, 1)
    assert choose_key_steps(early, 4, max_window=10) == (0, 1, 2, 3)
    # The same curve with a window limit of 4 steps needs a key in the tail.
    limited = choose_key_steps(early, 4, max_window=4)
    assert windows_fit(limited, 10, 4) and limited != (0, 1, 2, 3)  # that set leaves a window of 7 steps
    assert mean_drift(early, limited) == pytest.approx(brute_force(early, 4, 4)) == pytest.approx(10.9 / 10)
    assert worst_drift(early, (0, 1, 2, 3)) == pytest.approx(0.6)


@pytest.mark.parametrize("seed", range(4))
def test_max_drift_gives_the_fewest_key_steps_that_reach_it(seed):
    steps, max_window = 9, 4
    drift = random_drift(steps, seed)
    for target in (0.0, 0.05, 0.1, 0.2, 0.3, 1.0):
        keys = fewest_key_steps(drift, target, max_window)
        assert mean_drift(drift, keys) <= target + 1e-12 and windows_fit(keys, steps, max_window)
        fewer = len(keys) - 1
        assert fewer < -(-steps // max_window) or brute_force(drift, fewer, max_window) > target


def test_a_budget_below_the_window_limit_is_one_line():
    with pytest.raises(FdError, match="--num-key-steps 2 cannot cover 50 steps with windows of at most 15 steps"):
        choose_key_steps(random_drift(50, 0), 2, max_window=15)


# --- the measurement --------------------------------------------------------------------------------------

def test_drift_matrix_is_the_relative_l2_averaged_over_rows_and_tensors():
    base = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    # E_i = (1 + i)·base in tensor "a", and a tensor "b" that does not move:
    # ‖E_i − E_k‖/‖E_i‖ = (i − k)/(1 + i) and 0.
    outputs = [{"a": (1 + i) * base, "b": base.copy()} for i in range(4)]
    summed, rows = drift_matrix(outputs)
    assert rows == 2
    for k, i in itertools.combinations(range(4), 2):
        assert summed[k, i] / rows == pytest.approx(((i - k) / (1 + i) + 0) / 2, rel=1e-6)
    assert not np.tril(summed).any()


def test_recording_leaves_the_baseline_unchanged_and_sees_every_step(tiny_engine):
    from fd.runtime.pipeline import FasterDiffusionPipeline
    from fd.runtime.policy import FasterDiffusionPolicy
    pipe = FasterDiffusionPipeline(tiny_engine)
    plain = pipe(["a cat"], steps=6, seed=3, policy=FasterDiffusionPolicy.baseline(6))
    recorder = RecordingRunner(pipe.runner, pipe.manifest["cache"])
    pipe.runner = recorder
    recorded = pipe(["a cat"], steps=6, seed=3, policy=FasterDiffusionPolicy.baseline(6))
    np.testing.assert_array_equal(plain.latents, recorded.latents)
    assert len(recorder.outputs) == 6 and all(list(o) == pipe.manifest["cache"] for o in recorder.outputs)
    assert all(len(o[name]) == 2 for o in recorder.outputs for name in o)  # guided: both halves
    pipe.runner = recorder._runner
    drift, timesteps, adjacent = measure_drift(pipe, [["a cat"]], steps=6, scheduler="ddim", seed=3)
    assert timesteps == plain.timesteps and pipe.runner is recorder._runner
    expected, rows = drift_matrix(recorder.outputs)
    np.testing.assert_allclose(drift, expected / rows)
    assert (np.diagonal(drift, 1) > 0).all() and adjacent[0] == 0


# --- the command, the manifest, and fd-run ----------------------------------------------------------------

def folder_files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_copy(tiny_engine, tmp_path):
    return shutil.copytree(tiny_engine, tmp_path / "tiny")


def calibrate(capsys, *args):
    from fd.runtime.calibrate_cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fd_calibrate_writes_only_its_entry_and_fd_run_uses_it(tiny_copy, capsys, tmp_path):
    before_files, before = folder_files(tiny_copy), json.loads((tiny_copy / "manifest.json").read_text())
    code, out, err = calibrate(capsys, "--engine-dir", tiny_copy, "--steps", 12, "--samples", 2,
                               "--plot", tmp_path / "drift.png")  # as many keys as the paper's set: 6
    assert code == 0, err
    after = json.loads((tiny_copy / "manifest.json").read_text())
    entry, = after.pop("calibrated_key_steps")
    assert after == before  # nothing else in the manifest changed, nor any other file
    assert {k: v for k, v in folder_files(tiny_copy).items() if k != "manifest.json"} == \
        {k: v for k, v in before_files.items() if k != "manifest.json"}
    keys = tuple(entry["key_steps"])
    assert entry["scheduler"] == "ddim" and entry["steps"] == 12 and keys[0] == 0 and len(keys) <= 6
    assert entry["mean_drift"] <= entry["paper_mean_drift"] + 1e-12  # the paper's 6 are among the sets searched
    assert calibrated_key_steps(load_manifest(tiny_copy), "ddim", 12) == keys
    assert calibrated_key_steps(load_manifest(tiny_copy), "ddim", 13) is None
    assert f"wrote key steps {list(keys)}" in out and "mean drift" in out and (tmp_path / "drift.png").stat().st_size

    from fd.runtime.cli import main as fd_run
    paper = (0, 1, 2, 3, 5, 10)
    for flags, want in (([], keys), (["--key-steps", "calibrated"], keys), (["--key-steps", "paper"], paper)):
        assert fd_run(["--engine-dir", str(tiny_copy), "--prompt", "a cat", "--steps", "12", "--timings",
                       "--out", str(tmp_path / "x.png"), *flags]) == 0
        assert f"key steps: {list(want)}" in capsys.readouterr().out
    assert fd_run(["--engine-dir", str(tiny_copy), "--prompt", "a cat", "--steps", "13", "--key-steps", "calibrated",
                   "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --key-steps calibrated: this engine folder has no calibrated key steps") and \
        err.count("\n") == 1


def test_fd_calibrate_on_dit_uses_the_token_cache(tmp_path_factory, capsys):
    from fd.builder.build import BuildOptions, build
    folder = build(BuildOptions(model="tiny-dit", max_window=4, out=str(tmp_path_factory.mktemp("dit") / "dit")),
                   log=lambda *_: None)
    code, out, err = calibrate(capsys, "--engine-dir", folder, "--steps", 10, "--max-drift", 0.0, "--samples", 2)
    assert code == 0, err
    entry, = load_manifest(folder)["calibrated_key_steps"]
    assert entry["key_steps"] == list(range(10)) and entry["mean_drift"] == 0  # drift 0: every step a key step
    code, out, err = calibrate(capsys, "--engine-dir", folder, "--steps", 10, "--num-key-steps", 3, "--samples", 2)
    assert code == 0, err
    entry, = load_manifest(folder)["calibrated_key_steps"]  # replaced, not added
    keys = entry["key_steps"]
    assert keys[0] == 0 and len(keys) == 3 and windows_fit(keys, 10, 4) and entry["worst_drift"] > 0


@pytest.mark.parametrize("args, message", [
    (["--num-key-steps", "0"], "--num-key-steps 0 is out of range: use 1 to --steps (12)"),
    (["--max-drift", "nan"], "--max-drift nan is not allowed"),
    (["--samples", "0"], "--samples 0 is out of range"),
    (["--plot", "x.jpg"], "--plot x.jpg must end in .png"),
    (["--prompts", "missing.txt"], "cannot read --prompts missing.txt"),
])
def test_bad_options_are_one_line_and_leave_the_folder_alone(tiny_copy, capsys, args, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = folder_files(tiny_copy)
    code, out, err = calibrate(capsys, "--engine-dir", tiny_copy, "--steps", 12, "--samples", 1, *args)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert folder_files(tiny_copy) == before


def test_a_budget_the_window_limit_cannot_take_is_refused_before_the_run(tiny_copy, capsys):
    code, out, err = calibrate(capsys, "--engine-dir", tiny_copy, "--steps", 50, "--num-key-steps", 3)
    assert code == 2 and "give --num-key-steps 4 or more, or rebuild the folder with a larger fd-build --max-window" \
        in err
    assert "measuring" not in err


@pytest.mark.parametrize("entry, message", [
    ({"key_steps": [1, 5]}, "calibrated_key_steps[0].key_steps is not increasing step indices from 0"),
    ({"key_steps": [0, 5, 5]}, "is not increasing step indices"),
    ({"key_steps": [0, 20]}, "is not increasing step indices from 0 to at most 11"),
    ({"key_steps": [0]}, "has a window of 12 steps, above limits.max_window 4"),
    ({"steps": 10 ** 9}, "calibrated_key_steps[0].steps is 1000000000, expected a step count from 1 to 1000"),
    ({"steps": True}, "calibrated_key_steps[0].steps is true, expected a step count"),
    ({"mean_drift": "nan"}, "calibrated_key_steps[0].mean_drift is \"nan\", expected a relative drift"),
    ({"key_steps": [0, -1]}, "calibrated_key_steps[0].key_steps[1] is -1, expected a step index"),
    ({"scheduler": "turbo"}, "calibrated_key_steps[0].scheduler is 'turbo', not one of ddim"),
])
def test_tampered_entries_are_refused_at_load_in_one_line(tiny_copy, entry, message):
    path = tiny_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["limits"]["max_window"] = 4
    good = {"scheduler": "ddim", "steps": 12, "key_steps": [0, 4, 8], "mean_drift": 0.1}
    path.write_text(json.dumps({**manifest, "calibrated_key_steps": [good]}))
    assert calibrated_key_steps(load_manifest(tiny_copy), "ddim", 12) == (0, 4, 8)
    path.write_text(json.dumps({**manifest, "calibrated_key_steps": [{**good, **entry}]}))
    with pytest.raises(FdError, match=None) as caught:
        load_manifest(tiny_copy)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    path.write_text(json.dumps({**manifest, "calibrated_key_steps": [good, good]}))
    with pytest.raises(FdError, match="repeats scheduler ddim at 12 steps"):
        load_manifest(tiny_copy)
