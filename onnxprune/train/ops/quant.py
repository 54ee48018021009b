"""Quantize/dequantize pairs (QDQ graphs): DequantizeLinear is differentiable in its scale;
QuantizeLinear produces integers, so no gradient reaches what it quantises."""

from __future__ import annotations

import torch

from onnxprune.train.ops import Node, axis_of, torch_op


def _per_axis(node: Node, v, x):
    if v is None or v.dim() == 0 or v.numel() == 1:
        return v
    if node.attr("block_size", 0):
        raise node.error("blocked quantisation has no training rule")
    shape = [1] * x.dim()
    shape[axis_of(node.attr("axis", 1), x.dim())] = -1
    return v.reshape(shape)


@torch_op("DequantizeLinear")
def dequantize(node: Node, x, scale, zero_point=None):
    scale = _per_axis(node, scale, x)
    zero = _per_axis(node, zero_point, x)
    shifted = x.to(torch.int32) - (0 if zero is None else zero.to(torch.int32))
    return shifted.to(scale.dtype) * scale


_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


@torch_op("QuantizeLinear")
def quantize(node: Node, x, scale, zero_point=None):
    dtype = zero_point.dtype if zero_point is not None else torch.uint8
    if dtype not in _RANGES:
        raise node.error(f"quantising to {dtype} has no training rule")
    scale = _per_axis(node, scale, x)
    zero = 0 if zero_point is None else _per_axis(node, zero_point, x).to(x.dtype)
    lo, hi = _RANGES[dtype]
    return torch.clamp(torch.round(x / scale) + zero, lo, hi).to(dtype)
