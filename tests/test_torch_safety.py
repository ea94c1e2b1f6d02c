"""Loading a torch engine folder never runs code from it.

torch.export.load unpickles some archive entries, evals symbolic sizes with sympy and execs guard code
(runtime/backends/torch.py, check_archive, lists the routes). Each test below crafts a folder whose first
program (text_encoder.pt2) takes one route, and checks that fd refuses it with one line, through the
Python API and through fd-run, before anything in it runs. The payloads only create a file, and
test_payload_runs_under_plain_torch shows each one does run when torch loads the file unchecked, so a
missing file after fd's refusal means something.
"""
import contextlib
import json
import re
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fd.builder.build import BuildOptions, build
from fd.runtime.errors import FdError
from fd.runtime.pipeline import FasterDiffusionPipeline
from tests.conftest import run_fd

REBUILD = "rebuild the folder with fd-build --backend torch --force"


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny-torch"
    return build(BuildOptions(model="tiny", backend="torch", out=str(out)), log=lambda *_: None)


class Payload:
    """Unpickling this creates `path` (open(path, "w")): the stand-in for any code an archive could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# --- crafting archives ---------------------------------------------------------------------------------
def read_entries(pt2: Path) -> tuple[str, dict[str, bytes]]:
    """The archive's root folder and its entries, named relative to it."""
    with zipfile.ZipFile(pt2) as z:
        root = z.namelist()[0].split("/")[0]
        return root, {name.split("/", 1)[1]: z.read(name) for name in z.namelist()}


def write_entries(pt2: Path, root: str | None, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(pt2, "w") as z:
        for name, data in entries.items():
            z.writestr(f"{root}/{name}" if root else name, data)


def edit_json(entries: dict, name: str, edit) -> None:
    value = json.loads(entries[name])
    edit(value)
    entries[name] = json.dumps(value).encode()


def pickled_weight(entries, payload):
    def mark(config):
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        entries[f"data/weights/{first['path_name']}"] = payload
    edit_json(entries, "data/weights/model_weights_config.json", mark)


def pickled_constant(entries, payload):  # the text encoder's position_ids are a tensor constant
    def mark(config):
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        entries[f"data/constants/{first['path_name']}"] = payload
    edit_json(entries, "data/constants/model_constants_config.json", mark)


def opaque_object(entries, payload):  # pickle.loads'ed as an "opaque" constant
    entries["data/constants/opaque_obj_0"] = payload
    edit_json(entries, "data/constants/model_constants_config.json", lambda config: config["config"].update(
        evil={"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}))


def legacy_weights(entries, payload):  # torch.load, falling back to weights_only=False
    entries["data/weights/model.pt"] = payload


def legacy_constants(entries, payload):
    entries["data/constants/model.pt"] = payload


def example_inputs(entries, payload):
    entries["data/sample_inputs/model.pt"] = payload


def size_expression(entries, payload_path):  # sympy.sympify evals the symbolic batch size
    text = entries["models/model.json"].decode()
    symbols = set(re.findall(r"Symbol\('s\d+', positive=True, integer=True\)", text))  # the batch size
    assert symbols, "the program has no symbolic size to rewrite"
    for symbol in symbols:
        text = text.replace(symbol, f"open('{payload_path}', 'w')")
    entries["models/model.json"] = text.encode()


PAYLOAD_ROUTES = {"pickled weight": pickled_weight, "pickled constant": pickled_constant,
                  "opaque object": opaque_object, "legacy weights": legacy_weights,
                  "legacy constants": legacy_constants, "example inputs": example_inputs,
                  "size expression": size_expression, "legacy archive": None}


def craft(folder: Path, route: str, payload_path: Path) -> Path:
    """Rewrite folder/text_encoder.pt2 so that loading it the unchecked way takes `route`."""
    pt2 = folder / "text_encoder.pt2"
    root, entries = read_entries(pt2)
    payload = pickle.dumps(Payload(payload_path))
    if route == "legacy archive":  # torch.export.load's fallback: the zip format of torch 2.7 and before
        from torch._export.serde.schema import SCHEMA_VERSION
        write_entries(pt2, None, {
            "version": ".".join(map(str, SCHEMA_VERSION)).encode(),
            "serialized_exported_program.json": entries["models/model.json"],
            "serialized_state_dict.pt": b"", "serialized_constants.pt": payload,
            "serialized_example_inputs.pt": b""})
        return pt2
    if route == "size expression":
        size_expression(entries, payload_path)
    else:
        PAYLOAD_ROUTES[route](entries, payload)
    write_entries(pt2, root, entries)
    return pt2


@pytest.fixture
def copy_of(torch_folder, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(torch_folder, folder)
    return folder


def refusal(folder: Path) -> str:
    with pytest.raises(FdError) as info:
        FasterDiffusionPipeline(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot load text_encoder.pt2 (text_encoder)")
    assert message.endswith(REBUILD)
    return message


# --- (a) code in pickles and expressions ------------------------------------------------------------------
@pytest.mark.parametrize("route", PAYLOAD_ROUTES)
def test_payload_runs_under_plain_torch(copy_of, tmp_path, route):
    """Each crafted archive is a real exploit: torch.export.load on it creates the payload file."""
    payload_path = tmp_path / "ran"
    pt2 = craft(copy_of, route, payload_path)
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.load(pt2)
    assert payload_path.exists()


@pytest.mark.parametrize("route", PAYLOAD_ROUTES)
def test_payload_is_refused_by_the_pipeline(copy_of, tmp_path, route):
    payload_path = tmp_path / "ran"
    craft(copy_of, route, payload_path)
    refusal(copy_of)
    assert not payload_path.exists()


@pytest.mark.parametrize("route", PAYLOAD_ROUTES)
def test_payload_is_refused_by_fd_run(copy_of, tmp_path, route):
    payload_path = tmp_path / "ran"
    craft(copy_of, route, payload_path)
    done = run_fd("fd.runtime.cli", "--engine-dir", str(copy_of), "--prompt", "a cat", "--steps", "2",
                  "--out", str(tmp_path / "x.png"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot load text_encoder.pt2") and lines[0].endswith(REBUILD)
    assert not payload_path.exists() and not (tmp_path / "x.png").exists()


# --- (b) other things torch would resolve, run or load ----------------------------------------------------
def node_target(target):
    def edit(entries):
        edit_json(entries, "models/model.json",
                  lambda program: program["graph_module"]["graph"]["nodes"][0].update(target=target))
    return edit


def guard_code(entries):
    edit_json(entries, "models/model.json", lambda program: program.update(
        guards_code=["__import__('os').system('true')"]))


def subgraph(entries):
    edit_json(entries, "models/model.json", lambda program: program["graph_module"]["graph"]["nodes"][0][
        "inputs"].append({"name": "body", "arg": {"as_graph": {"name": "body", "graph": {}}}}))


def carriage_return(entries):
    edit_json(entries, "models/model.json", lambda program: program["graph_module"]["graph"]["nodes"][0][
        "metadata"].update(stack_trace='File "x", line 1, in f\ny\rimport os'))


def entry(name):
    return lambda entries: entries.update({name: b"\x7fELF"})


REFUSED = {
    "os.system target": (node_target("torch.os.system"), "which is not an aten operator"),
    "load_library target": (node_target("torch.ops.load_library"), "which is not an aten operator"),
    "dunder target": (node_target("torch.ops.aten.__class__.__init__"), "which is not an aten operator"),
    "guard code": (guard_code, "guard code"),
    "subgraph": (subgraph, "as_graph"),
    "carriage return": (carriage_return, "carriage return"),
    "AOTInductor library": (entry("data/aotinductor/model/model.so"), "data/aotinductor/model/model.so"),
    "TorchScript object": (entry("data/constants/custom_obj_0"), "data/constants/custom_obj_0"),
    "second model": (entry("models/other.json"), "models/other.json"),
}


@pytest.mark.parametrize("target,allowed", [
    ("torch.ops.aten.add.Tensor", True), ("torch.ops.aten.__and__.Tensor", True),  # T5's attention mask
    ("torch.ops.aten.__ior__.Scalar", True), ("torch.ops.aten.__class__.__init__", False),
    ("torch.ops.aten.__getattribute__.default", False), ("torch.ops.aten.add.__self__", False),
    ("torch.ops.aten.__and__.__call__", False), ("torch.ops.aten.__and____class__.x", False),
    ("_operator.mul", True), ("torch.sym_max", True), ("math.trunc", True),  # arithmetic on symbolic sizes
    ("_operator.attrgetter", False), ("_operator.mul.__call__", False), ("math.__loader__", False),
])
def test_operator_targets(target, allowed):
    from fd.runtime.backends.torch_archive import ATEN_TARGET, SYM_SIZE_TARGETS
    assert bool(ATEN_TARGET.fullmatch(target) or target in SYM_SIZE_TARGETS) == allowed


@pytest.mark.parametrize("case", REFUSED)
def test_unsafe_graph_is_refused(copy_of, case):
    edit, reason = REFUSED[case]
    pt2 = copy_of / "text_encoder.pt2"
    root, entries = read_entries(pt2)
    edit(entries)
    write_entries(pt2, root, entries)
    assert reason in refusal(copy_of)


def test_duplicate_entry_is_refused(copy_of):
    """torch's reader takes the first of two same-named entries and Python's zipfile the last, so a check
    through one reader could pass what the other loads."""
    pt2 = copy_of / "text_encoder.pt2"
    root, entries = read_entries(pt2)
    with warnings.catch_warnings(), zipfile.ZipFile(pt2, "a") as z:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate, which is the point
        z.writestr(f"{root}/models/model.json", entries["models/model.json"])
    assert "duplicate entries" in refusal(copy_of)


# --- (c) files that are not this component's program --------------------------------------------------
@pytest.mark.parametrize("content,reason", [
    (b"", "not a torch.export archive"),
    (b"not a zip archive", "not a torch.export archive"),
    ("vae_decoder.pt2", "its inputs and outputs are not the manifest's (input_ids -> text_embeddings)"),
])
def test_wrong_file_is_one_line(copy_of, content, reason):
    target = copy_of / "text_encoder.pt2"
    target.write_bytes(content if isinstance(content, bytes) else (copy_of / content).read_bytes())
    assert reason in refusal(copy_of)


def test_io_that_differs_from_the_manifest_is_refused(copy_of):
    """The names match (its I/O file says so) but the graph's input dtype is not the manifest's."""
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["components"]["text_encoder"]["inputs"][0]["dtype"] = "int32"
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    assert "its inputs differ from the manifest's in number, dtype or shape" in refusal(copy_of)


# --- (d) what fd-build writes still loads and runs ------------------------------------------------------
def test_built_folder_passes_the_checks_and_generates(torch_folder):
    for pt2 in torch_folder.glob("*.pt2"):
        root, entries = read_entries(pt2)
        assert not entries["data/sample_inputs/model.pt"]
        assert json.loads(entries["models/model.json"])["guards_code"] == []
    result = FasterDiffusionPipeline(torch_folder, device="cpu")(["a cat"], steps=2)
    assert np.isfinite(result.latents).all() and result.images[0].size == (128, 128)
