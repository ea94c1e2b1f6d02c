"""fd-serve's request schema: the JSON body of POST /v1/images, with fd-run's options and defaults.

The schema (field names and JSON types) is checked here by pydantic; the body then becomes fd's Request
(fd.runtime.request), whose checks are fd-run's, so a bad value gets the line fd-run prints, before the request
reaches an engine replica. What depends on the engine folder (its family, size, limits, ControlNets, prompt
length) is checked by the replica with the pipeline's `prepare`. Images (ControlNet conditioning, the img2img
start) travel as base64-encoded PNG, JPEG or WEBP files (no other format) and are decoded here, once their
count and whether the folder takes them at all (`ImageInputs`, from its manifest) are checked. A request gives a
`prompt` (text folders) or a `class_label` (class-conditional folders: DiT), as fd-run takes --prompt or
--class-label.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from fd.serve.loras import MAX_LORAS, check_lora_name

MAX_BODY_BYTES = 32 * 1024 * 1024  # text fields and a few base64 images; anything bigger is refused unparsed
MAX_CONTROL_IMAGES = 8  # more than any folder's ControlNets: refused before any is decoded


class BadRequest(Exception):
    """A request the client must fix: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoraBody(BaseModel):
    """One run-time LoRA of a request: a file name from the server's LoRA folder (fd-serve --lora-dir) and its
    scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    scale: Union[StrictInt, StrictFloat] = 1.0


class ImageRequest(BaseModel):
    """POST /v1/images. Unknown fields and values of the wrong JSON type are refused (no silent coercion)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr | None = None  # text folders
    class_label: StrictInt | StrictStr | None = None  # class-conditional folders (DiT): a class id or an id2label name
    negative_prompt: StrictStr | None = None
    steps: StrictInt = 50
    scheduler: StrictStr = "ddim"
    guidance_scale: Union[StrictInt, StrictFloat] | None = None  # None: the folder's family's (SD 7.5, DiT 4.0, ...)
    seed: StrictInt = 0
    height: StrictInt | None = None
    width: StrictInt | None = None
    key_steps: list[StrictInt] | StrictStr | None = None  # [0, 1, 2] or fd-run's "0,1,2"
    uniform: StrictInt | None = None
    fd: StrictBool = True  # false: the baseline, every step a key step and no noise injection
    noise_injection: StrictBool = True
    guidance_interval: list[Union[StrictInt, StrictFloat]] | StrictStr | None = None  # [0.28, 5.42] or "paper"
    original_size: list[StrictInt] | StrictStr | None = None  # SDXL: [H, W] or fd-run's "H,W"
    crops_coords_top_left: list[StrictInt] | StrictStr | None = None  # SDXL: [Y, X] or "Y,X"
    control_images: list[StrictStr] | None = None  # base64 images, one per ControlNet of the folder, in build order
    controlnet_scale: list[Union[StrictInt, StrictFloat]] | StrictInt | StrictFloat | None = None  # one, or one each
    init_image: StrictStr | None = None  # base64 image: image to image (a folder built with --img2img)
    strength: Union[StrictInt, StrictFloat] | None = None  # image to image: the share of the schedule that runs
    loras: list[LoraBody] | None = None  # run-time LoRAs by name (fd-serve --lora-dir); none: the folder's weights

    def to_request(self):
        """The body as fd's Request (fd.runtime.request: the checks every front end shares; FdError for a bad value),
        its images decoded."""
        from fd.runtime.request import Policy, Request
        key_steps = self.key_steps
        if isinstance(key_steps, str):  # fd-run's "0,1,2" form, or "paper" / "calibrated"
            from fd.runtime.policy import parse_key_steps
            from fd.runtime.request import NAMED_KEY_STEPS
            named = key_steps.strip().lower()
            key_steps = named if named in NAMED_KEY_STEPS else parse_key_steps(key_steps)
        interval = self.guidance_interval
        if isinstance(interval, str):  # "paper" or fd-run's "LOW,HIGH"
            from fd.runtime.policy import parse_guidance_interval
            interval = parse_guidance_interval(interval)
        policy = Policy(key_steps=key_steps if key_steps is None or isinstance(key_steps, str) else tuple(key_steps),
                        uniform=self.uniform,
                        baseline=not self.fd, noise_injection=self.noise_injection,
                        guidance_interval=None if interval is None else tuple(interval))
        return Request(prompts=() if self.prompt is None else (self.prompt,),
                       class_labels=() if self.class_label is None else (self.class_label,),
                       negative_prompt=self.negative_prompt, steps=self.steps, scheduler=self.scheduler,
                       guidance_scale=self.guidance_scale, seed=self.seed, height=self.height, width=self.width,
                       original_size=self.original_size, crops_coords_top_left=self.crops_coords_top_left,
                       policy=policy,
                       control_images=[decode_image(data, f"control_images[{i}]")
                                       for i, data in enumerate(self.control_images or [])],
                       controlnet_scales=self.controlnet_scale,
                       init_image=None if self.init_image is None else decode_image(self.init_image, "init_image"),
                       strength=self.strength,
                       # every served request names its set (none: ()), so no request inherits another's LoRAs
                       loras=tuple((lora.name, lora.scale) for lora in self.loras or ()))


FIELDS = ", ".join(ImageRequest.model_fields)


@dataclass(frozen=True)
class ImageInputs:
    """What images an engine folder takes, from its manifest: the front refuses others before decoding them."""

    controlnets: int  # ControlNets, each taking one control image
    img2img: bool  # a VAE encoder: an init image

    @classmethod
    def of(cls, manifest: dict) -> "ImageInputs":
        from fd.runtime.control import controlnet_records
        return cls(len(controlnet_records(manifest)), "vae_encoder" in manifest["components"])

    def refuse(self, request: ImageRequest) -> None:
        """BadRequest (422) for images this folder cannot use (their count, or an init image without --img2img)."""
        given = len(request.control_images or [])
        if given and not self.controlnets:
            raise BadRequest(422, '"control_images" given, but this engine folder has no ControlNet: drop it')
        if given and given != self.controlnets:
            raise BadRequest(422, f'"control_images" holds {given} images, but this engine folder has '
                                  f"{self.controlnets} ControlNet(s): send one per ControlNet, in build order")
        if request.init_image is not None and not self.img2img:
            raise BadRequest(422, '"init_image" given, but this engine folder has no VAE encoder (built without '
                                  "fd-build --img2img): drop it")


def parse_image_request(body: bytes, inputs: ImageInputs | None = None):
    """The fd Request of a POST body, or BadRequest: 400 for a body that is not a JSON object, 422 for a schema
    problem (unknown field, wrong type, empty prompt, conflicting key-step options) or a value fd-run refuses
    without an engine folder (neither or both of prompt and class_label, steps, seed, sizes, images, ...).
    With the folder's `inputs`, images it cannot use are refused too; images are decoded last."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"request body is not valid JSON ({exc}): send a JSON object such as "
                              '{"prompt": "a photo of a cat"}') from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise BadRequest(400, "request body is nested too deeply: send a flat JSON object such as "
                              '{"prompt": "a photo of a cat"}') from None
    if not isinstance(data, dict):
        raise BadRequest(400, 'request body must be a JSON object such as {"prompt": "a photo of a cat"}')
    try:
        request = ImageRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(422, describe(exc.errors()[0])) from None
    if request.prompt is not None and not request.prompt.strip():
        raise BadRequest(422, '"prompt" is empty: give the text of the image to generate')
    chosen = [name for name, given in (("key_steps", request.key_steps is not None),
                                       ("uniform", request.uniform is not None), ("fd", not request.fd)) if given]
    if len(chosen) > 1:
        raise BadRequest(422, f'{" and ".join(chosen)} both choose the key steps: give at most one of "key_steps", '
                              '"uniform" or "fd": false')
    if len(request.control_images or []) > MAX_CONTROL_IMAGES:
        raise BadRequest(422, f'"control_images" holds {len(request.control_images)} images; at most '
                              f"{MAX_CONTROL_IMAGES} are accepted: send one per ControlNet of the folder")
    if len(request.loras or []) > MAX_LORAS:
        raise BadRequest(422, f'"loras" holds {len(request.loras)} LoRAs; at most {MAX_LORAS} are accepted')
    for i, lora in enumerate(request.loras or []):
        problem = check_lora_name(lora.name)
        if problem is not None:  # never a path: names are looked up in the server's --lora-dir only
            raise BadRequest(422, f'"loras[{i}].name" {json.dumps(lora.name)} {problem}')
    if inputs is not None:
        inputs.refuse(request)
    from fd.runtime.errors import FdError
    try:
        return request.to_request()  # fd-run's checks and lines for every value that needs no engine folder
    except FdError as exc:
        raise BadRequest(422, str(exc)) from None


def decode_image(data: str, field_name: str):
    """A base64-encoded PNG, JPEG or WEBP file (a data: URL's prefix allowed) as a PIL image, or one FdError line:
    its format (first bytes) and size (header) are checked before its pixels are decoded."""
    import base64
    import binascii
    import io

    from fd.runtime.errors import FdError
    from fd.runtime.images import IMAGE_FORMATS, read_image
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FdError(f'"{field_name}" is not base64: send the image file ({IMAGE_FORMATS}) base64-encoded') from None
    return read_image(io.BytesIO(raw), f'"{field_name}"', f"send a base64-encoded {IMAGE_FORMATS} file")


def describe(error: dict) -> str:
    """One line for pydantic's first error, naming the field as the JSON has it."""
    # the field, then list indices; pydantic's union member tags ("list[int]", "int") are left out
    loc = error["loc"]
    field = (str(loc[0]) + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))) if loc else "body"
    top = str(loc[0]) if loc else field
    if error["type"] == "extra_forbidden" and top == "loras":
        return f'unknown field "{field}.{loc[-1]}": a LoRA has "name" and "scale"'
    if error["type"] == "extra_forbidden":
        return f'unknown field "{field}": the fields are {FIELDS}'
    expected = {"prompt": "a string", "class_label": "a class id (a whole number) or a class name (a string)",
                "negative_prompt": "a string", "scheduler": "a string",
                "guidance_scale": "a number",
                "key_steps": 'a list of step indices such as [0, 1, 2, 5] or "0,1,2,5"',
                "fd": "true or false", "noise_injection": "true or false",
                "guidance_interval": 'two numbers such as [0.28, 5.42], or "paper"',
                "original_size": 'two whole numbers such as [1024, 1024] or "1024,1024"',
                "crops_coords_top_left": 'two whole numbers such as [0, 0] or "0,0"',
                "control_images": "a list of base64-encoded PNG, JPEG or WEBP images, one per ControlNet",
                "controlnet_scale": "a number, or a list of numbers (one per ControlNet)",
                "init_image": "a base64-encoded PNG, JPEG or WEBP image", "strength": "a number",
                "loras": 'a list such as [{"name": "style.safetensors", "scale": 0.8}]'}.get(top, "a whole number")
    return f'"{field}" is {json.dumps(error.get("input"))}: give {expected}'
