"""The one request type: each front end (fd-run's flags, fd-serve's JSON, fd-bench's flags, the Python API) makes the
same Request for the same options, and a bad value is the same one line from each."""
import numpy as np
import pytest

import fd
from fd.benchmarks.cli import parse_args as bench_args
from fd.runtime.cli import parse_args as run_args
from fd.runtime.cli import request_from_args
from fd.runtime.errors import FdError
from fd.runtime.policy import FasterDiffusionPolicy
from fd.runtime.request import FIELDS, Policy, Request
from fd.serve.api import BadRequest, parse_image_request


def test_the_top_level_api_names_the_request_types():
    assert fd.Request is Request and fd.Policy is Policy and fd.FdError is FdError
    assert fd.Pipeline.__name__ == "FasterDiffusionPipeline" and set(fd.__all__) == set(dir(fd))
    with pytest.raises(AttributeError):
        fd.runtime_internals  # noqa: B018 - nothing else hangs off the top level


def comparable(request: Request) -> dict:
    return {name: getattr(request, name) for name in FIELDS if name not in ("latents", "control_images", "init_image")}


def test_fd_run_fd_serve_and_fd_bench_make_the_same_request():
    run = request_from_args(run_args(["--engine-dir", "x", "--prompt", "a cat", "--steps", "20", "--scheduler",
                                      "dpmpp-2m", "--uniform", "4", "--guidance-interval", "paper", "--seed", "7",
                                      "--no-noise-injection", "--guidance-scale", "5"]))
    served = parse_image_request(b'{"prompt": "a cat", "steps": 20, "scheduler": "dpmpp-2m", "uniform": 4, '
                                 b'"guidance_interval": "paper", "seed": 7, "noise_injection": false, '
                                 b'"guidance_scale": 5}')
    assert comparable(run) == comparable(served)
    assert run.policy == Policy(uniform=4, noise_injection=False, guidance_interval=(0.28, 5.42))
    bench = request_from_args(bench_args(["--engine-dir", "x", "--steps", "20", "--scheduler", "dpmpp-2m",
                                          "--uniform", "4", "--guidance-interval", "paper", "--seed", "7",
                                          "--guidance-scale", "5"]), prompts=["a cat"])
    assert comparable(bench) == {**comparable(run), "policy": Policy(uniform=4, guidance_interval=(0.28, 5.42))}


@pytest.mark.parametrize("fields, flags, body, fragment", [
    ({"steps": 0}, ["--steps", "0"], b'{"prompt": "a", "steps": 0}', "--steps 0 is out of range: use 1 to 1000"),
    ({"seed": -1}, ["--seed", "-1"], b'{"prompt": "a", "seed": -1}', "--seed -1 is not allowed"),
    ({"guidance_scale": float("inf")}, ["--guidance-scale", "inf"], b'{"prompt": "a", "guidance_scale": 1e999}',
     "--guidance-scale inf is not allowed"),
    ({"strength": 0.5}, ["--strength", "0.5"], b'{"prompt": "a", "strength": 0.5}', "--strength is for image to image"),
    ({"policy": {"uniform": 0}}, ["--uniform", "0"], b'{"prompt": "a", "uniform": 0}', "--uniform 0 is not allowed"),
    ({"original_size": (0, 5)}, ["--original-size", "0,5"], b'{"prompt": "a", "original_size": [0, 5]}',
     "--original-size 0,5 is out of range"),
])
def test_a_bad_value_is_the_same_line_from_every_front_end(fields, flags, body, fragment):
    with pytest.raises(FdError) as api:
        policy = fields.pop("policy", None)  # a Policy refuses its own bad options when it is made
        Request(prompts=["a"], **fields, policy=None if policy is None else Policy(**policy))
    with pytest.raises(FdError) as run:
        request_from_args(run_args(["--engine-dir", "x", "--prompt", "a", *flags]))
    with pytest.raises(BadRequest) as served:
        parse_image_request(body)
    assert fragment in str(api.value) and str(api.value) == str(run.value) == served.value.message
    assert served.value.status == 422 and "\n" not in served.value.message


@pytest.mark.parametrize("fields, fragment", [
    ({}, "give at least one --prompt (or --class-label"),
    ({"prompts": "a cat"}, "give at least one prompt (a list of strings)"),
    ({"prompts": ["a"], "class_labels": [3]}, "not both"),
    ({"class_labels": [1.5]}, "give at least one class label"),
    ({"prompts": ["a", "b"], "negative_prompt": ["x"]}, "a list of 2 strings, one per prompt"),
    ({"prompts": ["a"], "latents": np.full((1, 4, 2, 2), np.nan)}, "NaN or infinite"),
    ({"prompts": ["a"], "controlnet_scales": [float("nan")]}, "--controlnet-scale nan"),
    ({"prompts": ["a"], "init_image": "x.png", "strength": 0.01, "steps": 10}, "runs no step"),
    ({"prompts": ["a"], "policy": "paper"}, "policy must be an fd.Policy"),
])
def test_request_refusals_are_one_line(fields, fragment):
    with pytest.raises(FdError) as caught:
        Request(**fields)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_policy_resolves_to_the_plan_and_a_plan_stands_as_it_is():
    assert Policy().resolve(50, 15, 300) == FasterDiffusionPolicy((0, 1, 2, 3, 5, 10, 15, 25, 35), 15,
                                                                  fd.runtime.policy.NoiseInjection(tau=300))
    assert Policy(max_window=4).resolve(20, 15, 500).max_window == 4
    plan = FasterDiffusionPolicy((0, 7), 3, None)
    assert plan.resolve(20, 15, 500) is plan
    assert Request(prompts=["a"], policy=None).policy == Policy()


def test_image_to_image_runs_the_last_steps():
    assert Request(prompts=["a"], steps=10).steps_run == 10
    assert Request(prompts=["a"], steps=10, init_image="x.png").steps_run == 8  # the default strength, 0.8
    assert Request(prompts=["a"], steps=10, init_image="x.png", strength=0.5).steps_run == 5


def test_named_key_steps_from_every_front_end():
    run = request_from_args(run_args(["--engine-dir", "x", "--prompt", "a", "--key-steps", "calibrated"]))
    assert run.policy == parse_image_request(b'{"prompt": "a", "key_steps": "calibrated"}').policy == \
        Policy(key_steps="calibrated")
    assert Policy(key_steps="paper").resolve(20, 15, 500, calibrated=(0, 9)).key_steps == (0, 1, 2, 3, 5, 10, 15)
    assert Policy().resolve(20, 15, 500, calibrated=(0, 9)).key_steps == (0, 9)  # calibrated is the default
    with pytest.raises(FdError, match="no calibrated key steps"):
        Policy(key_steps="calibrated").resolve(20, 15, 500)
    with pytest.raises(FdError, match="give step indices, 'paper' or 'calibrated'"):
        Policy(key_steps="best")
