"""TensorRT refit: new weights into a built engine, in place (engines built with fd-build --refittable, which
sets TensorRT's REFIT builder flag), through TensorRT's documented `trt.Refitter`:

  set_named_weights(name, Weights) for each changed weight (the ONNX parser names weights after the ONNX
  initializers, the names builder/refit.py records) → get_missing_weights(): weights TensorRT combined with the
  changed ones at build, which must be given again (from the base values) → refit_cuda_engine().

Untested here: this machine has no TensorRT (tests/test_personalize.py skips its TensorRT case without a GPU).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fd.runtime.errors import FdError


def refit_engine(trt, engine, logger, values: dict[str, np.ndarray], base: Callable[[str], np.ndarray],
                 graph: str) -> None:
    """Give `engine` the weights `values` (initializer name → array in the initializer's layout and dtype);
    `base(name)` is a weight's value as built, for the ones TensorRT asks for again."""
    refitter = trt.Refitter(engine, logger)
    alive = []  # TensorRT reads the host arrays until refit_cuda_engine returns

    def give(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        alive.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise FdError(f"TensorRT refused new weights for {name} in the {graph} engine (its log above says why): "
                          "rebuild the folder with fd-build --refittable")

    for name, array in values.items():
        give(name, array)
    for name in refitter.get_missing_weights():  # combined at build with a changed weight
        give(name, base(name))
    missing = refitter.get_missing_weights()
    if missing:
        raise FdError(f"TensorRT still misses {len(missing)} weights of the {graph} engine (e.g. {missing[0]}): "
                      "rebuild the folder with fd-build --refittable")
    if not refitter.refit_cuda_engine():
        raise FdError(f"TensorRT could not refit the {graph} engine (its log above says why)")
