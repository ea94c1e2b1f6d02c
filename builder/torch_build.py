"""Modules → torch.export programs (.pt2): the engine folder of `fd-build --backend torch`.

For this backend build.py's export loop calls export_program and check_program in place of the ONNX
export and check (no ONNX graph is written): each of the four modules is exported with torch.export (one
dynamic batch axis, the spec's range), saved as <component>.pt2, and the saved program is reloaded and
checked against its module. Programs are exported on the CPU; the runtime moves them to the GPU when it
loads them.

The runtime refuses any program torch would load with pickle or exec (runtime/backends/torch.py,
check_archive), so programs are saved without example inputs or guard code, with an I/O file naming the
spec's inputs and outputs, and the check reloads each one through the runtime's own loader.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from fd.builder import export
from fd.builder.specs import names
from fd.runtime.backends.torch_archive import IO_FILE, load_program
from fd.runtime.errors import FdError


def finish(stage: Path, specs: dict, modules: dict, precision: str, opts, geometry: dict, log) -> dict:
    """manifest["backend_info"]; the programs were already written and checked by build.py's export loop."""
    return {"torch_version": torch.__version__, "export": "torch.export", "exported_on": "cpu",
            "dynamic_axes": "batch"}


def example_batch(batch: dict) -> int:
    """The batch to trace with: 2 or more, because torch.export specializes an example size of 0 or 1 into
    the program; a traced 2 still admits a run-time batch of 1 when the Dim's min is 1."""
    return min(batch["max"], max(2, batch["min"] + 1))


def export_program(module, spec: dict, rng, vocab: int, path: Path) -> None:
    batch = spec["batch"]
    feeds = export.random_inputs(spec, example_batch(batch), rng, vocab)
    args = tuple(torch.from_numpy(feeds[n]) for n in names(spec["inputs"]))
    # ShapesCollection keys shapes by tensor, so the decoder's *skips need no nested spec of their own.
    shapes = None  # Dim refuses min == max; such a component is static (e.g. the VAE at batch 1)
    if batch["min"] < batch["max"]:
        dim, shapes = torch.export.Dim("batch", min=batch["min"], max=batch["max"]), torch.export.ShapesCollection()
        for arg in args:
            shapes[arg] = {0: dim}
    program = drop_unused_weights(torch.export.export(module, args, dynamic_shapes=shapes, strict=False))
    # Example inputs are saved pickled (tens of MB of random tensors at SD sizes, too), and guards_code is
    # Python source that module() would exec; neither is needed to run the program, and the runtime
    # refuses both. (Without example inputs torch never builds the guard function anyway.)
    program.example_inputs = None
    program._guards_code = []
    io = {"inputs": names(spec["inputs"]), "outputs": names(spec["outputs"])}
    torch.export.save(program, path, extra_files={IO_FILE: json.dumps(io)})


def check_device(device: str, backend: str) -> None:
    """fd-build --device: only the torch backend checks its programs on a device, and only one that is here."""
    if backend != "torch":
        raise FdError(f"--device {device} is for --backend torch (the {backend} build checks its graphs its own way): "
                      "drop --device")
    if device == "cuda" and not torch.cuda.is_available():
        raise FdError("--device cuda, but this PyTorch sees no CUDA GPU: drop --device (the check then runs on the CPU)")


def check_program(path: Path, module, spec: dict, rng, vocab: int, precision: str, device: str = "cpu") -> dict:
    """Reload the saved program as fd-run will (so a folder fd-run refuses is never built) and compare it
    with the module at the smallest batch and the traced one, both on `device` (the program saved is the
    CPU one either way: the runtime moves it where it runs)."""
    loaded = load_program(path, device, spec)
    batches = sorted({spec["batch"]["min"], example_batch(spec["batch"])})
    result = {}
    module.to(device)
    try:
        for batch in batches:
            feeds = export.random_inputs(spec, batch, rng, vocab)
            args = [torch.from_numpy(feeds[n]).to(device) for n in names(spec["inputs"])]
            with torch.inference_mode():
                got = host_arrays(loaded(*args))
            check = export.compare(got, export.run_torch(module, spec, feeds, device), precision,
                                   f"{path.name} (torch.export)")
            result["max_rel_error"] = max(result.get("max_rel_error", 0.0), check["max_rel_error"])
            result["tolerance"] = check["tolerance"]
    finally:
        module.to("cpu")  # the next graphs (and the FLOP count) expect the modules where the build made them
        del loaded
    return {**result, "batches": batches, "device": device}


def host_arrays(out) -> list:
    return [o.float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def drop_unused_weights(program):
    """The program without the weights its graph never reads.

    torch.export lifts every parameter of the module, used or not: the encoder and decoder wrap the same
    UNet, so each would carry (and load onto the GPU) the whole UNet. ONNX drops unused initializers; this
    does the same by removing the unread parameter/buffer placeholders from the graph and its signature.
    """
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    graph = program.graph_module.graph
    placeholders = {node.name: node for node in graph.nodes if node.op == "placeholder"}
    kept, dropped = [], set()
    for spec in program.graph_signature.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and not node.users:
            graph.erase_node(node)
            dropped.add(spec.target)
        else:
            kept.append(spec)
    program.graph_module.recompile()
    signature = ExportGraphSignature(kept, program.graph_signature.output_specs)
    state = {name: value for name, value in program.state_dict.items() if name not in dropped}
    with warnings.catch_warnings():  # torch's own deepcopy of the call graph warns about its LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        return program._update(program.graph_module, signature, state_dict=state)  # as torch's own passes do
