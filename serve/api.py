"""fd-serve's request schema: the JSON body of POST /v1/images, with fd-run's options and defaults.

The schema (field names and JSON types) is checked here, without the engines; the values (steps, sizes,
key steps, prompt length, images, ...) are checked by the engine replica with the pipeline's own checks, so
a bad value gets the same one-line message fd-run prints. Images (ControlNet conditioning, the img2img start)
travel as base64-encoded PNG or JPEG files. A request gives a `prompt` (text folders) or a `class_label`
(class-conditional folders: DiT), as fd-run takes --prompt or --class-label; which one the folder takes is
checked by the engine replica, which knows the folder's family.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

MAX_BODY_BYTES = 32 * 1024 * 1024  # text fields and a few base64 images; anything bigger is refused unparsed


class BadRequest(Exception):
    """A request the client must fix: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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

    def pair_text(self, name: str) -> str | None:
        """original_size / crops_coords_top_left as fd-run's "A,B" text, parsed (and refused) by fd-run's code."""
        value = getattr(self, name)
        return ",".join(str(v) for v in value) if isinstance(value, list) else value

    def key_steps_text(self) -> str | None:
        """key_steps as fd-run's --key-steps text, so the policy is parsed (and refused) by the same code."""
        if isinstance(self.key_steps, list):
            return ",".join(str(k) for k in self.key_steps)
        return self.key_steps

    def guidance_interval_text(self) -> str | None:
        """guidance_interval as fd-run's --guidance-interval text (parsed and refused by the same code)."""
        if isinstance(self.guidance_interval, list):
            return ",".join(str(v) for v in self.guidance_interval)
        return self.guidance_interval


FIELDS = ", ".join(ImageRequest.model_fields)


def parse_image_request(body: bytes) -> ImageRequest:
    """The request of a POST body, or BadRequest: 400 for a body that is not a JSON object, 422 for a schema
    problem (unknown field, wrong type, neither or both of prompt and class_label, empty prompt, conflicting
    key-step options)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"request body is not valid JSON ({exc}): send a JSON object such as "
                              '{"prompt": "a photo of a cat"}') from None
    if not isinstance(data, dict):
        raise BadRequest(400, 'request body must be a JSON object such as {"prompt": "a photo of a cat"}')
    try:
        request = ImageRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(422, describe(exc.errors()[0])) from None
    from fd.runtime.cli import check_one_input_kind  # fd-run's lines for --prompt / --class-label
    from fd.runtime.errors import FdError
    try:
        check_one_input_kind(SimpleNamespace(prompt=[] if request.prompt is None else [request.prompt],
                                             class_label=[] if request.class_label is None else [request.class_label]))
    except FdError as exc:
        raise BadRequest(422, str(exc)) from None
    if request.prompt is not None and not request.prompt.strip():
        raise BadRequest(422, '"prompt" is empty: give the text of the image to generate')
    chosen = [name for name, given in (("key_steps", request.key_steps is not None),
                                       ("uniform", request.uniform is not None), ("fd", not request.fd)) if given]
    if len(chosen) > 1:
        raise BadRequest(422, f'{" and ".join(chosen)} both choose the key steps: give at most one of "key_steps", '
                              '"uniform" or "fd": false')
    return request


def describe(error: dict) -> str:
    """One line for pydantic's first error, naming the field as the JSON has it."""
    # the field, then list indices; pydantic's union member tags ("list[int]", "int") are left out
    loc = error["loc"]
    field = (str(loc[0]) + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))) if loc else "body"
    top = str(loc[0]) if loc else field
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
                "control_images": "a list of base64-encoded PNG or JPEG images, one per ControlNet",
                "controlnet_scale": "a number, or a list of numbers (one per ControlNet)",
                "init_image": "a base64-encoded PNG or JPEG image", "strength": "a number"}.get(top, "a whole number")
    return f'"{field}" is {json.dumps(error.get("input"))}: give {expected}'
