"""FLOPs per sample of fd's denoiser encoder and decoder for a generated model (a UNet's halves, or a DiT's or
PixArt-α's transformer split at its block, counted at its native size), and FasterDiffusion's FLOP floor.

    python -m fd.benchmarks.flop_split --model sdxl-random --size 128 --size 1024 --json split.json

The model is made on PyTorch's meta device: tensors have shapes but no storage, so SDXL's 3.5 B
parameters cost no memory and the count takes seconds. FlopCounterMode counts from shapes alone. On
the meta device scaled-dot-product attention runs as its math decomposition (two bmm per call), so
the attention scores (QK^T and AV) are counted; on a CPU tensor it runs a fused kernel the counter
has no formula for, and those FLOPs would be missed. The `attention_scores` column is that part.

The floor is the UNet speedup that skipping the encoder allows from arithmetic alone:
steps / (K + (steps - K) * decoder_share) for K key steps, the same as fd-bench's flop_floor.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys

from fd.runtime.cli_common import run_cli
from fd.runtime.errors import FdError

# Ops that only scaled-dot-product attention produces in a diffusers UNet on the meta device
# (linear layers become mm/addmm, convolutions aten.convolution).
ATTENTION_SCORE_OPS = ("bmm", "baddbmm")


def generated_models() -> list[str]:
    from fd.builder.families import FAMILIES
    return [name for family in FAMILIES.values() for name in family.generated]


def make_on_meta(model: str):
    """The generated model's components with shapes only (nothing allocated)."""
    import torch
    from fd.builder.families import family_generating
    make = family_generating(model)
    if make is None:
        raise FdError(f"--model {model} is not a generated model: use one of {', '.join(generated_models())}")
    with torch.device("meta"):
        return make()


def parse_size(text: str) -> tuple[int, int]:
    """'1024' (square) or 'HxW', in image pixels."""
    try:
        sides = tuple(int(side) for side in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise FdError(f"--size {text} is not a size: give pixels as 1024 or HEIGHTxWIDTH")
    return sides


def vae_scale(comps) -> int:
    from fd.builder.families import FAMILIES
    return FAMILIES[comps.family].vae_scale(comps)  # 1 for pixel-space families (DeepFloyd IF)


def native_size(comps) -> int:
    from fd.builder.families import FAMILIES
    return FAMILIES[comps.family].size_rule(comps)[2] * vae_scale(comps)


def count_split(comps, height: int, width: int) -> dict:
    """FLOPs of one sample (one CFG row) through fd's denoiser encoder and decoder (the family's halves: a UNet's,
    or a transformer's split at its block), and through the whole UNet (None for transformers)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from fd.builder.families import FAMILIES
    from fd.builder.split import added_condition_names

    family, unet = FAMILIES[comps.family], comps.unet
    channels, latent_multiple, native = family.size_rule(comps)
    scale = vae_scale(comps)
    multiple = scale * latent_multiple
    if height % multiple or width % multiple:
        raise FdError(f"--size {height}x{width}: this model needs sides that are multiples of {multiple} pixels")
    if unet is None and not family.supports_dynamic_shape and (height, width) != (native * scale,) * 2:
        # a transformer's halves are made for one token grid; fd-build makes them for the size it builds
        raise FdError(f"--size {height}x{width}: count a {comps.family} model at its native size, "
                      f"{native * scale}x{native * scale}")
    frames = comps.options.get("frames")  # video families (--frames): one sample is one video of F frames
    latent = (1, channels, *((frames,) if frames else ()), height // scale, width // scale)
    specs = family.conditions(comps, "float32")
    conditions = [torch.empty([1 if d == "batch" else d for d in spec["shape"]], device="meta",
                              dtype=getattr(torch, spec["dtype"]))  # float32, or int64 (class labels, token masks)
                  for spec in specs]
    decoder_conditions = [c for c, spec in zip(conditions, specs) if family.decoder_reads(spec["name"])]
    sample, timestep = torch.empty(latent, device="meta"), torch.empty(1, device="meta")
    encoder, decoder = family.denoiser_halves(comps, torch.float32)

    def counted(run):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = run()
        ops = counter.get_flop_counts()["Global"]
        attention = sum(n for op, n in ops.items() if str(op).rsplit(".", 1)[-1] in ATTENTION_SCORE_OPS)
        return out, {"flops": int(counter.get_total_flops()), "attention_scores": int(attention)}

    cache, encoder_flops = counted(lambda: encoder.eval()(sample, timestep, *conditions))
    _, decoder_flops = counted(lambda: decoder.eval()(timestep, *decoder_conditions, *cache))
    whole = None
    if unet is not None and family.whole_unet_from_conditions:
        added = dict(zip(added_condition_names(unet), conditions[1:]))  # SDXL's text_embeds, time_ids
        text = conditions[0]
        if comps.family == "animatediff":  # AnimateDiffPipeline hands its UNet the text repeated per frame
            text = text.repeat_interleave(frames, dim=0)
        extra = {"added_cond_kwargs": added} if added else {}  # UNet3DConditionModel takes no added_cond_kwargs
        _, whole = counted(lambda: unet(sample, timestep, text, **extra))
    return {"height": height, "width": width, "latent": list(latent[1:]), "denoiser_encoder": encoder_flops,
            "denoiser_decoder": decoder_flops, "unet": whole,
            "decoder_share": decoder_flops["flops"] / (encoder_flops["flops"] + decoder_flops["flops"])}


def floor(decoder_share: float, steps: int, key_steps: int) -> float:
    return steps / (key_steps + (steps - key_steps) * decoder_share)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fd.benchmarks.flop_split", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=f"a generated model ({', '.join(generated_models())})")
    p.add_argument("--size", action="append", metavar="PIXELS", help="image size, 1024 or HxW; repeat for "
                   "several (default: the model's native size)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--key-steps", help="comma-separated key steps (default: the paper's set for --steps)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--frames", type=int, help="video models: frames per video (default 16)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def job():
        import torch
        from fd.benchmarks import report
        from fd.runtime.policy import default_key_steps, parse_key_steps
        if not 1 <= args.steps <= 1000:
            raise FdError(f"--steps {args.steps} is out of range: use 1 to 1000")
        keys = parse_key_steps(args.key_steps) if args.key_steps else default_key_steps(args.steps)
        if max(keys) >= args.steps:
            raise FdError(f"--key-steps {args.key_steps}: every key step must be below --steps {args.steps}")
        if args.json:
            from fd.runtime.atomic import check_writable
            check_writable(args.json, "--json")
        sizes = [parse_size(s) for s in args.size] if args.size else None
        comps = make_on_meta(args.model)
        from fd.builder.families import FAMILIES
        FAMILIES[comps.family].set_frames(comps, args.frames)  # refuses --frames on an image model
        if sizes is None:
            sizes = [(native_size(comps),) * 2]
        params = {name: sum(p.numel() for p in module.parameters()) for name, module in comps.torch_modules().items()}
        rows = []
        for height, width in sizes:
            row = count_split(comps, height, width)
            row["floor"] = floor(row["decoder_share"], args.steps, len(keys))
            rows.append(row)
        result = {"command": shlex.join(["python", "-m", "fd.benchmarks.flop_split", *argv]),
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "model": args.model, "family": comps.family, "parameters": params,
                  "frames": comps.options.get("frames"),
                  "torch": torch.__version__, "steps": args.steps, "key_steps": list(keys), "sizes": rows}
        print(format_table(result), end="")
        if args.json:
            report.write_json(args.json, result)
            print(f"wrote {args.json}")

    return run_cli(job)


def format_table(r: dict) -> str:
    total = sum(r["parameters"].values())
    name = "UNet" if "unet" in r["parameters"] else "transformer"
    denoiser = r["parameters"][name.lower()]
    video = f", one video of {r['frames']} frames" if r.get("frames") else ""
    lines = [f"{r['model']} ({r['family']}, {total / 1e9:.3f} B parameters, {name} {denoiser / 1e9:.3f} B): "
             f"GFLOPs per sample (one CFG row{video}); floor for {r['steps']} steps, key steps {r['key_steps']}", "",
             f"{'image':>11} {'latent':>9} {'encoder':>10} {'decoder':>10} {'enc+dec':>10} {'full UNet':>10} "
             f"{'attn scores':>11} {'enc/dec %':>10} {'floor':>7}"]
    for row in r["sizes"]:
        e, d = row["denoiser_encoder"], row["denoiser_decoder"]
        attention = (e["attention_scores"] + d["attention_scores"]) / (e["flops"] + d["flops"])
        lines.append(f"{row['height']:>5}x{row['width']:<5} {row['latent'][-2]:>4}x{row['latent'][-1]:<4} "
                     f"{e['flops'] / 1e9:>10.1f} {d['flops'] / 1e9:>10.1f} {(e['flops'] + d['flops']) / 1e9:>10.1f} "
                     f"{_g(row['unet'])} {attention:>10.1%} "
                     f"{1 - row['decoder_share']:>5.1%}/{row['decoder_share']:.1%} {row['floor']:>6.3f}x")
    return "\n".join(lines) + "\n"


def _g(count) -> str:
    return f"{'-':>10}" if count is None else f"{count['flops'] / 1e9:>10.1f}"


if __name__ == "__main__":
    sys.exit(main())
