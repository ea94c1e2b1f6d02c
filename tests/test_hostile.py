"""What a hostile or careless client could still do to fd-serve and fd-run (issue 21), each refused in one line.

Most cases call the checks directly (no Ray, no engine); one real fd-serve, on a ControlNet + img2img folder with
an API key, covers what only the HTTP front does (warm-up on such a folder, the key, Content-Length, images the
folder cannot use refused at the ingress).
"""
import base64
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from fd.runtime.errors import FdError
from fd.serve.api import MAX_CONTROL_IMAGES, BadRequest, ImageInputs, decode_image, parse_image_request

pytestmark = pytest.mark.usefixtures("ray_turn")  # one file with a Ray cluster at a time (conftest.py)

REPO = Path(__file__).resolve().parents[1]
FORMAT_LINE = "is not a PNG, JPEG or WEBP image"


def image_bytes(fmt: str, size=(16, 16), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 7).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a cat", **fields}).encode()


def refused(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse_image_request(raw)
    assert "\n" not in caught.value.message
    return caught.value


def fd_run_error(capsys, *args) -> str:
    """fd-run's one error line (exit 2) for these arguments (in process: the checks run before any engine)."""
    from fd.runtime.cli import main as fd_run
    assert fd_run(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- item 3: PNG, JPEG and WEBP only, told by content -------------------------------------------------------

OTHER_FORMATS = {"TIFF": image_bytes("TIFF"), "GIF": image_bytes("GIF"), "BMP": image_bytes("BMP"),
                 "ICO": image_bytes("ICO"), "PPM": image_bytes("PPM"), "TGA": image_bytes("TGA"),
                 "PCX": image_bytes("PCX"), "SGI": image_bytes("SGI"),
                 "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"}


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
def test_other_image_formats_are_refused_by_content(fmt, tmp_path, capsys):
    data = OTHER_FORMATS[fmt]
    with pytest.raises(FdError, match=FORMAT_LINE):
        decode_image(b64(data), "init_image")
    path = tmp_path / "disguised.png"  # the name says PNG; the bytes decide
    path.write_bytes(data)
    err = fd_run_error(capsys, "--engine-dir", str(tmp_path / "none"), "--prompt", "a", "--init-image", str(path))
    assert FORMAT_LINE in err and "--init-image" in err


def test_png_jpeg_and_webp_are_read(tmp_path):
    from fd.runtime.images import load_image
    formats = ["PNG", "JPEG"] + (["WEBP"] if features.check("webp") else [])
    for fmt in formats:
        assert decode_image(b64(image_bytes(fmt)), "init_image").size == (16, 16)
        (tmp_path / f"x.{fmt}").write_bytes(image_bytes(fmt))
        assert load_image(tmp_path / f"x.{fmt}", "--init-image").size == (16, 16)
    with pytest.raises(FdError, match="not a regular file"):  # a device is never read as an image
        load_image("/dev/zero", "--control-image")


# --- item 2: count, format and declared size before any pixel is decoded; the folder's images at the door ---

def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and which holds no pixel data (decoding it would fail)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_a_large_declared_size_is_refused_from_the_header():
    with pytest.raises(FdError, match=r'"control_images\[0\]" is 8192x8192 pixels; at most 16777216'):
        decode_image(b64(png_header(8192, 8192)), "control_images[0]")
    with pytest.raises(FdError, match="is not an image PIL can read"):  # a small one is decoded: its data is missing
        decode_image(b64(png_header(64, 64)), "control_images[0]")


def test_too_many_control_images_are_refused_before_any_is_decoded():
    # not base64 at all: decoding any of them would say so, so the count line proves none was decoded
    error = refused(body(control_images=["!!"] * (MAX_CONTROL_IMAGES + 1)))
    assert error.status == 422 and f"at most {MAX_CONTROL_IMAGES} are accepted" in error.message


@pytest.mark.parametrize("inputs, fields, fragment", [
    (ImageInputs(0, False), {"control_images": ["!!"]}, "this engine folder has no ControlNet"),
    (ImageInputs(1, True), {"control_images": ["!!", "!!"]}, "holds 2 images, but this engine folder has 1"),
    (ImageInputs(1, False), {"init_image": "!!"}, "has no VAE encoder (built without fd-build --img2img)"),
])
def test_images_the_folder_cannot_use_are_refused_undecoded(inputs, fields, fragment):
    with pytest.raises(BadRequest) as caught:
        parse_image_request(body(**fields), inputs)
    assert caught.value.status == 422 and fragment in caught.value.message
    with pytest.raises(BadRequest, match="not base64"):  # without the folder's inputs they are decoded (and fail)
        parse_image_request(body(**fields))


# --- item 7: one line each ---------------------------------------------------------------------------------

def test_lone_surrogates_and_invalid_utf8_prompts_are_one_line(tmp_path, capsys):
    error = refused(b'{"prompt": "a \\ud800 cat"}')
    assert error.status == 422 and "not valid text" in error.message
    assert refused(b'{"prompt": "a cat", "negative_prompt": "\\udfff"}').status == 422
    # what Python makes of argv bytes that are not UTF-8 (os.fsdecode: surrogateescape)
    prompt = os.fsdecode(b"a \xff\xfe cat")
    err = fd_run_error(capsys, "--engine-dir", str(tmp_path / "none"), "--prompt", prompt)
    assert "not valid text" in err and "give the prompt as UTF-8" in err


@pytest.mark.parametrize("nesting", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_a_deeply_nested_body_is_400(nesting):
    error = refused(nesting)
    assert error.status == 400 and "nested too deeply" in error.message


def test_guidance_scale_is_bounded():
    from fd.runtime.request import MAX_GUIDANCE_SCALE, Request
    for scale in (1e308, 100.5):
        error = refused(body(guidance_scale=scale))
        assert error.status == 422 and f"give a finite number from 0 to {MAX_GUIDANCE_SCALE:g}" in error.message
    assert Request(prompts=["a"], guidance_scale=MAX_GUIDANCE_SCALE).guidance_scale == MAX_GUIDANCE_SCALE


def test_a_300_character_file_name_is_one_line(tmp_path, capsys):
    from fd.runtime.atomic import check_writable, write_atomic
    name = tmp_path / ("a" * 300 + ".png")
    for call in (lambda: check_writable(name, "--out"), lambda: write_atomic(name, lambda f: f.write(b"x"))):
        with pytest.raises(FdError, match=r"its name is too long \(304 bytes"):
            call()
    err = fd_run_error(capsys, "--engine-dir", str(tmp_path / "none"), "--prompt", "a", "--out", str(name))
    assert "name is too long" in err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_build_is_one_line(tmp_path, monkeypatch, capsys):
    """fd-build's staged folder turns ENOSPC (bare, or wrapped in a library's own error) into one line, and
    leaves nothing behind."""
    from fd.builder import build as build_module
    from fd.builder.cli import main as fd_build
    from fd.builder.staging import staged_folder

    def full_disk_build(options, **_):
        with staged_folder(Path(options.out), options.force) as stage:
            try:
                (stage / "graph.onnx").write_bytes(b"x")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage / "graph.onnx"))
            except OSError as exc:
                raise RuntimeError("onnx: failed to save the model") from exc

    monkeypatch.setattr(build_module, "build", full_disk_build)
    out = tmp_path / "engines" / "tiny"
    assert fd_build(["--model", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full (No space left on device writing ") and err.count("\n") == 1, err
    assert f"{out} is unchanged" in err
    assert list(tmp_path.iterdir()) == []  # no stage, not even the engines/ folder it made


def test_a_deeply_nested_manifest_is_one_line(tmp_path):
    from fd.runtime.manifest import load_manifest
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FdError, match="nested too deeply to be an fd manifest: rebuild"):
        load_manifest(tmp_path)


# --- item 6: fd-run writes regular files only --------------------------------------------------------------

def test_outputs_are_never_links_devices_or_fifos(tmp_path, capsys):
    from fd.runtime.atomic import check_writable, write_atomic
    target = tmp_path / "precious.png"
    target.write_bytes(b"keep")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    none = str(tmp_path / "none")
    assert "is a symbolic link" in fd_run_error(capsys, "--engine-dir", none, "--prompt", "a", "--out", str(link))
    assert "device, FIFO or socket" in fd_run_error(capsys, "--engine-dir", none, "--prompt", "a",
                                                    "--out", str(tmp_path / "o.png"), "--save-latents", str(fifo))
    assert "device, FIFO or socket" in fd_run_error(capsys, "--engine-dir", none, "--prompt", "a",
                                                    "--out", str(tmp_path / "o.png"), "--save-latents", "/dev/null")
    assert "must end in .npy" in fd_run_error(capsys, "--engine-dir", none, "--prompt", "a",
                                              "--out", str(tmp_path / "o.png"), "--save-latents", str(tmp_path / "l"))
    with pytest.raises(FdError, match="device, FIFO or socket"):
        check_writable("/dev/full", "--out")
    for path in (link, fifo, Path("/dev/null")):  # the write itself checks too (a link made after the check)
        with pytest.raises(FdError):
            write_atomic(path, lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"keep" and fifo.is_fifo()
    assert Path("/dev/null").is_char_device()
    write_atomic(target, lambda f: f.write(b"new"))  # a regular file is replaced as before
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.npy", "link.png", "precious.png"]


# --- item 8: every number the manifest and archives carry is bounded ---------------------------------------

@pytest.fixture(scope="module")
def control_folder(tiny_control_engine) -> Path:
    """tiny with tiny-controlnet and the VAE encoder (--img2img), built once per session (conftest.py)."""
    return tiny_control_engine


def tampered(key_path: str, value):
    def change(manifest):
        node, keys = manifest, key_path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[keys[-1]] = value
    return change


@pytest.mark.parametrize("key_path, value, fragment", [
    ("height", 10**9, "height is 1000000000, expected a positive integer from 1 to 16 384"),
    ("scheduler_config.num_train_timesteps", 10**12, "scheduler_config.num_train_timesteps is 1000000000000"),
    ("latent_channels", 10**6, "latent_channels is 1000000, expected a positive integer from 1 to 1 024"),
    ("scheduler_config.beta_end", float("nan"), "scheduler_config.beta_end is NaN, expected a number from 0 to 1"),
    ("vae_scaling_factor", 1e308, "vae_scaling_factor is 1e+308, expected a number from 1e-06 to 1000"),
    ("components.vae_decoder.file", "vae\x00.onnx", "components.vae_decoder.file is \"vae\\u0000.onnx\", expected a "
                                                    "string without NUL"),
    ("components.denoiser_decoder.inputs.0.shape", ["batch", 10**12], "expected a positive integer (at most 2^20)"),
    ("tokenizers.0.pad_token_id", 10**6, "pad_token_id 1000000 is not in the tokenizer"),
])
def test_out_of_bounds_manifest_numbers_are_one_line(control_folder, tmp_path, key_path, value, fragment):
    from fd.runtime.pipeline import EngineFolder
    from tests.test_ort_stored_graphs import linked_copy
    folder = linked_copy(control_folder, tmp_path / "folder", tampered(key_path, value))
    with pytest.raises(FdError) as caught:
        EngineFolder(folder)
    assert fragment in str(caught.value) and "rebuild" in str(caught.value) and "\n" not in str(caught.value)


SYMBOL = "Symbol('s0', positive=True, integer=True)"


@pytest.mark.parametrize("expression, plain", [
    (SYMBOL, True),
    (f"Mul(Integer(2), {SYMBOL})", True),
    (f"Add(Mul(Integer(77), {SYMBOL}), Integer(-1))", True),
    (f"Pow({SYMBOL}, Integer(-1))", True),
    (f"{SYMBOL}+10**10**8", False),  # sympify computes the power first: it hung fd-run
    (f"Pow(Integer(10), Pow(Integer(10), Integer(8)))", False),
    (f"Pow(Integer(10), Integer(100000000))", False),
    (f"Add({SYMBOL}, Integer({'9' * 40}))", False),
    ("Add(" + ", ".join([SYMBOL] * 100) + ")", False),  # longer than any of fd's graphs need
])
def test_size_expressions_must_be_small_and_plain(expression, plain):
    from fd.runtime.backends.torch_archive import _plain_sympy
    assert _plain_sympy(expression) is plain


# --- items 1, 4, 5, 9 and the HTTP front: one real fd-serve on the ControlNet + img2img folder ---------------

def test_warm_up_runs_the_control_and_img2img_graphs(control_folder):
    from fd.serve.service import ImageService
    result = ImageService(str(control_folder)).warm_up()  # refused "give --control-image PATH" before
    assert result.calls.get("controlnet", 0) >= 1 and result.calls.get("vae_encoder") == 1, result.calls


def test_the_front_refuses_what_it_should_before_the_engine(control_folder, tmp_path):
    pytest.importorskip("ray.serve", reason="fd-serve needs the serve extra: pip install -e '.[serve]'")
    from tests.test_serve import Server, free_port
    port, log = free_port(), tmp_path / "fd-serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), FD_SERVE_API_KEY="s3cret")
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "fd.serve.cli", "--engine-dir", str(control_folder),
                                    "--port", str(port), "--replicas", "2", "--num-cpus", "0.5"], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 240
        while "fd-serve: serving" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, f"fd-serve did not start:\n{server.tail()}"
            time.sleep(0.5)
        client = server.client(timeout=60)
        key = {"authorization": "Bearer s3cret", "content-type": "application/json"}
        assert client.request("GET", "/healthz").status == 200  # open without the key
        for path, method in (("/v1/info", "GET"), ("/v1/images", "POST")):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                reply = client.request(method, path, body() if method == "POST" else None, headers)
                assert reply.status == 401 and "API key" in json.loads(reply.body)["error"]
        assert json.loads(client.request("GET", "/v1/info", None, key).body)["image_inputs"]["img2img"] is True
        edges = b64(image_bytes("PNG", (128, 128)))
        cases = [
            (body(control_images=[edges, edges]), 422, "holds 2 images, but this engine folder has 1"),
            (body(control_images=[b64(OTHER_FORMATS["TIFF"])]), 422, FORMAT_LINE),
            (body(control_images=[edges], guidance_scale=1e308), 422, "give a finite number from 0 to 100"),
            (b'{"prompt": "\\ud800", "control_images": ["' + edges.encode() + b'"]}', 422, "not valid text"),
            (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        ]
        for raw, status, fragment in cases:
            reply = client.request("POST", "/v1/images", raw, key)
            assert reply.status == status and fragment in json.loads(reply.body)["error"], (reply.status, reply.body)
        good = client.request("POST", "/v1/images", body(control_images=[edges], steps=2), key)
        assert good.status == 200 and good.body.startswith(b"\x89PNG"), good.body[:200]
        # a body declared larger than the limit is refused on its Content-Length, unread
        import http.client
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.putrequest("POST", "/v1/images")
        for name, value in {**key, "content-length": str(200 * 1024 * 1024)}.items():
            connection.putheader(name, value)
        connection.endheaders(b"{" + b" " * 1024)
        reply = connection.getresponse()
        assert reply.status == 413 and "at most" in json.loads(reply.read())["error"]
        connection.close()
        # two replicas; one killed mid-load: every request is answered (200, or 503 for the dead one's), the other
        # replica serves on, and Ray starts a new one
        import psutil
        from concurrent.futures import ThreadPoolExecutor
        engines = [p for p in psutil.Process(process.pid).children(recursive=True)
                   if "ServeReplica:fd:FdEngine" in " ".join(p.cmdline())]
        assert len(engines) == 2, server.tail()

        def send(seed):
            return server.client(timeout=120).request(
                "POST", "/v1/images", body(control_images=[edges], steps=20, seed=seed), key)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, seed) for seed in range(8)]
            time.sleep(1.0)
            engines[0].kill()
            statuses = sorted(future.result(timeout=150).status for future in futures)
        print(f"\nreplies around the replica kill: {statuses}")
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        deadline = time.monotonic() + 120
        while client.request("GET", "/healthz").status != 200:
            assert time.monotonic() < deadline, f"not healthy again:\n{server.tail()}"
            time.sleep(1)
        assert send(99).status == 200
        # SIGTERM (to fd-serve alone, as a service manager sends it) while a request runs: it is answered
        replies = []
        slow = threading.Thread(target=lambda: replies.append(server.client(timeout=120).request(
            "POST", "/v1/images", body(control_images=[edges], steps=30, seed=7), key)))
        slow.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        slow.join(120)
        assert [r.status for r in replies] == [200], server.tail()
        assert process.wait(90) == 0, server.tail()
        assert "still running" not in server.tail() and "could not drain" not in server.tail(), server.tail()
        after_stop = server.tail().split("fd-serve: stopping", 1)[1]
        assert "(raylet)" not in after_stop, server.tail()  # no stray Ray line after fd's own
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
