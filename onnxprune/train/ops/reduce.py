"""Reductions (axes as attribute before opset 18 — ReduceSum: 13 — and as input after), Softmax,
ArgMax/ArgMin, CumSum."""

from __future__ import annotations

import math

import torch

from onnxprune.train.ops import Node, axis_of, ints, torch_op

_AXES_AS_INPUT = {"ReduceSum": 13}


def _reduced_axes(node: Node, x, axes) -> list[int] | None:
    """Axes to reduce, or None when the node is an identity (empty axes, noop_with_empty_axes=1)."""
    if node.opset < _AXES_AS_INPUT.get(node.op, 18):
        listed = node.attr("axes") or []
    else:
        listed = ints(axes)
    if not listed:
        return None if node.attr("noop_with_empty_axes", 0) else list(range(x.dim()))
    return sorted(axis_of(a, x.dim()) for a in listed)


def _prod(x, dims: list[int], keep: bool):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


_REDUCE = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


@torch_op(*_REDUCE)
def reduce(node: Node, x, axes=None):
    dims = _reduced_axes(node, x, axes)
    if dims is None:
        return x
    if x.dim() == 0:
        return _REDUCE[node.op](x.reshape(1), [0], False).reshape(())
    y = _REDUCE[node.op](x, dims, bool(node.attr("keepdims", 1)))
    return y if y.dtype == x.dtype else y.to(x.dtype)  # torch sums small ints as int64


def _softmax(fn, node: Node, x):
    if node.opset >= 13:
        return fn(x, axis_of(node.attr("axis", -1), x.dim()))
    axis = axis_of(node.attr("axis", 1), x.dim())  # before 13: coerced to 2-D at `axis`
    return fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)


@torch_op("Softmax")
def softmax(node: Node, x):
    return _softmax(torch.softmax, node, x)


@torch_op("LogSoftmax")
def log_softmax(node: Node, x):
    return _softmax(torch.log_softmax, node, x)


@torch_op("ArgMax", "ArgMin")
def arg_extreme(node: Node, x):
    axis = axis_of(node.attr("axis", 0), x.dim())
    fn = torch.argmax if node.op == "ArgMax" else torch.argmin
    if node.attr("select_last_index", 0):
        y = x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=True)
    else:
        y = fn(x, axis, keepdim=True)
    return y if node.attr("keepdims", 1) else y.squeeze(axis)


@torch_op("CumSum")
def cumsum(node: Node, x, axis):
    axis = axis_of(int(axis), x.dim())
    reverse = node.attr("reverse", 0)
    if reverse:
        x = x.flip(axis)
    y = torch.cumsum(x, axis, dtype=x.dtype)
    if node.attr("exclusive", 0):
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if reverse else y
