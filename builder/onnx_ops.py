"""ONNX symbolics for the aten ops fd's graphs use that the opset-17 exporter does not know, or exports wrongly.

aten::rms_norm (torch.nn.RMSNorm: FLUX.1's query/key norms) has no opset-17 symbolic; ONNX has
RMSNormalization only from opset 23. It is written here from the definition,
y = x / sqrt(mean(x², over the normalized axes) + eps) · weight, computed in float32 (as torch upcasts half
inputs) and cast back to the input's type. eps None means float32's machine epsilon, as torch for fp32 inputs.

aten::unflatten (FLUX.1's attention splits heads with it): the built-in symbolic writes the traced batch size
into the Reshape's target shape, so a graph traced at batch 2 fails at batch 1. Here the target shape is the
input's own shape (an ONNX Shape) with the one axis replaced by the given sizes.
"""
from __future__ import annotations

import torch

_registered = False


def _rms_norm(g, x, normalized_shape, weight, eps):
    from torch.onnx import symbolic_helper as helper
    axes = list(range(-len(helper._get_const(normalized_shape, "is", "normalized_shape")), 0))
    epsilon = None if helper._is_none(eps) else helper._get_const(eps, "f", "eps")
    epsilon = torch.finfo(torch.float32).eps if epsilon is None else epsilon
    wide = g.op("Cast", x, to_i=1)  # 1: FLOAT
    mean = g.op("ReduceMean", g.op("Mul", wide, wide), axes_i=axes, keepdims_i=1)
    denominator = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32))))
    y = g.op("CastLike", g.op("Div", wide, denominator), x)
    return y if helper._is_none(weight) else g.op("Mul", y, weight)


def _unflatten(g, x, dim, sizes):
    from torch.onnx import symbolic_helper as helper
    rank = helper._get_tensor_rank(x)
    dim = helper._get_const(dim, "i", "dim")
    dim = dim + rank if dim < 0 else dim

    def ints(values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))
    shape = g.op("Shape", x)
    pieces = [g.op("Slice", shape, ints([0]), ints([dim]))] if dim > 0 else []
    pieces.append(ints(list(helper._get_const(sizes, "is", "sizes"))))
    if dim + 1 < rank:
        pieces.append(g.op("Slice", shape, ints([dim + 1]), ints([rank])))
    return g.op("Reshape", x, g.op("Concat", *pieces, axis_i=0))


def register() -> None:
    """Register the symbolics above for the legacy (TorchScript) exporter, once per process."""
    global _registered
    if not _registered:
        from fd.builder.export import OPSET
        torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
        torch.onnx.register_custom_op_symbolic("aten::unflatten", _unflatten, OPSET)
        _registered = True
