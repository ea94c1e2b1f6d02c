"""fd-bench's outputs: the table on stdout, a Markdown block, the JSON record, the per-stage plot.

All of them read the one result dict that bench.run_benchmark returns (plus the context added by the
CLI), so the four can never disagree.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
import textwrap
from pathlib import Path

from fd.runtime.atomic import write_atomic
from fd.runtime.errors import FdError

ARM_LABELS = {"baseline": "baseline", "fasterdiffusion": "FasterDiffusion", "diffusers": "diffusers"}
STAGE_LABELS = {"text_encoder": "text encoder", "vae_encoder": "VAE encoder", "denoiser_encoder": "UNet encoder",
                "controlnet": "ControlNet", "denoiser_decoder": "UNet decoder", "scheduler": "scheduler",
                "other": "other (glue)", "vae_decoder": "VAE decoder"}
OPTIONAL_STAGES = ("vae_encoder", "controlnet")  # shown only when a run had them (image inputs)
PACKAGES = ("fd", "numpy", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "transformers", "tensorrt",
            "polygraphy", "cuda-python", "tokenizers")


# --- context: machine and libraries (best effort, never fails) ------------------------------------------

def machine_info() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_bytes": None, "platform": platform.platform(), "python": platform.python_version(), "gpus": None}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    with contextlib.suppress(ImportError):
        import psutil
        info["memory_bytes"] = psutil.virtual_memory().total
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=True)
        info["gpus"] = [dict(zip(("name", "driver", "memory"), (p.strip() for p in line.split(","))))
                        for line in done.stdout.strip().splitlines()]
    return info


def library_versions() -> dict:
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def source_revision() -> str | None:
    """The git commit of the fd checkout that ran (with "+dirty" for local edits), when there is one."""
    repo = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    return None


# --- text ----------------------------------------------------------------------------------------------

def _s(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value):
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _x(spread):
    return "-" if not spread else f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def headline(r: dict) -> str:
    e, st = r["engine"], r["settings"]
    size = f"{st.get('width', e['width'])}x{st.get('height', e['height'])}"
    return (f"{Path(e['dir']).name}: {e['backend']} {e['precision']}, {size}, "
            f"{st['scheduler']} {st['steps']} steps, batch {st['batch_size']}, guidance {st['guidance_scale']:g}, "
            f"{r['arms']['baseline']['runs_measured']}/{st['runs']} runs after {st['warmup']} warm-up, "
            f"FD key steps {st['key_steps']}")


def denoiser_name(r: dict) -> str:
    """What the folder's denoiser is called in the labels: "transformer" for a folder split at a transformer block
    (DiT, PixArt-α: the manifest's family_options.split_block), else "UNet". Lower-cased, it is also the name
    under which the diffusers arm counts its denoiser's calls."""
    return "transformer" if r["engine"].get("split_block") is not None else "UNet"


def output_unit(r: dict) -> str:
    """What one output is: a video on a video folder (the manifest's frames; figures are then per video)."""
    frames = r["engine"].get("frames")
    return f"video ({frames} frames)" if frames else "image"


def stage_labels(r: dict) -> dict[str, str]:
    word = denoiser_name(r)
    return {name: label.replace("UNet", word) for name, label in STAGE_LABELS.items()}


def stages_shown(r: dict) -> list[str]:
    """The stages of the table, Markdown and plot: every usual one, and the ControlNet and VAE encoder stages
    when some arm timed them."""
    timed = {name for arm in r["arms"].values() for name in (arm["stage_seconds_median"] or {})}
    return [name for name in STAGE_LABELS if name not in OPTIONAL_STAGES or name in timed]


def controlnet_graphs(r: dict) -> list[str]:
    return [c["graph"] for c in r["engine"].get("controlnets") or []]


def _rows(r: dict) -> list[tuple[str, list[str]]]:
    arms = r["arms"]
    stages, stage_label, word = stages_shown(r), stage_labels(r), denoiser_name(r)

    def per_arm(get):
        return [get(arm) for arm in arms.values()]

    def stage(name):
        return lambda a: _s((a["stage_seconds_median"] or {}).get(name))
    unit = output_unit(r)
    spi = [(f"s/{unit} median", "median"), (f"s/{unit} min", "min"), (f"s/{unit} max", "max")]
    rows = [(label, per_arm(lambda a, k=k: _s((a["seconds_per_image"] or {}).get(k)))) for label, k in spi]
    rows += [(f"{stage_label[n]} (s, median)", per_arm(stage(n))) for n in stages]
    rows.append(("total (s, median)", per_arm(stage("total"))))
    controlnets = controlnet_graphs(r)
    counted = ["denoiser_encoder", "denoiser_decoder", *controlnets, *([word.lower()] if "diffusers" in arms else [])]
    labels = {"denoiser_encoder": f"{word} encoder", "denoiser_decoder": f"{word} decoder",
              word.lower(): f"full {word}",
              **{graph: graph.replace("controlnet", "ControlNet").replace("_", " ") for graph in controlnets}}
    rows += [(f"{labels[c]} calls", per_arm(lambda a, c=c: str((a["calls"] or {}).get(c, "-")))) for c in counted]
    if any("block_linear_gflop" in (a["calls"] or {}) for a in arms.values()):  # peer arms: the work they skipped
        rows.append((f"{word} block linear GFLOP", per_arm(lambda a: _s((a["calls"] or {}).get("block_linear_gflop")))))
    rows.append(("peak RSS (MiB)", per_arm(lambda a: _mib(a["peak_rss_bytes"]))))
    rows.append(("device peak (MiB)", per_arm(lambda a: _mib(a["device_peak_bytes"]))))
    return rows


def summary_lines(r: dict) -> list[str]:
    sp, floor, lines = r["speedup"], r["flop_floor"], []
    word = denoiser_name(r)
    denoiser = f"{word} + ControlNet" if controlnet_graphs(r) else word
    lines.append(f"speedup FD over baseline, pair by pair: {_x(sp['fd_over_baseline'])} end to end, "
                 f"{_x(sp['fd_over_baseline_unet'])} {denoiser} only")
    if "fd_over_diffusers" in sp:
        lines.append(f"speedup over diffusers: FD {_x(sp['fd_over_diffusers'])}, "
                     f"baseline {_x(sp['baseline_over_diffusers'])}"
                     + "".join(f", {k.removesuffix('_over_diffusers')} {_x(v)}" for k, v in sp.items()
                               if k.endswith("_over_diffusers") and k not in ("fd_over_diffusers",
                                                                              "baseline_over_diffusers")))
    if floor:
        frac = [f"{floor[k]:.0%}" if floor[k] is not None else "-"
                for k in ("fraction_of_floor", "fraction_of_floor_unet")]
        counted = f"{word} + ControlNet" if any((floor.get("controlnet_flops") or {}).values()) else word
        lines.append(f"FLOP floor ({counted}, {floor['key_steps']} key steps of {floor['steps']}): "
                     f"{floor['unet_speedup']:.2f}x; measured = {frac[0]} of it end to end, {frac[1]} {denoiser} only")
        if floor.get("note"):
            lines.append(f"FLOP floor note: {floor['note']}")
    batch = r.get("decoder_batch") or {}
    if batch.get("frames"):
        lines.append(f"batched video decoder: at most {batch['rows']} rows x {batch['frames_per_row']} frames = "
                     f"{batch['frames']} frames per FD decoder call (its memory is in the FD arm's peaks)")
    for name, f in r["fidelity"].items():
        lines.append(f"fidelity {name.replace('_vs_', ' vs ')}: PSNR {f['psnr_db']:.2f} dB, SSIM {f['ssim']:.4f} "
                     f"({f['ssim_on']}), max |latent diff| {_s(f['max_abs_latent_diff'], 4)}")
    load = r.get("load")
    if load:
        first = ", ".join(f"{ARM_LABELS.get(n, n)} {_s(a.get('first_run_seconds'))} s" for n, a in r["arms"].items()
                          if a.get("first_run_seconds") is not None)
        diffusers = r["arms"].get("diffusers", {}).get("load_seconds")
        lines.append(f"load: engine folder {_s(load['engine_seconds'])} s (FasterDiffusionPipeline)"
                     + (f", diffusers {_s(diffusers)} s" if diffusers is not None else "")
                     + (f"; first generation: {first}" if first else ""))
    from fd.benchmarks.lora_swap import lora_lines
    lines += lora_lines(r)  # fd-bench --lora: swap times
    if not r["complete"]:
        lines.append("INTERRUPTED: figures cover the runs finished before Ctrl-C")
    return lines


def format_table(r: dict) -> str:
    rows = [("", [ARM_LABELS.get(n, n) for n in r["arms"]]), *_rows(r)]
    width = max(len(label) for label, _ in rows) + 2
    out = [headline(r), ""]
    columns = [max(17, len(name) + 2) for name in rows[0][1]]  # a peer arm's name can be long
    out += [label.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, columns)) for label, values in rows]
    return "\n".join([*out, "", *summary_lines(r)]) + "\n"


def format_markdown(r: dict) -> str:
    m = r["machine"]
    stages, controlnets, stage_label = stages_shown(r), controlnet_graphs(r), stage_labels(r)
    head = ["arm", f"s/{output_unit(r)} median (min-max)", *[stage_label[n] for n in stages],
            "enc/dec calls", *(["ControlNet calls"] if controlnets else []), "peak RSS MiB", "device peak MiB",
            "speedup vs baseline"]
    out = [f"#### {headline(r)}", "", f"Machine: {m['cpu']}, {m['usable_cores']} cores"
           + (f", {m['gpus'][0]['name']}" if m["gpus"] else "") + f"; `{r['command']}`", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vs_baseline = {"baseline": "1.00x", "fasterdiffusion": _x(r["speedup"]["fd_over_baseline"])}
    if "baseline_over_diffusers" in r["speedup"] and r["speedup"]["baseline_over_diffusers"]:
        vs_baseline["diffusers"] = f"{1 / r['speedup']['baseline_over_diffusers']['median']:.2f}x"
        for name in r["arms"]:  # a peer: its speedup over diffusers times diffusers' over the baseline
            got = r["speedup"].get(f"{name}_over_diffusers")
            if got:
                vs_baseline[name] = f"{got['median'] / r['speedup']['baseline_over_diffusers']['median']:.2f}x"
    for name, a in r["arms"].items():
        spi, medians, calls = a["seconds_per_image"] or {}, a["stage_seconds_median"] or {}, a["calls"] or {}
        whole = calls.get(denoiser_name(r).lower(), "-")  # diffusers: whole-denoiser calls, encoder and decoder
        cells = [ARM_LABELS.get(name, name), f"{_s(spi.get('median'))} ({_s(spi.get('min'))}-{_s(spi.get('max'))})",
                 *[_s(medians.get(n)) for n in stages],
                 f"{calls.get('denoiser_encoder', whole)}/{calls.get('denoiser_decoder', whole)}",
                 *(["/".join(str(calls.get(g, "-")) for g in controlnets)] if controlnets else []),
                 _mib(a["peak_rss_bytes"]), _mib(a["device_peak_bytes"]), vs_baseline.get(name, "-")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join([*out, "", *(f"- {line}" for line in summary_lines(r))]) + "\n"


# --- files ---------------------------------------------------------------------------------------------

def json_safe(value):
    """Strict JSON has no inf/nan: PSNR of identical images is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_text(path: str, text: str) -> None:
    write_atomic(Path(path), lambda f: f.write(text.encode()))


def write_json(path: str, r: dict) -> None:
    write_text(path, json.dumps(json_safe(r), indent=2, allow_nan=False) + "\n")


def require_matplotlib():
    """Checked before any run, so a missing plotting library never costs a finished benchmark."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise FdError("--plot needs matplotlib: pip install 'fd[bench]'") from None
    return plt


def write_plot(path: str, r: dict) -> None:
    """One stacked bar per arm: median seconds per stage (diffusers' time is not split into stages)."""
    if Path(path).suffix.lower() != ".png":
        raise FdError(f"--plot {path} must end in .png")
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [n for n, a in r["arms"].items() if a["stage_seconds_median"]]
    bottom = [0.0] * len(names)
    stage_label = stage_labels(r)
    for stage, label in [*((n, stage_label[n]) for n in stages_shown(r)), ("total", "total, not split (diffusers)")]:
        heights = []
        for n in names:
            stages = r["arms"][n]["stage_seconds_median"]
            split = "denoiser_encoder" in stages  # fd arms split their time; diffusers' is one block
            heights.append(stages.get(stage, 0.0) if split == (stage != "total") else 0.0)
        if any(heights):
            ax.bar([ARM_LABELS.get(n, n) for n in names], heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds per generation (median)")
    ax.set_title(textwrap.fill(headline(r), 110), fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(Path(path), lambda f: f.write(buffer.getvalue()))
