"""Shape arithmetic: the values of small integer tensors that exporters compute from `Shape`.

TensorFlow and PyTorch exporters build reshape targets at run time (Shape → Gather → Slice →
Concat → Cast). Evaluating such a chain symbolically tells a rule two things: whether a channel
count read by `Shape` can reach anything that acts on it (it is usually sliced away), and which
constant element spells a reshape dimension, so the rewrite can change exactly that element.

The TorchScript export of `expand_as`/`repeat_kv` adds integer arithmetic to the chain: a dim times
a constant (KV heads x repeats as a `Mul`), and the idiom `Where(Equal(t, -1 * ones), ones, t)`
(ones from `ConstantOfShape(Shape(t))`) that replaces -1 entries by 1. Both are evaluated here:
a dim is never negative, so `Equal(dim, -1)` is known to be false whatever the channel count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Dim:
    """An element equal to `factor` times dimension `axis` of tensor `tensor`, read at run time by
    `Shape` (a factor other than 1 comes from a `Mul` by a constant, as KV heads x repeats)."""

    tensor: str
    axis: int
    factor: int = 1
    factor_source: "tuple[str, int, int] | None" = field(default=None, compare=False)
    """Where a factor other than 1 was read (node name, input index, flat index), when a single
    constant gave it: `gqa='query'` rewrites KV heads x repeats there with the kept repeats."""
    span: int = 1
    """The element is the product of `span` consecutive dims from `axis` on (the dynamo exporter
    flattens a bidirectional layer's [.., D, H] output with Shape[2] * Shape[3])."""


def dim_size(entry: Dim, shape: "tuple | None") -> "int | str | None":
    """The value of a Dim element given the static shape of the tensor it reads: an int, a symbol
    (one symbolic dim, factor 1), or None."""
    if shape is None or entry.axis + entry.span > len(shape):
        return None
    dims = shape[entry.axis:entry.axis + entry.span]
    if all(isinstance(d, (int, np.integer)) for d in dims):
        return int(np.prod(dims, dtype=np.int64)) * entry.factor
    return dims[0] if entry.span == 1 and entry.factor == 1 else None


def reads(entry: "Dim | Known", tensor: str, axis: int) -> bool:
    """Whether an element is computed from dimension `axis` of `tensor` (with any factor)."""
    return isinstance(entry, Dim) and entry.tensor == tensor and entry.axis <= axis < entry.axis + entry.span


@dataclass(frozen=True)
class Known:
    """A constant element; `source` is (node name, input index, flat index) of the constant it
    was read from, or None when it was not read verbatim from one."""

    value: int
    source: tuple[str, int, int] | None = None


Entry = "Dim | Known"
SHAPE_OPS = {"Shape", "Gather", "Cast", "Slice", "Concat", "Squeeze", "Unsqueeze", "Identity", "Reshape",
             "Mul", "Equal", "Where", "ConstantOfShape"}
VALUE_INPUTS = {"Shape": (), "ConstantOfShape": (), "Gather": (0,), "Slice": (0,), "Reshape": (0,)}
"""Inputs through which a shape op passes a value on (default: all). `Shape` of a shape vector reads
only its length; any other input (a Reshape target, Slice bounds) makes the node a reader."""
MAX_ELEMENTS = 64


def shape_value(tensor: gs.Tensor, opset: int, depth: int = 0) -> "list[Dim | Known] | None":
    """Elements of a (scalar or 1-D) integer tensor, or None when it is not plain shape arithmetic."""
    if isinstance(tensor, gs.Constant):
        return None  # constants are read through their consumer, which records the source
    if depth > 32 or len(tensor.inputs) != 1 or (tensor.shape is not None and len(tensor.shape) > 1):
        return None  # shape values are scalars or vectors: activations stop here
    node = tensor.inputs[0]
    if node.op not in SHAPE_OPS or node.outputs[0] is not tensor:
        return None
    return _EVAL[node.op](node, opset, depth + 1)


def _operand(node: gs.Node, index: int, opset: int, depth: int) -> "list[Dim | Known] | None":
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values).reshape(-1)
        if values.size > MAX_ELEMENTS or not np.issubdtype(values.dtype, np.integer):
            return None
        return [Known(int(x), (node.name, index, k)) for k, x in enumerate(values)]
    return shape_value(tensor, opset, depth)


def _ints(node: gs.Node, index: int) -> list[int] | None:
    """A constant int input as a list (None when absent or computed at run time)."""
    if index >= len(node.inputs) or not isinstance(node.inputs[index], gs.Constant):
        return None
    return [int(x) for x in np.asarray(node.inputs[index].values).reshape(-1)]


def _shape(node: gs.Node, opset: int, depth: int):
    inner = shape_value(node.inputs[0], opset, depth)
    if inner is not None and not node.attrs.get("start") and node.attrs.get("end") is None:
        return [Known(len(inner))]  # the length of a shape vector: a rank, which pruning keeps
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


def _reshape(node: gs.Node, opset: int, depth: int):
    """A vector reshaped to itself (`view(-1)`), or a 1-element vector to a scalar and back."""
    data, target = _operand(node, 0, opset, depth), _ints(node, 1)
    if data is None or target is None or len(target) > 1 or (target and target[0] not in (-1, len(data))):
        return None
    return data if target or len(data) == 1 else None


def _pairs(node: gs.Node, opset: int, depth: int, count: int):
    """Operands of an element-wise node, broadcast to one length (vectors and scalars only)."""
    args = [_operand(node, i, opset, depth) for i in range(count)]
    if any(a is None for a in args):
        return None
    n = max(len(a) for a in args)
    if any(len(a) not in (1, n) for a in args):
        return None
    return [[a[k] if len(a) == n else a[0] for a in args] for k in range(n)]


def _mul(node: gs.Node, opset: int, depth: int):
    """Constant products, and a dim times a positive constant (KV heads x repeats)."""
    out = []
    pairs = _pairs(node, opset, depth, 2)
    for a, b in pairs or []:
        if isinstance(a, Known) and isinstance(b, Known):
            out.append(Known(a.value * b.value))
        elif isinstance(a, Dim) and isinstance(b, Known) and b.value > 0:
            out.append(_scaled(a, b))
        elif isinstance(b, Dim) and isinstance(a, Known) and a.value > 0:
            out.append(_scaled(b, a))
        elif isinstance(a, Dim) and isinstance(b, Dim) and a.tensor == b.tensor and a.factor == b.factor == 1 \
                and a.axis + a.span == b.axis:
            out.append(Dim(a.tensor, a.axis, span=a.span + b.span))  # consecutive dims: a flatten
        else:
            return None  # any other product of two dims
    return out if pairs else None


def _scaled(dim: Dim, by: Known) -> Dim:
    """dim x constant; the constant's source is kept when it alone makes the factor."""
    return Dim(dim.tensor, dim.axis, dim.factor * by.value, by.source if dim.factor == 1 else None, dim.span)


def _equal(node: gs.Node, opset: int, depth: int):
    """1/0 where decidable: constants compare by value, a dim never equals a negative constant."""
    out = []
    pairs = _pairs(node, opset, depth, 2)
    for a, b in pairs or []:
        if isinstance(a, Known) and isinstance(b, Known):
            out.append(Known(int(a.value == b.value)))
        elif isinstance(a, Known) != isinstance(b, Known) and min(
                (e.value for e in (a, b) if isinstance(e, Known)), default=0) < 0:
            out.append(Known(0))
        elif a == b and a is not None:
            out.append(Known(1))
        else:
            return None
    return out if pairs else None


def _where(node: gs.Node, opset: int, depth: int):
    """The chosen element of each position, when every condition element is known."""
    triples = _pairs(node, opset, depth, 3)
    if triples is None or not all(isinstance(c, Known) for c, _, _ in triples):
        return None
    return [a if c.value else b for c, a, b in triples]


def _constant_of_shape(node: gs.Node, opset: int, depth: int):
    """A short integer vector filled with the node's constant (ones, in the expand_as idiom)."""
    size = _operand(node, 0, opset, depth)
    fill = node.attrs.get("value")
    fill = np.asarray(fill.values if isinstance(fill, gs.Constant) else fill).reshape(-1) if fill is not None else None
    if size is None or len(size) != 1 or not isinstance(size[0], Known) or not 0 <= size[0].value <= MAX_ELEMENTS:
        return None
    if fill is None or fill.size != 1 or not np.issubdtype(fill.dtype, np.integer):
        return None
    return [Known(int(fill[0]))] * size[0].value


_EVAL = {"Shape": _shape, "Gather": _gather, "Slice": _slice, "Concat": _concat,
         "Cast": _same, "Identity": _same, "Squeeze": _same, "Unsqueeze": _same, "Reshape": _reshape,
         "Mul": _mul, "Equal": _equal, "Where": _where, "ConstantOfShape": _constant_of_shape}


def passes_value(consumer: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `consumer` is shape arithmetic that carries the value of `tensor` on to its output."""
    if consumer.op not in SHAPE_OPS:
        return False
    inputs = VALUE_INPUTS.get(consumer.op)
    indices = range(len(consumer.inputs)) if inputs is None else inputs
    return any(i < len(consumer.inputs) and consumer.inputs[i] is tensor for i in indices)


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
        if not any(reads(e, wanted.tensor, wanted.axis) for e in value):
            continue
        for consumer in tensor.outputs:
            if passes_value(consumer, tensor):
                frontier.extend(consumer.outputs[:1])
            elif consumer.op != "Shape" and all(r is not consumer for r in readers):
                readers.append(consumer)  # Shape of a shape vector reads its length only
    return readers
