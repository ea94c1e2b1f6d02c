"""fd-run: generate images from an engine folder with FasterDiffusion (encoder only at key steps)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fd.runtime.atomic import check_writable, write_atomic
from fd.runtime.cli_common import run_cli
from fd.runtime.errors import FdError
from fd.runtime.policy import FEW_STEPS, parse_guidance_interval, parse_key_steps
from fd.runtime.request import NAMED_KEY_STEPS, Policy, Request
from fd.runtime.schedulers import CHOICES, DEFAULT, choices_help

EXAMPLES = """examples:
  fd-run --engine-dir engines/tiny-fp32-onnxruntime --prompt "a photo of an astronaut" --timings
  fd-run --engine-dir engines/sd15-fp16-tensorrt --prompt "a cat" --steps 20 --scheduler dpmpp-2m
  fd-run --engine-dir engines/sd15-fp16-tensorrt --prompt "a cat" --no-fd          # baseline: every step in full
  fd-run --engine-dir engines/sd15-fp16-tensorrt --prompt "a cat" --uniform 4      # key step every 4 steps
  fd-run --engine-dir engines/sd15-fp16-tensorrt --prompt "a cat" --key-steps paper # not the fd-calibrate ones
  fd-run --engine-dir engines/sd15-fp16-tensorrt --prompt "a cat" --guidance-interval paper  # CFG for sigma in (0.28, 5.42]
  fd-run --engine-dir engines/sd15-dynamic --prompt "a cat" --height 768 --width 512  # built with --dynamic-shape
  fd-run --engine-dir engines/tiny-control --prompt "a cat" --control-image edges.png   # fd-build --controlnet …
  fd-run --engine-dir engines/tiny-control --prompt "a cat" --init-image cat.png --strength 0.6  # fd-build --img2img
  fd-run --engine-dir engines/tiny-dit-fp32-onnxruntime --class-label 207 --class-label "tabby cat"  # DiT: classes
  fd-run --engine-dir engines/tiny-if-fp32-onnxruntime --prompt "a cat" --super-resolution engines/tiny-if-sr-fp32-onnxruntime
  fd-run --engine-dir engines/tiny-animatediff-fp32-onnxruntime --prompt "a cat" --out clip.gif   # video folders
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fd-run", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True, help="engine folder made by fd-build")
    p.add_argument("--prompt", action="append", default=[], help="prompt; repeat for several images")
    p.add_argument("--class-label", action="append", default=[], metavar="LABEL",
                   help="class-conditional models (DiT): a class id or a name from the model's id2label, one image "
                        "each; repeat for several images")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none; as diffusers, SD then encodes "
                                             "the empty prompt and SDXL conditions on zeros)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", choices=CHOICES, default=DEFAULT, metavar="NAME",
                   help=f"sampler, configured from the model's scheduler config: {choices_help()}")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, 1 or less: off (default: the "
                                                         "model family's, 7.5 for SD/SDXL and 4.0 for DiT)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the size the folder was built for; "
                                              "others need a folder built with --dynamic-shape)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the size the folder was built for)")
    p.add_argument("--original-size", metavar="H,W", help="SDXL size conditioning: the size the image is said to come "
                                                           "from (default: the image size)")
    p.add_argument("--crops-coords-top-left", metavar="Y,X", help="SDXL crop conditioning (default: 0,0)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    noise.add_argument("--latents", help="initial noise as float32 .npy of shape batch x channels x h x w")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key-steps", help="comma-separated 0-based step indices that run the denoiser encoder, "
                                          "'paper' (the paper's 0,1,2,3,5,10,15,25,35 at 50 steps) or 'calibrated' "
                                          "(the folder's fd-calibrate steps; default where the folder has them for "
                                          "this scheduler and step count, else paper)")
    keys.add_argument("--uniform", type=int, metavar="K", help="a key step every K steps")
    keys.add_argument("--no-fd", action="store_true", help="baseline: every step a key step, no noise injection")
    p.add_argument("--no-noise-injection", action="store_true", help="turn prior noise injection off")
    p.add_argument("--guidance-interval", metavar="LOW,HIGH",
                   help="classifier-free guidance only at steps whose sigma = sqrt((1-alpha_bar)/alpha_bar) is in "
                        "(LOW, HIGH]; the other steps skip the unconditional rows. 'paper': 0.28,5.42, the SD-XL "
                        "interval of Kynkaanniemi et al. 2024 (default: guidance at every step)")
    add_image_input_arguments(p)
    from fd.runtime.if_cascade import add_arguments as add_cascade_arguments
    add_cascade_arguments(p)
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply this LoRA at run time (folders built with fd-build --refittable; needs fd's build "
                        "extra); repeat for several")
    p.add_argument("--out", help="PNG path (default outputs/fd.png); numbered (-0, -1, …) for several prompts. Video "
                                 "folders: .gif, .mp4 (the video extra) or a folder of PNG frames (default outputs/fd.gif)")
    p.add_argument("--fps", type=int, default=8, help="video folders: frames per second of the clip (default 8)")
    p.add_argument("--save-latents", help="write the final denoised latents as .npy")
    p.add_argument("--timings", action="store_true", help="print time per stage, calls and rows computed per graph")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture CUDA graphs per engine and batch shape (TensorRT and torch folders on a GPU)")
    return p.parse_args(argv)


def load_latents(path: str) -> np.ndarray:
    try:
        latents = np.load(path)  # allow_pickle stays off: a .npy file is data, never code
    except (OSError, ValueError, EOFError) as exc:
        raise FdError(f"cannot read --latents {path} ({exc}): give a .npy file written by numpy.save") from None
    if not isinstance(latents, np.ndarray):  # np.load opens .npz archives too
        raise FdError(f"--latents {path} is an .npz archive, not a .npy array: save one array with numpy.save")
    if not (np.issubdtype(latents.dtype, np.floating) or np.issubdtype(latents.dtype, np.integer)):
        raise FdError(f"--latents {path} holds {latents.dtype} values: save real numbers (float32)")
    if not np.isfinite(latents).all():
        raise FdError(f"--latents {path} contains NaN or infinite values: save finite noise, e.g. from a seeded "
                      "standard normal")
    return latents.astype(np.float32)


def video_folder(engine_dir: str) -> bool:
    """Whether the folder makes videos (its manifest has frames); an unreadable folder is refused later, where it
    always was, in its own words."""
    from fd.runtime.pipeline import EngineFolder
    try:
        return EngineFolder(engine_dir).frames is not None
    except (FdError, OSError):
        return False


def check_engine_dir(path: str) -> None:
    """A plain file given as the engine folder gets its own message rather than "does not exist"."""
    if Path(path).is_file():
        raise FdError(f"--engine-dir {path} is a file, not a folder: give the engine folder fd-build wrote "
                      "(the one holding manifest.json)")


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise FdError(f"--out {out} must end in .png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_outputs(args, video: bool = False) -> list[Path]:
    """Every output path checked before the engines load, so no one waits for an image that cannot be saved.
    A video folder's clips: runtime/video.py."""
    if video:
        from fd.runtime import video as clips
        if not 1 <= args.fps <= 240:
            raise FdError(f"--fps {args.fps} is out of range: use 1 to 240 frames per second")
        paths = clips.output_paths(args.out or clips.DEFAULT_OUT, len(args.prompt))
    else:
        args.out = args.out or "outputs/fd.png"
        check_writable(args.out, "--out")
        paths = output_paths(args.out, len(args.prompt) or len(args.class_label))
        for path in paths:
            check_writable(path, "--out")
    if args.save_latents is not None:
        check_writable(args.save_latents, "--save-latents")
        if Path(args.save_latents).suffix.lower() != ".npy":
            raise FdError(f"--save-latents {args.save_latents} must end in .npy (numpy's format, which it is "
                          "written in)")
    return paths


def format_timings(result) -> str:
    width = max(len("stage"), *map(len, result.timings)) + 2
    rows = [f"{'stage':<{width}}{'seconds':>10}"]
    rows += [f"{stage:<{width}}{seconds:>10.3f}" for stage, seconds in result.timings.items()]
    calls = result.calls
    rows.append("calls: " + ", ".join(f"{graph.replace('_', ' ')} {count}" for graph, count in calls.items()))
    rows.append("rows: " + ", ".join(f"{graph.replace('_', ' ')} {count}" for graph, count in result.rows.items()))
    rows.append(f"key steps: {result.policy['key_steps']}")
    interval = result.policy.get("guidance_interval")
    if interval is not None:
        rows.append(f"guidance interval: sigma in ({interval[0]:g}, {interval[1]:g}]")
    return "\n".join(rows)


def add_image_input_arguments(parser, description: str | None = None) -> None:
    """The ControlNet and image-to-image flags (fd-run's and fd-bench's); image_input_options reads them."""
    images = parser.add_argument_group("image inputs", description)
    images.add_argument("--control-image", action="append", metavar="PATH",
                        help="conditioning image for the folder's ControlNet, resized to the image size (repeat: one "
                             "per ControlNet, in the order fd-build --controlnet got them)")
    images.add_argument("--controlnet-scale", action="append", type=float, metavar="S",
                        help="ControlNet conditioning scale (default 1.0): one for all ControlNets, or one each")
    images.add_argument("--init-image", metavar="PATH",
                        help="image to image: start from this image (a folder built with fd-build --img2img)")
    images.add_argument("--strength", type=float, metavar="S",
                        help="image to image: the share of the schedule that runs, 0 < S <= 1 (default 0.8; 1 "
                             "starts from almost pure noise)")


def policy_from_args(args) -> Policy:
    """--key-steps | --uniform | --no-fd, --no-noise-injection and --guidance-interval as the request's Policy (the
    flags fd-bench lacks count as not given)."""
    key_steps = getattr(args, "key_steps", None)
    if key_steps is not None:
        named = key_steps.strip().lower()
        key_steps = named if named in NAMED_KEY_STEPS else parse_key_steps(key_steps)
    return Policy(key_steps=key_steps,
                  uniform=getattr(args, "uniform", None), baseline=getattr(args, "no_fd", False),
                  noise_injection=not getattr(args, "no_noise_injection", False),
                  guidance_interval=None if args.guidance_interval is None else
                  parse_guidance_interval(args.guidance_interval))


def request_from_args(args, **fields) -> Request:
    """fd-run's (and fd-bench's) flags as one Request (the latents and images read once, as it is made), so a bad
    value or a missing file is refused before the engines load; `fields` fill what the command's flags do not give."""
    from fd.runtime.images import load_image
    given = {"prompts": getattr(args, "prompt", None) or (), "class_labels": getattr(args, "class_label", None) or (),
             "negative_prompt": getattr(args, "negative_prompt", None), "steps": args.steps,
             "scheduler": args.scheduler, "guidance_scale": args.guidance_scale, "seed": args.seed,
             "latents": None if getattr(args, "latents", None) is None else load_latents(args.latents),
             "height": args.height, "width": args.width,
             "original_size": getattr(args, "original_size", None),
             "crops_coords_top_left": getattr(args, "crops_coords_top_left", None),
             "policy": policy_from_args(args),
             "control_images": [load_image(path, "--control-image") for path in args.control_image or []],
             "controlnet_scales": args.controlnet_scale,
             "init_image": None if args.init_image is None else load_image(args.init_image, "--init-image"),
             "strength": args.strength, "loras": getattr(args, "lora", None) or ()}
    return Request(**{**given, **fields})


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        from fd.runtime.pipeline import EngineFolder, FasterDiffusionPipeline
        check_engine_dir(args.engine_dir)
        request = request_from_args(args)
        paths = check_outputs(args, video=video_folder(args.engine_dir))
        if args.lora:
            from fd.runtime.lora import check_lora_options
            check_lora_options(args.lora)  # a missing file is refused before the engines load
        EngineFolder(args.engine_dir).prepare(request)  # the request against the folder, before the engines load
        if args.super_resolution is not None:
            from fd.runtime.if_cascade import stage_two_folder
            stage_two = stage_two_folder(args.super_resolution, args.sr_steps, args.noise_level)
        pipe = FasterDiffusionPipeline(args.engine_dir, **({"cuda_graphs": True} if args.cuda_graphs else {}))
        if request.loras:  # applied here rather than inside the generation, to say what it cost
            swapped = pipe.set_loras(request.loras)  # runtime/lora.py
            print(f"LoRA applied in {swapped['seconds']:.2f} s ({', '.join(swapped['graphs']) or 'no graph'} swapped)")
        result = pipe(request)
        if args.super_resolution is not None:  # DeepFloyd IF stage II on stage I's image (runtime/if_cascade.py)
            from fd.runtime.if_cascade import run_stage_two
            result = run_stage_two(pipe, stage_two, request, result, args.sr_steps, args.noise_level)
        policy = request.policy
        if (policy.key_steps, policy.uniform, policy.baseline) == (None, None, False) and \
                request.steps_run <= FEW_STEPS and result.policy["key_steps"] == list(range(request.steps_run)):
            print(f"note: {request.steps_run} steps: every step is a key step (FasterDiffusion's windows pay off "
                  f"above {FEW_STEPS} steps); give --key-steps or --uniform to reuse the encoder anyway",
                  file=sys.stderr)
        if result.videos:
            from fd.runtime.video import write_clip
            for frames, path in zip(result.videos, paths):
                write_clip(frames, path, args.fps)
                print(f"wrote {path} ({len(frames)} frames)")
        for image, path in zip([] if result.videos else result.images, paths):
            write_atomic(path, lambda f: image.save(f, format="PNG"))
            print(f"wrote {path}")
        if args.save_latents is not None:
            write_atomic(Path(args.save_latents), lambda f: np.save(f, result.latents))
            print(f"wrote {args.save_latents}")
        if args.timings:
            print(format_timings(result))
        else:
            print(f"generated in {result.timings['total']:.2f} s")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
