"""Shape arithmetic: the values of small integer tensors that exporters compute from `Shape`.

TensorFlow and PyTorch exporters build reshape targets at run time (Shape → Gather → Slice →
Concat → Cast). Evaluating such a chain symbolically tells a rule two things: whether a channel
count read by `Shape` can reach anything that acts on it (it is usually sliced away), and which
constant element spells a reshape dimension, so the rewrite can change exactly that element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Dim:
    """An element equal to dimension `axis` of tensor `tensor`, read at run time by `Shape`."""

    tensor: str
    axis: int


@dataclass(frozen=True)
class Known:
    """A constant element; `source` is (node name, input index, flat index) of the constant it
    was read from, or None when it was not read verbatim from one."""

    value: int
    source: tuple[str, int, int] | None = None


Entry = "Dim | Known"
SHAPE_OPS = {"Shape", "Gather", "Cast", "Slice", "Concat", "Squeeze", "Unsqueeze", "Identity"}


def shape_value(tensor: gs.Tensor, opset: int, depth: int = 0) -> "list[Dim | Known] | None":
    """Elements of a (scalar or 1-D) integer tensor, or None when it is not plain shape arithmetic."""
    if isinstance(tensor, gs.Constant):
        return None  # constants are read through their consumer, which records the source
    if depth > 32 or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op not in SHAPE_OPS or node.outputs[0] is not tensor:
        return None
    return _EVAL[node.op](node, opset, depth + 1)


def _operand(node: gs.Node, index: int, opset: int, depth: int) -> "list[Dim | Known] | None":
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values).reshape(-1)
        if values.size > 64 or not np.issubdtype(values.dtype, np.integer):
            return None
        return [Known(int(x), (node.name, index, k)) for k, x in enumerate(values)]
    return shape_value(tensor, opset, depth)


def _ints(node: gs.Node, index: int) -> list[int] | None:
    """A constant int input as a list (None when absent or computed at run time)."""
    if index >= len(node.inputs) or not isinstance(node.inputs[index], gs.Constant):
        return None
    return [int(x) for x in np.asarray(node.inputs[index].values).reshape(-1)]


def _shape(node: gs.Node, opset: int, depth: int):
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    return [Dim(node.inputs[0].name, a) for a in range(rank)][slice(start, end)]


def _gather(node: gs.Node, opset: int, depth: int):
    data, indices = _operand(node, 0, opset, depth), _ints(node, 1)
    if data is None or indices is None or node.attrs.get("axis", 0) != 0:
        return None
    n = len(data)
    return [data[i % n] for i in indices] if all(-n <= i < n for i in indices) else None


def _slice(node: gs.Node, opset: int, depth: int):
    data = _operand(node, 0, opset, depth)
    if data is None:
        return None
    if opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes", [0]), [1]
    else:
        starts, ends = _ints(node, 1), _ints(node, 2)
        axes = _ints(node, 3) if len(node.inputs) > 3 and node.inputs[3].name else [0]
        steps = _ints(node, 4) if len(node.inputs) > 4 and node.inputs[4].name else [1]
    if starts is None or ends is None or axes not in ([0], [-1]) or steps is None:
        return None
    return data[slice(starts[0], ends[0], steps[0])]


def _concat(node: gs.Node, opset: int, depth: int):
    parts = [_operand(node, i, opset, depth) for i in range(len(node.inputs))]
    return None if any(p is None for p in parts) else [e for p in parts for e in p]


def _same(node: gs.Node, opset: int, depth: int):
    """Cast, Identity, and Squeeze/Unsqueeze between a scalar and a 1-element vector."""
    data = _operand(node, 0, opset, depth)
    if node.op in ("Squeeze", "Unsqueeze") and (data is None or len(data) != 1):
        return None
    return data


_EVAL = {"Shape": _shape, "Gather": _gather, "Slice": _slice, "Concat": _concat,
         "Cast": _same, "Identity": _same, "Squeeze": _same, "Unsqueeze": _same}


def dim_readers(shape_node: gs.Node, axis: int, opset: int) -> "list[gs.Node] | None":
    """The nodes, beyond plain shape arithmetic, that receive dimension `axis` read by `shape_node`.

    Returns [] when every path drops that dimension (e.g. keeps only the batch size), and None
    when some path cannot be evaluated.
    """
    wanted = Dim(shape_node.inputs[0].name, axis)
    readers, frontier, seen = [], [shape_node.outputs[0]], set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        value = shape_value(tensor, opset)
        if value is None:
            return None
        if wanted not in value:
            continue
        for consumer in tensor.outputs:
            if consumer.op in SHAPE_OPS and consumer.op != "Shape":
                frontier.extend(consumer.outputs[:1])
            else:
                readers.append(consumer)
    return readers
