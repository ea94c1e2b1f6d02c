"""fd-serve on the transformer families: DiT (class-conditional: requests give a class_label) and PixArt-α
(T5 text prompts).

Most tests use ImageService directly (the engine side of fd-serve without Ray, fast); one test runs the real
server on tiny-dit over HTTP. Each served image is compared with the pipeline's lone run for the same
request and seed, with the family's defaults (guidance DiT 4.0 / PixArt 4.5, noise injection tau 300), and
a bad request is refused with the line fd-run prints for the same mistake.
"""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from fd.serve.api import BadRequest, ImageRequest, parse_image_request
from tests.test_serve import PIXEL_TOLERANCE, free_port, pixels

pytestmark = pytest.mark.usefixtures("ray_turn")  # one file with a Ray cluster at a time (conftest.py)

REPO = Path(__file__).resolve().parents[1]
STEPS = 10  # above fd's few-step threshold, so the default policy reuses the encoder
GOLDEN_RETRIEVER = 207  # tiny-dit's id2label, as ImageNet's


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    from fd.builder.build import BuildOptions, build
    root = tmp_path_factory.mktemp("serve-transformers")
    return {model: build(BuildOptions(model=model, max_batch_size=4, out=str(root / model)), log=lambda *_: None)
            for model in ("tiny-dit", "tiny-pixart")}


@pytest.fixture(scope="module")
def services(folders) -> dict:
    from fd.serve.service import ImageService
    return {model: ImageService(str(folder), pipeline=FasterDiffusionPipeline(folder, threads=1))
            for model, folder in folders.items()}


def served(service, requests: list[dict]) -> list:
    """The outcomes of requests sent together (grouped into batched generations as the server groups them)."""
    outcomes = service.run([service.prepare(ImageRequest.model_validate(r).to_request()) for r in requests])
    assert [o.status for o in outcomes] == [200] * len(requests), [o.error for o in outcomes]
    return outcomes


def lone(pipe, given, seed: int, **options) -> np.ndarray:
    """The image the pipeline gives for one prompt or class label on its own, with its defaults (fd-run's)."""
    return np.asarray(pipe([given], steps=STEPS, seed=seed, **options).images[0], dtype=np.int16)


def assert_close(png: bytes, want: np.ndarray, what) -> None:
    assert np.abs(pixels(png) - want).max() <= PIXEL_TOLERANCE, what


# --- DiT: class labels ----------------------------------------------------------------------------------

def test_a_dit_request_by_class_id_or_name_gets_the_lone_image_with_dits_defaults(services):
    service = services["tiny-dit"]
    pipe = service.pipe
    want = lone(pipe, GOLDEN_RETRIEVER, seed=3)
    for label in (GOLDEN_RETRIEVER, "golden retriever", "207"):
        (outcome,) = served(service, [{"class_label": label, "seed": 3, "steps": STEPS}])
        assert_close(outcome.png, want, label)
        assert outcome.guidance_scale == 4.0 and outcome.policy["noise_injection"]["tau"] == 300
    # SD's defaults (guidance 7.5) would give another image: the comparison above can tell them apart
    assert np.abs(lone(pipe, GOLDEN_RETRIEVER, seed=3, guidance_scale=7.5) - want).max() > 10 * PIXEL_TOLERANCE


def test_batched_dit_requests_keep_their_own_label_and_seed(services):
    service = services["tiny-dit"]
    requests = [{"class_label": 3, "seed": 1}, {"class_label": "golden retriever", "seed": 2},
                {"class_label": "tabby cat", "seed": 3}, {"class_label": 3, "seed": 4, "guidance_scale": 4.0}]
    requests = [{**r, "steps": STEPS} for r in requests]
    outcomes = served(service, requests)
    assert [o.batch_size for o in outcomes] == [4] * 4  # the explicit 4.0 is DiT's default: one generation
    for request, outcome in zip(requests, outcomes):
        assert_close(outcome.png, lone(service.pipe, request["class_label"], request["seed"]), request)
    # rows really differ: a row that took its neighbour's label or seed would not match its lone image above
    assert np.abs(pixels(outcomes[0].png) - pixels(outcomes[3].png)).max() > 10 * PIXEL_TOLERANCE


# --- PixArt-α: T5 prompts ----------------------------------------------------------------------------

def test_pixart_requests_get_the_lone_image_with_pixarts_default_guidance(services):
    service = services["tiny-pixart"]
    requests = [{"prompt": "A photo of an astronaut ", "seed": 5, "steps": STEPS},
                {"prompt": "a painting of a cat", "seed": 6, "steps": STEPS}]
    outcomes = served(service, requests)
    assert [(o.batch_size, o.guidance_scale, o.policy["noise_injection"]["tau"]) for o in outcomes] == \
        [(2, 4.5, 300)] * 2
    for request, outcome in zip(requests, outcomes):
        assert_close(outcome.png, lone(service.pipe, request["prompt"], request["seed"]), request)


# --- what the service tells and how it starts -----------------------------------------------------------

def test_info_says_which_input_each_folder_takes(services):
    dit, pixart = services["tiny-dit"].info(), services["tiny-pixart"].info()
    assert (dit["family"], dit["conditioning"], dit["num_classes"], dit["limits"]["max_prompt_tokens"]) == \
        ("dit", "class_label", 1000, None)
    assert dit["defaults"] == {"guidance_scale": 4.0, "noise_injection_tau": 300}
    assert (pixart["family"], pixart["conditioning"], pixart["limits"]["max_prompt_tokens"]) == \
        ("pixart", "prompt", 120)
    assert "num_classes" not in pixart and pixart["defaults"] == {"guidance_scale": 4.5, "noise_injection_tau": 300}


@pytest.mark.parametrize("model", ["tiny-dit", "tiny-pixart"])
def test_warm_up_runs_the_largest_guided_batch_with_the_familys_input(services, model):
    from collections import Counter
    service = services[model]
    before = Counter(service.pipe.runner.rows)
    calls_before = Counter(service.pipe.runner.calls)
    service.warm_up()  # DiT refuses any text: a warm-up with a prompt would raise here
    rows = Counter(service.pipe.runner.rows) - before
    calls = Counter(service.pipe.runner.calls) - calls_before
    assert rows["denoiser_encoder"] == 2 * service.max_batch_size * calls["denoiser_encoder"] > 0


# --- bad requests: one line, fd-run's -------------------------------------------------------------------

@pytest.mark.parametrize("model, request_options, cli", [
    ("tiny-dit", {"prompt": "a cat"}, ["--prompt", "a cat"]),
    ("tiny-dit", {"class_label": "zebra"}, ["--class-label", "zebra"]),
    ("tiny-dit", {"class_label": 1000}, ["--class-label", "1000"]),
    ("tiny-dit", {"class_label": 3, "negative_prompt": "blurry"}, ["--class-label", "3", "--negative-prompt", "blurry"]),
    ("tiny-pixart", {"class_label": 3}, ["--class-label", "3"]),
])
def test_a_wrong_input_for_the_family_gets_the_line_fd_run_prints(services, folders, tmp_path, capsys, model,
                                                                  request_options, cli):
    from fd.runtime.cli import main as fd_run
    with pytest.raises(FdError) as caught:
        services[model].prepare(ImageRequest.model_validate({"steps": 2, **request_options}).to_request())
    assert fd_run(["--engine-dir", str(folders[model]), "--steps", "2", *cli, "--out", str(tmp_path / "x.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {caught.value}"] and "\n" not in str(caught.value)


@pytest.mark.parametrize("body, cli", [
    (b'{"steps": 2}', []),
    (b'{"prompt": "a cat", "class_label": 3}', ["--prompt", "a cat", "--class-label", "3"]),
])
def test_neither_or_both_inputs_is_a_422_with_fd_runs_line(folders, tmp_path, capsys, body, cli):
    from fd.runtime.cli import main as fd_run
    with pytest.raises(BadRequest) as caught:
        parse_image_request(body)
    assert fd_run(["--engine-dir", str(folders["tiny-dit"]), *cli, "--out", str(tmp_path / "x.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert caught.value.status == 422 and errors == [f"error: {caught.value.message}"]


@pytest.mark.parametrize("body, fragment", [
    (b'{"class_label": 3.5}', '"class_label" is 3.5: give a class id (a whole number) or a class name'),
    (b'{"class_label": true}', '"class_label" is true'),
    (b'{"class_label": [3]}', '"class_label" is [3]'),
])
def test_a_class_label_of_the_wrong_type_is_a_422(body, fragment):
    with pytest.raises(BadRequest) as caught:
        parse_image_request(body)
    assert caught.value.status == 422 and fragment in caught.value.message


# --- one real server on tiny-dit ------------------------------------------------------------------------

def test_fd_serve_serves_a_dit_folder_over_http(folders, services):
    """Started and stopped here (Ray starts slowly: one server for every check). Requests by id and by name
    get their lone images with DiT's guidance in the headers; wrong inputs are 422 with one line."""
    pytest.importorskip("ray.serve", reason="fd-serve needs the serve extra: pip install -e '.[serve]'")
    from fd.benchmarks.load import Client
    port, log = free_port(), folders["tiny-dit"].parent / "fd-serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "fd.serve.cli", "--engine-dir", str(folders["tiny-dit"]), "--port", str(port),
               "--batch-wait-ms", "200"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "fd-serve: serving" not in log.read_text(errors="replace"):  # after the replica's warm-up
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        info = json.loads(Client(url).request("GET", "/v1/info").body)
        assert (info["family"], info["conditioning"], info["num_classes"]) == ("dit", "class_label", 1000)
        good = [{"class_label": GOLDEN_RETRIEVER, "seed": 1, "steps": STEPS},
                {"class_label": "tabby cat", "seed": 2, "steps": STEPS}]
        bad = [({"prompt": "a dog", "steps": STEPS}, "give --class-label ID_OR_NAME instead of --prompt"),
               ({"class_label": 3, "negative_prompt": "blurry"}, "takes no negative prompt"),
               ({"class_label": "zebra"}, "unknown class label 'zebra'")]
        with ThreadPoolExecutor(len(good) + len(bad)) as pool:
            replies = list(pool.map(lambda options: Client(url).generate(options), [*good, *(b for b, _ in bad)]))
        pipe = services["tiny-dit"].pipe
        for request, reply in zip(good, replies):
            assert reply.status == 200, reply.body[:300]
            assert (reply.headers["x-seed"], reply.headers["x-guidance-scale"]) == (str(request["seed"]), "4")
            assert_close(reply.body, lone(pipe, request["class_label"], request["seed"]), request)
        for (request, fragment), reply in zip(bad, replies[len(good):]):
            message = json.loads(reply.body)["error"]
            assert (reply.status, "\n" in message) == (422, False) and fragment in message, (request, message)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log.read_text(errors="replace")[-4000:]
