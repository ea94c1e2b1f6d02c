"""fd-build: export a diffusers model's split UNet (and text encoder, VAE decoder) into an engine folder."""
from __future__ import annotations

import argparse
import sys

from fd.runtime.cli_common import run_cli
from fd.runtime.backends import BACKENDS

EXAMPLES = """examples:
  fd-build --model tiny                                   # toy model, ONNX Runtime, engines/tiny-fp32-onnxruntime
  fd-build --model sd15 --precision fp16 --backend tensorrt
  fd-build --model ./my-sd-folder --height 768 --width 512 --out engines/mine --force
  fd-build --model tiny --controlnet tiny-controlnet --img2img --out engines/tiny-control
  fd-build --model tiny-animatediff --frames 8              # text to video (docs/video.md)
  fd-build --model ./my-sd-folder --lora style.safetensors:0.8 --textual-inversion cat.safetensors:<my-cat>
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fd-build", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="alias (sd15, sd21, tiny), hub id in the local cache, a local diffusers pipeline folder, or a "
                        "single-file .safetensors checkpoint (with --config)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", choices=("fp32", "fp16", "tf32"),
                   help="default: fp32 for onnxruntime, fp16 for tensorrt and torch (tf32: TensorRT only)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    p.add_argument("--max-batch-size", type=int, default=1, help="most images per generation (default 1)")
    p.add_argument("--max-window", type=int, default=15,
                   help="most steps per batched decoder call (default 15: the paper's longest window)")
    p.add_argument("--out", help="engine folder (default engines/<model>-<precision>-<backend>)")
    p.add_argument("--force", action="store_true", help="replace an existing engine folder")
    p.add_argument("--dynamic-shape", metavar="MIN:MAX",
                   help="image side range in pixels that fd-run --height/--width may choose from (TensorRT and "
                        "ONNX Runtime; default: only --height x --width)")
    p.add_argument("--controlnet", action="append", default=[], metavar="ID_OR_FOLDER",
                   help="also build this ControlNet (tiny-controlnet, made from the model's UNet; sd15-random-controlnet, "
                        "a fixed SD1.5-shaped random one; a local diffusers ControlNet folder, or a hub id in the "
                        "local cache); repeat for several, whose residuals add up")
    p.add_argument("--img2img", action="store_true",
                   help="also build the VAE encoder, for fd-run --init-image (image to image)")
    p.add_argument("--split-block", type=int, metavar="S",
                   help="transformer families (DiT, PixArt): blocks 0..S-1 are the encoder, S.. the decoder "
                        "(default: the paper's 18 of 28, scaled to the model's depth)")
    p.add_argument("--frames", type=int, metavar="F",
                   help="video families (animatediff, t2v): frames per video, fixed per folder (default 16)")
    personal = p.add_argument_group("personalization (docs/personalize.md)")
    personal.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                          help="fuse this LoRA (diffusers/peft or kohya .safetensors) into the weights at SCALE "
                               "(default 1); repeat for several, added in order")
    personal.add_argument("--textual-inversion", action="append", default=[], metavar="FILE[:TOKEN]",
                          help="add this textual-inversion embedding (diffusers or A1111 file) as TOKEN (default: the "
                               "token the file names); prompts use it as diffusers' do")
    personal.add_argument("--custom-diffusion", action="append", default=[], metavar="FILE",
                          help="bake these Custom Diffusion attention weights (diffusers' save_attn_procs file) into "
                               "the UNet; add its modifier token with --textual-inversion")
    personal.add_argument("--refittable", action="store_true",
                          help="keep the weights LoRAs change swappable at run time (fd-run --lora; ONNX Runtime "
                               "folders)")
    personal.add_argument("--config", metavar="FOLDER",
                          help="with --model FILE.safetensors (a single-file checkpoint): a diffusers pipeline folder "
                               "of the same kind whose tokenizer and configs are used (its weights are not read)")
    personal.add_argument("--allow-pickle", action="store_true",
                          help="also read .pt/.bin/.ckpt files (Python pickles: only from sources you trust)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="torch backend: where each exported program is checked against its module (default cpu; "
                        "cuda for fp16 SD-sized models, whose fp16 kernels are slow on a CPU); the folder is the same")
    trt = p.add_argument_group("TensorRT")
    trt.add_argument("--builder-optimization-level", type=int, choices=range(6), metavar="0-5",
                     help="TensorRT builder optimization level (default: TensorRT's, 3)")
    trt.add_argument("--timing-cache", help="timing cache file (default: <out parent>/timing.cache, reused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        from fd.builder.adapt import Adaptations
        from fd.builder.build import BuildOptions, build
        opts = BuildOptions(
            model=args.model, backend=args.backend, precision=args.precision, height=args.height,
            width=args.width, max_batch_size=args.max_batch_size, max_window=args.max_window, out=args.out,
            force=args.force, backend_options={"dynamic_shape": args.dynamic_shape,
                                               "optimization_level": args.builder_optimization_level,
                                               "timing_cache": args.timing_cache},
            controlnets=tuple(args.controlnet), img2img=args.img2img, split_block=args.split_block,
            adaptations=Adaptations(tuple(args.lora), tuple(args.textual_inversion), tuple(args.custom_diffusion),
                                    args.allow_pickle),
            config=args.config, refittable=args.refittable, device=args.device,
            frames=args.frames)
        out = build(opts)
        print(f"engine folder: {out}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
