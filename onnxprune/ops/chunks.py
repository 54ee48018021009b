"""Slices whose bounds are computed at run time from the sliced tensor's own channel count.

torch's `x.chunk(n, dim)` reaches ONNX (TorchScript exporter) as Shape → Gather → Add → Div → Mul
→ Slice: the bounds follow the channel count by themselves. Such a slice stays correct after
pruning exactly when every chunk shrinks alike, which a tie between the chunks enforces. Whether
the bounds really scale with the channel count is checked by evaluating them numerically twice:
with the static count and with one channel fewer per chunk.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.base import Freeze, NodeView, Slot, Tie

_MAX_DEPTH = 24


def _ints(values) -> np.ndarray | None:
    arr = np.asarray(values)
    return arr.astype(np.int64) if np.issubdtype(arr.dtype, np.integer) and arr.size <= 16 else None


def evaluate(tensor: gs.Tensor, dims: dict[str, tuple], depth: int = 0) -> np.ndarray | None:
    """Value of a small integer tensor computed from constants and `Shape` of tensors whose dims are
    given in `dims` (or statically known); None when it depends on anything else."""
    if isinstance(tensor, gs.Constant):
        return _ints(tensor.values)
    if depth > _MAX_DEPTH or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "Shape":
        src = node.inputs[0]
        shape = dims.get(src.name, src.shape)
        if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape):
            return None
        rank = len(shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        return np.array(shape, dtype=np.int64)[slice(start, end)]
    args = [evaluate(t, dims, depth + 1) if t.name else None for t in node.inputs]
    if any(a is None for a in args[:1]) or (node.op in _BINARY and any(a is None for a in args[:2])):
        return None
    try:
        return _apply(node, args)
    except (ValueError, IndexError, ZeroDivisionError, TypeError):
        return None


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide, "Mod": np.mod}


def _apply(node: gs.Node, args: list) -> np.ndarray | None:
    if node.op in _BINARY:
        if node.op in ("Div", "Mod") and np.any(args[1] == 0):
            return None
        return _BINARY[node.op](args[0], args[1])
    if node.op in ("Identity", "Cast"):
        return args[0]
    if node.op == "Gather" and args[1] is not None:
        return np.take(args[0], args[1], axis=node.attrs.get("axis", 0))
    if node.op == "Unsqueeze":
        return args[0].reshape(-1) if args[0].ndim == 0 else args[0]
    if node.op == "Squeeze":
        return args[0].reshape(()) if args[0].size == 1 else args[0]
    if node.op == "Concat" and all(a is not None for a in args):
        return np.concatenate([a.reshape(-1) for a in args])
    return None


def chunk_ties(v: NodeView, slot: Slot) -> "list[Tie] | Freeze":
    """Ties for a Slice with run-time bounds that cut one whole chunk of an equal partition of the
    channel axis: the output to its chunk, and every chunk to the others element by element."""
    x, y = v.inputs[0], v.outputs[0]
    rank = v.rank(x)
    if rank is None or slot[0] not in (x, y):
        return Freeze("Slice parameters are computed at run time")
    axes = _ints(v.const(v.inp(3))) if v.inp(3) else np.arange(rank)
    steps = _ints(v.const(v.inp(4))) if v.inp(4) else None
    if axes is None or len(axes) != 1 or (steps is not None and np.any(steps != 1)):
        return Freeze("Slice parameters are computed at run time")
    axis = int(axes[0]) % rank
    n = v.dim((x, axis))
    if slot[1] != axis:
        return [Tie((x, slot[1]), (y, slot[1]), np.arange(v.dim(slot)), np.arange(v.dim(slot)))] \
            if v.dim(slot) and v.dim((x, slot[1])) == v.dim((y, slot[1])) else Freeze("unknown channel count at Slice")
    bounds = _bounds(v, x, axis, n)
    if bounds is None:
        return Freeze("Slice bounds are computed at run time and do not follow the channel count")
    start, size = bounds
    c = np.arange(n)
    return [Tie((x, axis), (y, axis), start + np.arange(size), np.arange(size)), Tie((x, axis), (x, axis), c, c % size)]


def _bounds(v: NodeView, x: str, axis: int, n: int | None) -> tuple[int, int] | None:
    """(start, size) when the bounds cut chunk k of size n/m, and still cut chunk k when every
    chunk has one channel fewer."""
    if n is None:
        return None
    first = _evaluate_bounds(v, x, axis, n)
    if first is None:
        return None
    start, size = first[0], first[1] - first[0]
    if size <= 1 or n % size or start % size or n // size < 2:
        return None
    k = start // size
    if _evaluate_bounds(v, x, axis, n - n // size) != (k * (size - 1), (k + 1) * (size - 1)):
        return None
    return start, size


def _evaluate_bounds(v: NodeView, x: str, axis: int, count: int) -> tuple[int, int] | None:
    """Slice (start, end) on `axis` when x has `count` channels there."""
    shape = list(v.shape(x))
    dims = {x: tuple(shape[:axis] + [count] + shape[axis + 1:])}
    start, end = (evaluate(v.tensors[v.inputs[i]], dims) for i in (1, 2))
    if start is None or end is None or start.size != 1 or end.size != 1:
        return None
    clamp = lambda b: max(0, min(b + count if b < 0 else b, count))  # noqa: E731
    return clamp(int(start.reshape(-1)[0])), clamp(int(end.reshape(-1)[0]))


_ARITHMETIC = {"Gather", "Add", "Sub", "Mul", "Div", "Mod", "Unsqueeze", "Squeeze", "Cast", "Identity", "Concat"}


def only_chunk_bounds(shape_node: gs.Node, tensors: dict[str, gs.Tensor], opset: int) -> bool:
    """Whether everything computed from this `Shape` ends as the bounds of equal-chunk Slices of the
    tensor it reads (torch's chunk), which follow a pruned channel count by themselves."""
    source = shape_node.inputs[0]
    frontier, seen = list(shape_node.outputs), set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if not tensor.outputs:
            return False  # a graph output, or unused: not a bound
        for node in tensor.outputs:
            if node.op == "Slice":
                bound = [i for i, t in enumerate(node.inputs) if t is tensor]
                if node.inputs[0] is not source or not set(bound) <= {1, 2}:
                    return False
                view = NodeView(node, tensors, opset)
                if isinstance(chunk_ties(view, (source.name, 0)), Freeze) and isinstance(
                        chunk_ties(view, (node.outputs[0].name, 0)), Freeze):
                    return False
            elif node.op in _ARITHMETIC:
                frontier.extend(node.outputs)
            else:
                return False
    return True
