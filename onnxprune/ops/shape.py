"""The Shape op: reading a channel tensor's shape is safe when every reader of the channel dim
follows the kept count (a Reshape of the tensor itself, a repeat sized by it, a chunk's bounds)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, identity, register, slot_axes
from onnxprune.ops.chunks import only_chunk_bounds
from onnxprune.ops.shape_values import Dim, dim_readers, reads, shape_value
from onnxprune.ops.targets import block_tie, flows_from, merges_repeat, repeat_axes


def _last_axis_follower(reader: gs.Node, x: gs.Tensor, axis: int, opset: int) -> Slot | None:
    """The slot that must lose the same channels as axis `axis` of x because `reader` is a Reshape
    whose target ends with that dim (read only there), or None when `reader` is not one.

    `x.view(-1, x.size(-1))` (GPT-2's Conv1D) reads x's own last axis only to keep it last: x's slot.
    GPT-2's final `h.view(shape_of_embeddings)` reads the hidden size from another tensor: the
    data's last axis then gets the tie, so both always keep the same count and the run-time target
    stays right whatever the count becomes."""
    data = reader.inputs[0] if reader.op == "Reshape" else None
    if data is None or x.shape is None or data.shape is None or not data.shape:
        return None
    target = shape_value(reader.inputs[1], opset)
    wanted = Dim(x.name, axis)
    if not target or target[-1] != wanted or any(reads(e, x.name, axis) for e in target[:-1]):
        return None
    if data is x:
        return (x.name, axis) if axis == len(x.shape) - 1 else None
    n = x.shape[axis]
    return (data.name, len(data.shape) - 1) if isinstance(n, (int, np.integer)) and data.shape[-1] == n else None


def merges_own_dims(reader: gs.Node, x: gs.Tensor, opset: int) -> bool:
    """Whether `reader` is a Reshape of `x` whose run-time target is x's leading dims as they are,
    then a product of the next few (`view(*x.shape[:k], -1)` written as Shape[k] * Shape[k+1]):
    the product follows the kept counts by itself, and the Reshape rule ties the merged axes."""
    if reader.op != "Reshape" or reader.inputs[0] is not x:
        return False
    target = shape_value(reader.inputs[1], opset) or []
    spans = [k for k, e in enumerate(target) if isinstance(e, Dim) and e.span > 1]
    return len(spans) == 1 and all(e == Dim(x.name, j) for j, e in enumerate(target[:spans[0]])) \
        and target[spans[0]] == Dim(x.name, spans[0], span=target[spans[0]].span) \
        and len(target) == spans[0] + 1


def _sized_by(reader: gs.Node, slot: Slot, n: int | None, opset: int) -> list[Tie] | None:
    """Ties from a channel axis to the output axes of a Reshape/Expand whose run-time target reads
    its size (times a constant, as KV heads x repeats in `repeat_kv`), or of a Resize whose run-time
    sizes do: the target then follows the kept count by itself, and the tie makes the output lose
    the matching elements. None when `reader` uses the dim any other way."""
    index = 3 if reader.op == "Resize" else 1
    if reader.op not in ("Reshape", "Expand", "Resize") or n is None or len(reader.inputs) <= index \
            or reader.outputs[0].shape is None or (reader.op == "Resize" and "axes" in reader.attrs):
        return None
    y, target = reader.outputs[0], shape_value(reader.inputs[index], opset)
    offset = len(y.shape) - len(target or [])
    if not target or offset < 0 or (reader.op != "Expand" and offset):
        return None
    ties = []
    for j, entry in enumerate(target):
        if reads(entry, *slot):
            if y.shape[offset + j] != n * entry.factor or not flows_from(reader.inputs[0], slot[0]):
                return None
            ties.append(block_tie(slot, (y.name, offset + j), n, entry.factor))
    return ties or None


def _reads_for_repeat(v: NodeView, reader: gs.Node) -> bool:
    """Whether a shape reader is a K/V repeat or the Reshape merging one (their targets)."""
    view = NodeView(reader, v.tensors, v.opset)
    return bool(repeat_axes(view)) if reader.op in ("Expand", "Tile") else (
        reader.op == "Reshape" and merges_repeat(view))


@register("Shape")
class Shape(OpRule):
    """Reading a tensor's shape is safe when no consumer picks out the channel dim."""

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        start = v.attr("start", 0) % (rank + 1) if rank else 0
        end = v.attr("end", rank) if v.attr("end") is not None else rank
        end = end % (rank + 1) if end < 0 else min(end, rank)
        read = [a for a in slot_axes(slot) if start <= a < end]
        if not read:
            return []
        found = [dim_readers(v.node, a, v.opset) for a in read]
        if any(r is None for r in found):
            return Freeze("shape of a channel tensor feeds a computation onnxprune cannot follow")
        readers = [r for r in dict((r.name, r) for rs in found for r in rs).values()
                   if not merges_own_dims(r, v.node.inputs[0], v.opset)]
        if isinstance(slot[1], tuple):  # a (direction, unit) pair: only its own flatten may read it
            return Freeze(f"channel count is read at run time by {readers[0].op} '{readers[0].name}'") if readers else []
        if v.gqa == "query" and any(_reads_for_repeat(v, r) for r in readers):
            return Freeze("gqa='query': the K/V repeat reads the KV head count, which stays")
        followers = {r.name: _last_axis_follower(r, v.node.inputs[0], slot[1], v.opset) for r in readers}
        readers = [r for r in readers if followers[r.name] is None]
        if readers and only_chunk_bounds(v.node, v.tensors, v.opset):
            readers = []  # torch's chunk: the bounds follow the channel count (see ops/chunks.py)
        sized = [_sized_by(r, slot, v.dim(slot), v.opset) for r in readers]
        unread = [r for r, ties in zip(readers, sized) if ties is None]
        if unread:
            return Freeze(f"channel count is read at run time by {unread[0].op} '{unread[0].name}'")
        follow = [identity(slot, s, v.dim(slot)) for s in dict.fromkeys(followers.values()) if s not in (None, slot)]
        return follow + [t for ties in sized for t in ties]
