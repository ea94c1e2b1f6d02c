"""The FasterDiffusion policy: the paper's key steps, windows, and option parsing."""
import pytest

from fd.runtime.errors import FdError
from fd.runtime.policy import FasterDiffusionPolicy, NoiseInjection, default_key_steps, parse_key_steps
from fd.runtime.request import Policy


def test_default_key_steps_are_the_papers_at_50_and_20():
    assert default_key_steps(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert default_key_steps(20) == (0, 1, 2, 3, 5, 10, 15)
    assert default_key_steps(4) == (0, 1, 2, 3)
    assert default_key_steps(100) == (0, 2, 4, 6, 10, 20, 30, 50, 70)  # the 50-step set scaled by 2


def test_windows_cover_every_step_once_in_order():
    policy = FasterDiffusionPolicy(default_key_steps(50), max_window=15)
    windows = policy.windows(50)
    assert [w.key_step for w in windows] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert [sum(len(c) for c in w.chunks) for w in windows] == [1, 1, 1, 2, 5, 5, 10, 10, 15]
    assert [i for w in windows for c in w.chunks for i in c] == list(range(50))


def test_window_longer_than_max_is_split_into_chunks():
    windows = FasterDiffusionPolicy((0, 3), max_window=2).windows(8)
    assert [w.chunks for w in windows] == [((0, 1), (2,)), ((3, 4), (5, 6), (7,))]


def test_step_zero_is_always_a_key_step_and_keys_are_sorted():
    assert FasterDiffusionPolicy((10, 5), max_window=4).key_steps == (0, 5, 10)


def test_baseline_is_every_step_without_injection():
    policy = FasterDiffusionPolicy.baseline(6)
    assert policy.key_steps == tuple(range(6)) and policy.noise_injection is None
    assert all(len(w.chunks) == 1 and w.chunks[0] == (w.key_step,) for w in policy.windows(6))


def test_out_of_range_key_step_is_refused():
    with pytest.raises(FdError, match="key step 50 is out of range for 50 steps"):
        FasterDiffusionPolicy((0, 50), max_window=15).windows(50)


def test_noise_injection_threshold():
    injection = NoiseInjection()
    assert (injection.alpha, injection.tau) == (0.003, 500)
    assert injection.applies(499) and not injection.applies(500)


def resolve(policy: Policy, steps: int = 20, max_window: int = 15):
    return policy.resolve(steps, max_window, 500)


def test_policy_from_options():
    assert resolve(Policy()).key_steps == (0, 1, 2, 3, 5, 10, 15)
    assert resolve(Policy(uniform=4)).key_steps == (0, 4, 8, 12, 16)
    assert resolve(Policy(key_steps=parse_key_steps("0, 7"))).key_steps == (0, 7)
    assert resolve(Policy(noise_injection=False)).noise_injection is None
    assert resolve(Policy(baseline=True)) == FasterDiffusionPolicy.baseline(20)
    with pytest.raises(FdError, match="comma-separated"):
        parse_key_steps("a,b")


def test_a_policy_chooses_its_key_steps_one_way():
    for conflicting in ({"uniform": 2, "key_steps": (0, 2)}, {"baseline": True, "uniform": 2}):
        with pytest.raises(FdError, match="both choose the key steps"):
            Policy(**conflicting)
    with pytest.raises(FdError, match="--uniform 0 is not allowed"):
        Policy(uniform=0)
    with pytest.raises(FdError, match="are not step indices"):
        Policy(key_steps=(0, 1.5))
