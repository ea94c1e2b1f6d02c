"""Loading a torch.export program (.pt2) without running code from it.

An engine folder is data, so loading one must never run code from it; torch.export.load does not promise
that (see check_archive), so every program is checked before torch reads it and again once loaded.
"""
from __future__ import annotations

import json
import math
import operator
import re
from pathlib import Path


IO_FILE = "fd_io.json"  # extra file fd-build adds to each program: the spec's input and output names

# Every entry a program may hold (relative to the archive's root folder): what torch.export.save writes for
# one program "model" whose tensors are raw bytes, plus fd's I/O file. This leaves out each entry torch would
# unpickle or run: legacy weights/constants (data/*/model.pt), custom and opaque objects
# (data/constants/custom_obj_N, opaque_obj_N), AOTInductor shared libraries (data/aotinductor/), other models.
ARCHIVE_ENTRY = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                           r"|models/model\.json|data/sample_inputs/model\.pt|extra/" + re.escape(IO_FILE) +
                           r"|data/weights/(model_weights_config\.json|weight_\d+)"
                           r"|data/constants/(model_constants_config\.json|tensor_\d+)")
PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": "weight_",
                   "data/constants/model_constants_config.json": "tensor_"}
# Node targets are resolved by attribute lookup from `torch`, `_operator` or `math` and then called, so a
# name such as torch.ops.load_library or torch.os.system would run; fd's programs only call aten operators.
# aten's operators, never a dunder attribute (torch resolves a target by getattr, so `__class__` would walk
# out of the namespace), except the bitwise operators aten itself registers under dunder names (T5's masks).
ATEN_BITWISE = "__(?:i?and|i?or|i?xor|i?lshift|i?rshift)__"
ATEN_TARGET = re.compile(rf"torch\.ops\.aten\.(?:(?!__)\w+|{ATEN_BITWISE})\.(?!__)\w+")
# Arithmetic on symbolic sizes (a batch-dependent reshape): the names torch's serializer writes for its own
# table of size operators (torch._export.serde.serialize._SYM_OPS), each a pure function of numbers.
SYM_SIZE_TARGETS = frozenset({
    *(f"_operator.{name}" for name in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub",
                                       "floordiv", "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift")),
    "math.trunc", *(f"torch.sym_{name}" for name in ("not", "int", "float", "ite", "max", "min", "sqrt")),
})
# Symbolic sizes are stored as sympy srepr text, which torch parses with sympy.sympify, i.e. eval. Allow only
# the tokens of such text: numbers, quoted symbol names, these sympy names, and punctuation (no dots, no
# brackets, no other names), so that the eval can only build sympy expressions.
SYMPY_TOKEN = re.compile(r"\s+|\d+|'[a-z]+\d+'|[A-Za-z]\w*|[-+*/(),=]")
MAX_SIZE_EXPRESSION = 2000  # characters; fd's graphs' size expressions are a few dozen
SMALL_POWER = re.compile(r"Pow\((?:Symbol\('[a-z]+\d+'(?:, \w+=\w+)*\)|Integer\(-?\d+\)), Integer\(-?\d{1,2}\)\)")
SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "Max", "Min", "FloorDiv", "CleanDiv",
               "Mod", "PythonMod", "CeilToInt", "FloorToInt", "positive", "integer", "nonnegative",
               "True", "False"}
# Graph fields fd's programs never use: subgraphs (higher-order ops), operators passed by name, and
# custom objects (unpickled by TorchScript).
REFUSED_FIELDS = ("as_graph", "as_operator", "as_custom_obj", "custom_obj", "custom_obj_values")


class UnsafeProgram(ValueError):
    """A program file that fd will not hand to torch (the message says why)."""


def check_archive(path: Path) -> None:
    """Refuse a .pt2 file unless torch 2.13's loader would read it without pickle or eval/exec.

    What that loader (torch.export.pt2_archive._package.load_pt2) would otherwise run:
    - torch.load(weights_only=False) on each weight or tensor constant whose config says "use_pickle";
    - pickle.loads / TorchScript unpickling of opaque and custom objects among the constants;
    - torch.load with a fallback to weights_only=False on legacy weight/constant files and on the example
      inputs (data/sample_inputs), which must therefore be empty;
    - AOTInductor packages: a compiled shared library is loaded from the archive;
    - sympy.sympify (eval) on symbolic-size expressions, and call_function targets looked up by name;
    - guards_code: Python source that ExportedProgram.module() exec()s into an input check.
    The archive is read with torch's own reader (the one the loader uses), so both see the same entries.
    """
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(str(path))
    except Exception as exc:  # noqa: BLE001 - garbage, empty, truncated: torch's zip reader says which
        raise UnsafeProgram(f"not a torch.export archive ({_first_sentence(exc)})") from None
    entries = reader.get_file_names()
    if len(set(entries)) != len(entries):  # torch reads the first of two same-named entries, zipfile the last
        raise UnsafeProgram("the archive has duplicate entries")
    for entry in entries:
        if not ARCHIVE_ENTRY.fullmatch(entry):
            raise UnsafeProgram(f"the archive holds {entry}, which torch would unpickle or run")
    if reader.read_bytes("data/sample_inputs/model.pt"):
        raise UnsafeProgram("the archive holds pickled example inputs")
    for config_file, prefix in PAYLOAD_CONFIGS.items():
        for name, payload in json.loads(reader.read_string(config_file))["config"].items():
            if payload.get("use_pickle") is not False or not re.fullmatch(prefix + r"\d+", payload["path_name"]):
                raise UnsafeProgram(f"its entry for {name} would be unpickled")
    program = json.loads(reader.read_string("models/model.json"))
    if program.get("guards_code"):
        raise UnsafeProgram("it holds guard code, which torch would exec")
    _check_fields(program)


def _check_fields(value, key: str | None = None) -> None:
    """Walk the program's JSON for the fields check_archive refuses."""
    if isinstance(value, dict):
        for field, item in value.items():
            if field in REFUSED_FIELDS and item:
                raise UnsafeProgram(f"its graph uses {field}, which fd's programs never do")
            _check_fields(item, field)
    elif isinstance(value, list):
        for item in value:
            _check_fields(item, key)
    elif isinstance(value, str):
        if key == "target" and not (ATEN_TARGET.fullmatch(value) or value in SYM_SIZE_TARGETS):
            raise UnsafeProgram(f"its graph calls {value[:80]!r}, which is not an aten operator")
        if key == "expr_str" and not _plain_sympy(value):
            raise UnsafeProgram(f"its graph has a size expression that is not plain sympy: {value[:80]!r}")
        if "\r" in value:  # FX writes stack traces into generated source as comments; \r would end the line
            raise UnsafeProgram("its graph has a carriage return in a string")


def _plain_sympy(text: str) -> bool:
    """Only the tokens above, and nothing whose evaluation could take long: a short text, no `**` (sympify
    computes 10**10**8 before any check), integers of at most 12 digits and powers only of a symbol or an
    integer to a small whole exponent (a reshape's size needs no more)."""
    if len(text) > MAX_SIZE_EXPRESSION or "**" in text:
        return False
    tokens = SYMPY_TOKEN.findall(text)
    if "".join(tokens) != text or not all(t in SYMPY_NAMES for t in tokens if t[0].isalpha()):
        return False
    if any(len(t) > 12 for t in tokens if t.isdigit()):
        return False
    return text.count("Pow(") == len(SMALL_POWER.findall(text))


def _first_sentence(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]


def check_loaded(program, spec: dict, declared: str | None) -> None:
    """The loaded program calls only aten operators and has the spec's inputs and outputs.

    `declared` is the program's I/O file (the names fd-build gave it); the graph gives count, dtype and shape.
    """
    import torch

    modules = {"_operator": operator, "math": math, "torch": torch}
    size_ops = {getattr(modules[name.split(".")[0]], name.split(".")[1]) for name in SYM_SIZE_TARGETS}
    for node in program.graph.nodes:
        target = node.target
        if node.op not in ("placeholder", "call_function", "output") or node.op == "call_function" and not (
                target is operator.getitem or target in size_ops
                or isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"):
            raise UnsafeProgram(f"its graph has a {node.op} node {node.name}, which fd's programs never do")
    want = {"inputs": [t["name"] for t in spec["inputs"]], "outputs": [t["name"] for t in spec["outputs"]]}
    try:
        got = json.loads(declared) if declared else {}
    except ValueError:
        got = {}
    if {k: got.get(k) for k in want} != want:
        raise UnsafeProgram(f"its inputs and outputs are not the manifest's ({_io_text(want)}): "
                            f"it is another graph or was built by an older fd")
    nodes = {node.name: node for node in program.graph.nodes}
    signature = program.graph_signature
    for kind, names in (("inputs", signature.user_inputs), ("outputs", signature.user_outputs)):
        values = [nodes[name].meta.get("val") if name in nodes else None for name in names]
        if not _tensors_match(values, spec[kind]):
            raise UnsafeProgram(f"its {kind} differ from the manifest's in number, dtype or shape")


def _io_text(io: dict) -> str:
    return f"{', '.join(io['inputs'])} -> {', '.join(io['outputs'])}"


def _tensors_match(values: list, tensors: list[dict]) -> bool:
    import torch

    def matches(value, tensor) -> bool:
        return (isinstance(value, torch.Tensor) and str(value.dtype) == f"torch.{tensor['dtype']}"
                and value.dim() == len(tensor["shape"])
                and all(want == "batch" or isinstance(got, int) and got == want
                        for got, want in zip(value.shape, tensor["shape"])))

    return len(values) == len(tensors) and all(matches(v, t) for v, t in zip(values, tensors))


def load_program(path: Path, device, spec: dict | None = None):
    """A saved program as a callable module on `device`; raises UnsafeProgram for a refused file.

    `spec` is the manifest's component spec; without one the inputs and outputs are not checked (the
    archive always is). Programs are exported on the CPU, and tracing bakes that device into some nodes
    (e.g. the arange of the timestep sinusoid); torch's move_to_device_pass rewrites those as well as
    the weights.
    """
    import torch
    from torch.export.passes import move_to_device_pass
    from torch.export.pt2_archive._package import load_pt2

    check_archive(path)
    # load_pt2 is what torch.export.load calls first; torch.export.load then falls back to a legacy
    # format read with torch.load (pickle), which fd never writes, so call load_pt2 itself.
    contents = load_pt2(str(path))
    if list(contents.exported_programs) != ["model"] or contents.aoti_runners:
        raise UnsafeProgram("the archive does not hold exactly one program")
    program = contents.exported_programs["model"]
    if spec is not None:
        check_loaded(program, spec, contents.extra_files.get(IO_FILE))
    if torch.device(device).type != "cpu":
        program = move_to_device_pass(program, device)
    return program.module()
