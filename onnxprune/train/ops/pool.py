"""Pooling: MaxPool, AveragePool, LpPool and their Global forms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxprune.train.ops import Node, torch_op
from onnxprune.train.ops.conv import spatial_pads, torch_pads

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _window(node: Node, x) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides = node.attr("strides") or [1] * n
    dilations = node.attr("dilations") or [1] * n
    begin, end = spatial_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _onnx_sizes(x, kernel, strides, dilations, begin, end, ceil: bool) -> list[int]:
    """Output sizes per ONNX Runtime: with ceil_mode, a last window starting in the end padding is dropped."""
    sizes = []
    for n, k, s, d, b, e in zip(x.shape[2:], kernel, strides, dilations, begin, end):
        span = n + b + e - ((k - 1) * d + 1)
        out = (-(-span // s) if ceil else span // s) + 1
        sizes.append(out - 1 if ceil and (out - 1) * s >= n + b else out)
    return sizes


def _cropped(y, sizes: list[int]):
    for axis, size in enumerate(sizes, start=2):
        y = y.narrow(axis, 0, size)
    return y


def _torch_padding_ok(kernel: list[int], begin: list[int], end: list[int]) -> bool:
    return begin == end and all(2 * p <= k for p, k in zip(begin, kernel))


@torch_op("MaxPool")
def max_pool(node: Node, x):
    if node.num_outputs > 1:
        raise node.error("the Indices output has no training rule")
    kernel, strides, dilations, begin, end = _window(node, x)
    ceil = bool(node.attr("ceil_mode", 0))
    if _torch_padding_ok(kernel, begin, end):
        return _MAX[len(kernel)](x, kernel, strides, begin, dilations, ceil)
    sizes = _onnx_sizes(x, kernel, strides, dilations, begin, end, ceil)
    x = F.pad(x, torch_pads(begin, end), value=-math.inf)
    return _cropped(_MAX[len(kernel)](x, kernel, strides, 0, dilations, ceil), sizes)


def _window_sums(x, kernel: list[int], strides: list[int], ceil: bool):
    """Sum over every pooling window (no padding added here), via average pooling with divisor 1."""
    if len(kernel) == 1:
        return F.avg_pool2d(x.unsqueeze(-1), kernel + [1], strides + [1], 0, ceil, True, 1).squeeze(-1)
    return _AVG[len(kernel)](x, kernel, strides, 0, ceil, True, 1)


@torch_op("AveragePool")
def average_pool(node: Node, x):
    kernel, strides, dilations, begin, end = _window(node, x)
    if any(d != 1 for d in dilations):
        raise node.error("dilated AveragePool has no training rule")
    ceil = bool(node.attr("ceil_mode", 0))
    include = bool(node.attr("count_include_pad", 0))
    if _torch_padding_ok(kernel, begin, end) and not ceil:
        return _AVG[len(kernel)](x, kernel, strides, begin, ceil, include)
    pads = torch_pads(begin, end)
    sizes = _onnx_sizes(x, kernel, strides, dilations, begin, end, ceil)
    sums = _window_sums(F.pad(x, pads), kernel, strides, ceil)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    counts = _window_sums(F.pad(ones, pads, value=1.0 if include else 0.0), kernel, strides, ceil)
    return _cropped(sums / counts, sizes)


@torch_op("LpPool")
def lp_pool(node: Node, x):
    kernel, strides, _, begin, end = _window(node, x)
    p = node.attr("p", 2)
    ceil = bool(node.attr("ceil_mode", 0))
    sums = _window_sums(F.pad(x.abs() ** p, torch_pads(begin, end)), kernel, strides, ceil)
    return _cropped(sums, _onnx_sizes(x, kernel, strides, [1] * len(kernel), begin, end, ceil)) ** (1.0 / p)


def _spatial(x) -> list[int]:
    return list(range(2, x.dim()))


@torch_op("GlobalAveragePool")
def global_average_pool(node: Node, x):
    return x.mean(_spatial(x), keepdim=True)


@torch_op("GlobalMaxPool")
def global_max_pool(node: Node, x):
    return x.amax(_spatial(x), keepdim=True)


@torch_op("GlobalLpPool")
def global_lp_pool(node: Node, x):
    p = node.attr("p", 2)
    return (x.abs() ** p).sum(_spatial(x), keepdim=True) ** (1.0 / p)
