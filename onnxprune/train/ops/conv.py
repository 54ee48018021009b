"""Convolutions (1-D to 3-D): Conv and ConvTranspose with explicit, asymmetric or `auto_pad` padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxprune.train.ops import Node, torch_op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def spatial_pads(node: Node, sizes: list[int], kernel: list[int], strides: list[int],
                 dilations: list[int]) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis from `pads` or `auto_pad` (SAME_* keeps ceil(in/stride))."""
    n = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = node.attr("pads") or [0] * 2 * n
        return list(pads[:n]), list(pads[n:])
    if auto == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin, end


def torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) lists to F.pad's order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _geometry(node: Node, w) -> tuple[int, list[int], list[int], list[int]]:
    """(spatial rank, kernel, strides, dilations) of a convolution node and its weight."""
    n = w.dim() - 2
    return n, list(w.shape[2:]), node.attr("strides") or [1] * n, node.attr("dilations") or [1] * n


@torch_op("Conv")
def conv(node: Node, x, w, b=None):
    n, kernel, strides, dilations = _geometry(node, w)
    begin, end = spatial_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    if begin != end:
        x, begin = F.pad(x, torch_pads(begin, end)), [0] * n
    return _CONV[n](x, w, b, strides, begin, dilations, node.attr("group", 1))


@torch_op("ConvTranspose")
def conv_transpose(node: Node, x, w, b=None):
    """Full transposed convolution, then output padding and cropping per ONNX's size formula."""
    n, kernel, strides, dilations = _geometry(node, w)
    extra = node.attr("output_padding") or [0] * n
    groups = node.attr("group", 1)
    y = _CONV_T[n](x, w, None, strides, 0, 0, groups, dilations)
    full = [s * (i - 1) + o + (k - 1) * d + 1 for s, i, o, k, d in zip(strides, x.shape[2:], extra, kernel, dilations)]
    y = F.pad(y, torch_pads([0] * n, extra))
    shape = node.attr("output_shape")
    auto = node.attr("auto_pad", "NOTSET")
    if shape or auto in ("SAME_UPPER", "SAME_LOWER"):  # crop to output_shape, else to input * stride
        wanted = shape[-n:] if shape else [i * s for i, s in zip(x.shape[2:], strides)]
        total = [f - w for f, w in zip(full, wanted)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        end = [t - bg for t, bg in zip(total, begin)]
    else:
        pads = node.attr("pads") or [0] * 2 * n
        begin, end = list(pads[:n]), list(pads[n:])
    y = F.pad(y, torch_pads([-v for v in begin], [-v for v in end]))
    return y if b is None else y + b.reshape(1, -1, *([1] * n))
