"""DiT: class-conditional, as diffusers' DiTPipeline conditions its transformer.

Each "prompt" is an ImageNet-style class label: a class id (an int, or its digits as text) or one of the names
in the model's id2label (manifest family_options, from the model folder's model_index.json). Guided rows are
[null class…, class…] with the null class = num_classes (DiTPipeline orders them [class…, null…]; the
guidance combine is the same). There are no text graphs and no negative prompt.
"""
from __future__ import annotations

import numpy as np

from fd.runtime.errors import FdError
from fd.runtime.families.base import Family, PromptRequest


class DiT(Family):
    name = "dit"
    text_graphs = ()
    conditions = ("class_labels",)
    class_conditional = True
    default_guidance_scale = 4.0  # DiTPipeline's default
    noise_injection_tau = 300  # the DiT setting of the paper's reference code

    def check_prompts(self, tokenizers, prompts, negative_prompt, options: dict) -> None:
        if negative_prompt is not None:
            raise FdError("a DiT model is class-conditional and takes no negative prompt: drop it (guidance steers "
                          "away from the null class)")
        for label in prompts:
            class_id(label, options)

    def encode_prompt(self, runner, tokenizers, request: PromptRequest, options: dict) -> dict:
        self.check_prompts(tokenizers, request.prompts, request.negative_prompt, options)
        classes = [class_id(label, options) for label in request.prompts]
        null = int(options["num_classes"])
        rows = [null] * len(classes) + classes if request.guided else classes
        return {"class_labels": runner.upload_input("denoiser_encoder", "class_labels", np.asarray(rows, np.int64))}


def label_ids(options: dict) -> dict[str, int]:
    """Every name of every class (id2label's values list synonyms split by commas, as DiTPipeline reads them),
    lower-cased, → its id."""
    return {name.strip().lower(): int(key) for key, names in options.get("id2label", {}).items()
            for name in names.split(",") if name.strip()}


def class_id(label, options: dict) -> int:
    """A class label (an int, its digits, or a name from id2label, any case) → its class id; one FdError line
    for anything else."""
    count = int(options["num_classes"])
    text = str(label).strip()
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) or text.lstrip("-").isdigit():
        value = int(text)
        if not 0 <= value < count:
            raise FdError(f"class label {value} is out of range: this model has classes 0 to {count - 1}")
        return value
    found = label_ids(options).get(text.lower())
    if found is None:
        raise FdError(f"unknown class label {text!r}: give a class id 0 to {count - 1} or a name from the model's "
                      "id2label (listed in the engine folder's manifest.json, family_options.id2label)")
    return found
