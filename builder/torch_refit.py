"""fd-build --refittable --backend torch: which parameter of each saved torch.export program is which LoRA-able
weight, so the runtime (runtime/lora.py) can copy merged tensors into the loaded programs.

Programs keep their weights as named parameters (the graph module's names: `unet.down_blocks.0….to_q.weight`,
`module.text_encoder.encoder.layers.0….q_proj.weight`), so the match is by identity: a program parameter is a
component's weight when the graph module that was exported holds that very tensor object. Only the parameters
the saved program still holds count (torch_build.drop_unused_weights removes the ones its graph never reads),
as its weights config lists them.
"""
from __future__ import annotations

import json
from pathlib import Path

from fd.builder.refit import lora_weights
from fd.runtime.errors import FdError

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"  # torch.export's archive: every saved weight's entry


def torch_refit_record(stage: Path, specs: dict, comps, modules: dict | None) -> tuple[dict, dict]:
    """({graph: {"weights": [{"name", "component", "parameter"}]}}, {component: {parameter: shape}})."""
    if modules is None:
        raise FdError("internal: the torch refit record needs the exported graph modules")
    weights = lora_weights(comps)
    owner = {id(tensor): (component, parameter)
             for component, table in weights.items() for parameter, tensor in table.items()}
    graphs = {}
    for graph, spec in specs.items():
        saved = saved_weight_names(stage / spec["file"])
        found = [{"name": name, "component": owner[id(tensor)][0], "parameter": owner[id(tensor)][1]}
                 for name, tensor in modules[graph].named_parameters(remove_duplicate=False)
                 if id(tensor) in owner and name in saved]
        if found:
            graphs[graph] = {"weights": found}
    shapes = {component: {parameter: tuple(t.shape) for parameter, t in table.items()}
              for component, table in weights.items()}
    return graphs, shapes


def saved_weight_names(path: Path) -> set[str]:
    """The parameter names a saved program holds (its archive's weights config)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader
    return set(json.loads(PT2ArchiveReader(str(path)).read_string(WEIGHTS_CONFIG))["config"])
