"""fd-bench --quality's paired comparison with a baseline arm (benchmarks/paired.py) and its key-step arms
(benchmarks/quality_arms.py: fd-paper:K, fd-uniform:K, fd-calibrated). No trained model: synthetic features,
and the untrained tiny engine end to end with a handful of samples."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fd.benchmarks import paired
from fd.benchmarks.quality import bootstrap, frechet_distance
from fd.runtime.errors import FdError

RESAMPLES = 200


def features_per_digit(rng, per_digit: int, dims: int = 8, spread: float = 1.0):
    """(features, digit of each row): ten clusters, one per digit."""
    centres = rng.standard_normal((10, dims)) * 3
    digits = np.repeat(np.arange(10), per_digit)
    return centres[digits] + spread * rng.standard_normal((len(digits), dims)), digits


def test_stratified_resampling_keeps_each_digits_count():
    strata = np.repeat(np.arange(10), [3, 5, 7, 1, 2, 9, 4, 4, 6, 8])
    rows = paired.stratified_resample(strata, np.random.default_rng(0))
    assert np.array_equal(np.bincount(strata[rows]), np.bincount(strata))
    assert len(np.unique(rows)) < len(rows)  # with replacement: some rows repeat


def test_identical_arms_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    real, real_digits = features_per_digit(rng, 20)
    generated, digits = features_per_digit(rng, 30)
    out = paired.paired_fd_differences({"base": generated, "same": generated.copy()}, "base", digits, real,
                                       real_digits, frechet_distance, RESAMPLES)
    assert out["same"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert out["base"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    correct = (rng.random(300) < 0.9).astype(float)
    acc = paired.paired_mean_differences({"base": correct, "same": correct.copy()}, "base", digits, RESAMPLES)
    assert acc["same"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    seconds = rng.random(12) + 1
    speed = paired.paired_speedups({"base": seconds, "same": seconds.copy()}, "base", RESAMPLES)
    assert speed["same"] == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_a_shift_shows_up_in_the_paired_interval_where_the_unpaired_ones_overlap():
    rng = np.random.default_rng(1)
    real, real_digits = features_per_digit(rng, 20)
    generated, digits = features_per_digit(rng, 30)
    shift = np.zeros(generated.shape[1])
    shift[0] = 0.5
    moved = generated + shift  # every image a little off in one direction: FD grows by |Δμ|² terms
    out = paired.paired_fd_differences({"base": generated, "moved": moved}, "base", digits, real, real_digits,
                                       frechet_distance, RESAMPLES)["moved"]
    expected = frechet_distance(moved, real) - frechet_distance(generated, real)
    assert out["value"] == pytest.approx(expected)
    assert expected > 0 and out["low"] > 0 and out["low"] <= out["value"] <= out["high"]
    # the per-arm (unpaired) intervals cannot tell the two apart: they overlap
    base_low, base_high = bootstrap(lambda f: frechet_distance(f, real), generated, bias_corrected=True,
                                    resamples=RESAMPLES)
    moved_low, moved_high = bootstrap(lambda f: frechet_distance(f, real), moved, bias_corrected=True,
                                      resamples=RESAMPLES)
    assert moved_low < base_high
    # a shift back the other way gives a negative difference, told apart the same way
    back = paired.paired_fd_differences({"moved": moved, "base": generated}, "moved", digits, real, real_digits,
                                        frechet_distance, RESAMPLES)["base"]
    assert back["high"] < 0

    # accuracy: 15 more correct of 300 is +5 points, told apart from 0; the speed-up of an arm twice as fast is 2
    correct = (rng.random(300) < 0.8).astype(float)
    better = correct.copy()
    better[np.flatnonzero(correct == 0)[:15]] = 1
    acc = paired.paired_mean_differences({"base": correct, "better": better}, "base", digits, RESAMPLES)["better"]
    assert acc["value"] == pytest.approx(0.05) and acc["low"] > 0
    seconds = rng.random(12) + 1
    speed = paired.paired_speedups({"base": seconds, "fast": seconds / 2}, "base", RESAMPLES)["fast"]
    assert speed["value"] == pytest.approx(2.0) and speed["low"] == pytest.approx(2.0)


def test_key_step_arms_parse_to_their_sets_and_bad_ones_are_one_line():
    from fd.benchmarks.quality import parse_arms
    from fd.runtime.calibrate_cli import uniform_set
    from fd.runtime.policy import PAPER_KEY_STEPS_50
    paper, uniform, calibrated = parse_arms("fd-paper:9,fd-uniform:9,fd-calibrated")
    assert paper.keys == PAPER_KEY_STEPS_50 and paper.steps == 50
    assert uniform.keys == uniform_set(50, 9) == (0, 5, 11, 16, 22, 27, 33, 38, 44)
    assert calibrated.keys == "calibrated"
    five = parse_arms("fd-paper:5")[0]
    assert five.keys[0] == 0 and len(five.keys) == 5 and five.keys[-1] == 35  # the paper's spacing, stretched
    assert parse_arms("fd-uniform:5")[0].keys == (0, 10, 20, 30, 40)
    for bad, says in (("fd-paper:0", "out of range"), ("fd-uniform:51", "out of range"),
                      ("fd-paper:x", "unknown arm"), ("fd-keys", "unknown arm")):
        with pytest.raises(FdError, match=says) as caught:
            parse_arms(bad)
        assert "\n" not in str(caught.value)


def test_calibrated_arm_reads_the_manifest_and_the_table_is_paired(tiny_engine, tmp_path, monkeypatch, capsys):
    from fd.benchmarks import digits
    from fd.benchmarks.cli import main
    from fd.runtime.calibrated_steps import write_calibration
    monkeypatch.setenv(digits.CACHE_ENV, str(tmp_path / "cache"))  # the classifier trains here (~30 s)
    engine = tmp_path / "tiny"
    shutil.copytree(tiny_engine, engine)
    assert main(["--engine-dir", str(engine), "--quality", "--samples-per-digit", "1",
                 "--arms", "ddim9,fd-calibrated"]) == 2
    err = capsys.readouterr().err
    assert "no calibrated key steps for ddim at 50 steps: run fd-calibrate" in err and err.count("\n") == 1
    keys = [0, 4, 9, 14, 20, 26, 32, 39, 45]
    write_calibration(engine, {"scheduler": "ddim", "steps": 50, "key_steps": keys, "mean_drift": 0.1,
                               "worst_drift": 0.3, "paper_mean_drift": 0.2, "samples": 8})
    out, features = tmp_path / "q.json", tmp_path / "q.npz"
    assert main(["--engine-dir", str(engine), "--quality", "--samples-per-digit", "1", "--arms",
                 "ddim9,fd-calibrated,fd-paper:9", "--baseline", "ddim9", "--json", str(out),
                 "--features", str(features)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["settings"]["baseline"] == "ddim9"
    assert result["arms"]["fd-calibrated"]["policy"]["key_steps"] == keys
    assert result["arms"]["fd-paper:9"]["policy"]["key_steps"] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    base = result["arms"]["ddim9"]["versus_baseline"]
    assert base["fd_digits_difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert base["speedup"]["value"] == 1.0
    for name in ("fd-calibrated", "fd-paper:9"):
        v = result["arms"][name]["versus_baseline"]
        d = v["fd_digits_difference"]
        assert d["low"] <= d["high"] and d["value"] == pytest.approx(
            result["arms"][name]["fd_digits"]["value"] - result["arms"]["ddim9"]["fd_digits"]["value"])
        assert v["speedup"]["value"] > 0
    assert "Paired against ddim9" in printed and "| fd-calibrated |" in printed
    saved = np.load(features)
    assert saved["features/fd-calibrated"].shape[0] == 10 and saved["prompted"].tolist() == list(range(10))
    assert main(["--engine-dir", str(engine), "--quality", "--arms", "ddim9", "--baseline", "ddim50"]) == 2
    assert "--baseline ddim50 is not among the arms run" in capsys.readouterr().err
