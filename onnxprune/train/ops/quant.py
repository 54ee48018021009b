"""Quantize/dequantize pairs (QDQ graphs): DequantizeLinear is differentiable in its scale;
QuantizeLinear produces integers, so no gradient reaches what it quantises."""

from __future__ import annotations

import torch

from onnxprune.train.ops import Node, axis_of, torch_op
from onnxprune.train.ops.conv import conv


def _per_axis_at(v, x, axis: int):
    """`v` (one value per index of `x`'s `axis`, or a single value) shaped to broadcast against `x`."""
    if v.numel() == 1:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def _per_axis(node: Node, v, x):
    """A per-axis scale or zero point shaped to broadcast along the node's `axis` of `x`."""
    if v is None or v.numel() == 1:
        return v
    if node.attr("block_size", 0):
        raise node.error("blocked quantisation has no training rule")
    return _per_axis_at(v, x, axis_of(node.attr("axis", 1), x.dim()))


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


def _centered(x, zero_point, axis: int = 1):
    """Integers minus their zero point, as float64 (exact for 8/16-bit products and sums)."""
    zero = 0 if zero_point is None else _per_axis_at(zero_point, x, axis).double()
    return x.double() - zero


def _requantize(acc, scale, y_scale, y_zero, channel_axis: int):
    """float accumulator times scales, rounded half to even, saturated to the output zero point's type."""
    scaled = acc * _per_axis_at(scale.double(), acc, channel_axis) / y_scale.double()
    lo, hi = _RANGES[y_zero.dtype]
    return torch.clamp(torch.round(scaled) + y_zero.double(), lo, hi).to(y_zero.dtype)


@torch_op("MatMulInteger")
def matmul_integer(node: Node, a, b, a_zero=None, b_zero=None):
    acc = _centered(a, a_zero, a.dim() - 2) @ _centered(b, b_zero, b.dim() - 1)
    return torch.round(acc).to(torch.int32)


@torch_op("ConvInteger")
def conv_integer(node: Node, x, w, x_zero=None, w_zero=None):
    return torch.round(conv(node, _centered(x, x_zero), _centered(w, w_zero, 0))).to(torch.int32)


@torch_op("QLinearMatMul")
def qlinear_matmul(node: Node, a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero):
    acc = _centered(a, a_zero, a.dim() - 2) @ _centered(b, b_zero, b.dim() - 1)
    return _requantize(acc * a_scale.double().reshape(()), b_scale, y_scale, y_zero, acc.dim() - 1)


@torch_op("QLinearConv")
def qlinear_conv(node: Node, x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, bias=None):
    acc = conv(node, _centered(x, x_zero), _centered(w, w_zero, 0))
    if bias is not None:
        acc = acc + bias.double().reshape(1, -1, *([1] * (acc.dim() - 2)))
    return _requantize(acc * x_scale.double().reshape(()), w_scale, y_scale, y_zero, 1)


@torch_op("DynamicQuantizeLinear")
def dynamic_quantize(node: Node, x):
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    y = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return y.to(torch.uint8), scale, zero.to(torch.uint8)
