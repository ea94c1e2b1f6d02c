"""fd-bench --lora FILE[:SCALE]: what swapping a run-time LoRA costs, measured on the loaded pipeline of the same
run whose arms then generate with it.

The LoRA set is applied once (the first apply also imports torch and diffusers and reads the files for the
first time: reported apart), then removed and applied again `rounds` times; each call's own time
(FasterDiffusionPipeline.set_loras: reading the files, merging, and re-creating (ONNX Runtime) / refitting
(TensorRT) / updating in place (torch) the graphs the LoRA touches). The arms run afterwards with the LoRA
applied, so s/image is the personalized model's.
"""
from __future__ import annotations

import statistics

from fd.runtime.errors import FdError


def check_lora_bench(loras, compare_diffusers: bool) -> None:
    """Refusals before the engines load: the files, and an arm that could not take the LoRA."""
    if not loras:
        return
    if compare_diffusers:
        raise FdError("--lora with --compare diffusers: diffusers' arm would run without the run-time LoRA, so its "
                      "images could not be compared with fd's; drop one of them")
    from fd.runtime.lora import check_lora_options
    check_lora_options([f"{path}:{scale}" for path, scale in loras])


def measure_swaps(pipe, loras, rounds: int) -> dict:
    """Apply `loras`, then remove and re-apply them `rounds` times; ends with them applied."""
    first = pipe.set_loras(loras)
    applies, removes = [], []
    for _ in range(rounds):
        removes.append(pipe.set_loras([])["seconds"])
        applies.append(pipe.set_loras(loras)["seconds"])
    return {"files": [{"file": str(path), "scale": scale} for path, scale in loras], "graphs": first["graphs"],
            "first_apply_seconds": first["seconds"], "rounds": rounds,
            "apply_seconds": summary(applies), "remove_seconds": summary(removes),
            "what": "FasterDiffusionPipeline.set_loras: files read and merged, touched graphs swapped; the first "
                    "apply also imports torch and diffusers"}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def lora_lines(result: dict) -> list[str]:
    """The report's line for the swap times (none without --lora)."""
    lora = result.get("lora")
    if not lora:
        return []
    apply, remove = lora["apply_seconds"], lora["remove_seconds"]
    names = ", ".join(f"{f['file'].rsplit('/', 1)[-1]}:{f['scale']:g}" for f in lora["files"])
    return [f"LoRA swap ({names}; {', '.join(lora['graphs']) or 'no graph'}): apply {apply['median']:.3f} s, "
            f"remove {remove['median']:.3f} s (medians of {lora['rounds']}; min-max {apply['min']:.3f}-"
            f"{apply['max']:.3f} / {remove['min']:.3f}-{remove['max']:.3f}); first apply "
            f"{lora['first_apply_seconds']:.3f} s (imports, first read); the arms ran with it applied"]
