"""Resize (opset 10-19 attributes) and Upsample, applied one axis at a time with ONNX's coordinate
transforms: nearest (every `nearest_mode`), linear and cubic (`cubic_coeff_a`, `exclude_outside`)
are separable, so per-axis interpolation equals the n-dimensional one."""

from __future__ import annotations

import math

import torch

from onnxprune.train.ops import Node, axis_of, torch_op


def _source(mode: str, x, scale: float, size_in: int, size_out: int):
    """Input coordinate of each output position along one axis."""
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjust = size_out / (scale * size_in)
        return size_in / 2 * (1 - adjust) + (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if size_out > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (size_in - 1) / (size_out - 1) if size_out > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    raise ValueError(f"coordinate_transformation_mode {mode} has no training rule")


def _nearest(mode: str, src, down: bool):
    if mode == "round_prefer_floor":
        return torch.ceil(src - 0.5)
    if mode == "round_prefer_ceil":
        return torch.floor(src + 0.5)
    if mode == "floor":
        return torch.floor(src)
    if mode == "ceil":
        return torch.ceil(src)
    return torch.ceil(src) if down else torch.floor(src)  # "simple": Upsample and Resize-10


def _cubic_weights(t, a: float):
    """Weights of the taps at offsets -1, 0, 1, 2 from floor(src), t = src - floor(src)."""
    def near(s):
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s):
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return torch.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], -1)


def _resize_axis(node: Node, x, axis: int, size_out: int, scale: float, coord: str, mode: str, nearest: str):
    size_in = x.shape[axis]
    positions = torch.arange(size_out, dtype=torch.float64)
    src = _source(coord, positions, scale, size_in, size_out)
    if mode == "nearest":
        index = _nearest(nearest, src, scale < 1).clamp(0, size_in - 1).long()
        return x.index_select(axis, index)
    shape = [1] * x.dim()
    shape[axis] = size_out
    if mode == "linear":
        src = src.clamp(0, size_in - 1)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=size_in - 1)
        w = (src - lo).to(x.dtype).reshape(shape)
        return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
    if mode == "cubic":
        base = src.floor()
        weights = _cubic_weights(src - base, node.attr("cubic_coeff_a", -0.75))
        taps = base.long().unsqueeze(-1) + torch.arange(-1, 3)
        if node.attr("exclude_outside", 0):
            weights = weights * ((taps >= 0) & (taps < size_in))
            weights = weights / weights.sum(-1, keepdim=True)
        taps = taps.clamp(0, size_in - 1)
        out = 0
        for k in range(4):
            out = out + x.index_select(axis, taps[:, k]) * weights[:, k].to(x.dtype).reshape(shape)
        return out
    raise ValueError(f"mode {mode} has no training rule")


def _targets(node: Node, x, scales, sizes) -> tuple[list[int], list[int], list[float]]:
    """(axes, output sizes, coordinate scales) of the resized axes."""
    rank = x.dim()
    axes = [axis_of(a, rank) for a in (node.attr("axes") or range(rank))]
    if sizes is not None and sizes.numel():
        wanted = [int(v) for v in sizes.tolist()]
        ratios = [w / x.shape[a] for a, w in zip(axes, wanted)]
        policy = node.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            ratio = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [ratio] * len(axes)
            wanted = [int(math.floor(x.shape[a] * ratio + 0.5)) for a in axes]
        return axes, wanted, ratios
    factors = [float(v) for v in scales.tolist()]
    return axes, [int(math.floor(x.shape[a] * f)) for a, f in zip(axes, factors)], factors


@torch_op("Resize")
def resize(node: Node, x, roi=None, scales=None, sizes=None):
    if node.attr("antialias", 0):
        raise node.error("antialias=1 has no training rule")
    if node.opset < 11:
        scales, sizes = roi, None
        coord, nearest = "asymmetric", "simple"
    else:
        coord = node.attr("coordinate_transformation_mode", "half_pixel")
        nearest = node.attr("nearest_mode", "round_prefer_floor")
    if coord == "tf_crop_and_resize":
        raise node.error("coordinate_transformation_mode tf_crop_and_resize has no training rule")
    mode = node.attr("mode", "nearest")
    for axis, size_out, scale in zip(*_targets(node, x, scales, sizes)):
        if size_out != x.shape[axis] or scale != 1.0:
            x = _resize_axis(node, x, axis, size_out, scale, coord, mode, nearest)
    return x


@torch_op("Upsample")
def upsample(node: Node, x, scales=None):
    factors = node.attr("scales") if scales is None else [float(v) for v in scales.tolist()]
    mode = node.attr("mode", "nearest")
    for axis, f in enumerate(factors):
        if f != 1.0:
            x = _resize_axis(node, x, axis, int(math.floor(x.shape[axis] * f)), f, "asymmetric",
                             "linear" if mode in ("linear", "bilinear") else mode, "simple")
    return x
