"""Repeats and fills: Tile and Expand copy their input (K/V heads repeated for grouped-query
attention), ConstantOfShape fills one value into a shape (a zero state)."""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register
from onnxprune.ops.shape_values import Dim, Known, shape_value
from onnxprune.ops.targets import (computed_target, repeat_axes, target_entry_ties, update_computed_target,
                                   write_sources)


def repeat_anchors(v: NodeView) -> list[Slot]:
    """In a repeat the full (KV) axis carries the channels, not the copies. With gqa='query' the
    copy axis does (query position j of every KV group), and the KV axis is anchored on the input
    side only, so K/V projections still split by head and freeze at the repeat."""
    axes = repeat_axes(v)
    if v.gqa == "query":
        return [(v.inputs[0], a) for a in axes] + [(v.outputs[0], a + 1) for a in axes]
    return [(v.outputs[0], a) for a in axes]


def query_repeat_ties(v: NodeView, slot: Slot, entry: "Known | Dim | bool | None") -> "list[Tie] | Freeze | None":
    """gqa='query' answers at a K/V repeat (None: not a repeat axis, or KV mode). The KV axis
    freezes (K/V heads stay whole); the copy axis is a broadcast with no tie to the input, valid
    when its repeat count (`entry`: a constant, or a run-time element) can be rewritten."""
    axes = repeat_axes(v) if v.gqa == "query" else []
    if slot[0] not in (v.inputs[0], v.outputs[0]) or not axes:
        return None
    if slot[1] in axes:
        return Freeze("gqa='query' keeps KV heads whole: K/V projections are not pruned")
    if slot[0] != v.outputs[0] or slot[1] - 1 not in axes:
        return None
    if entry is True or (isinstance(entry, Known) and entry.source is not None):
        return []
    return Freeze("gqa='query': the repeat count of the KV heads is computed and cannot be rewritten")


@register("Tile")
class Tile(OpRule):
    """Copies of the input along each axis (a Tile-based repeat of K/V heads). On an axis of size n
    repeated r times, output element k + j·n is input element k: channel k owns all its copies, and
    the output keeps r x the kept count with the repeats unchanged. Repeats must be constants (or
    traced to constants) on the channel axis; one computed from a dim at run time freezes it."""

    value_preserving = True

    def anchors(self, v: NodeView) -> list[Slot]:
        return repeat_anchors(v)

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze("Tile repeats are not a channel tensor")
        const = v.const(v.inp(1))
        repeats = ([Known(int(r)) for r in const.reshape(-1)] if const is not None
                   else shape_value(v.tensors[v.inputs[1]], v.opset))
        entry = repeats[slot[1]] if repeats is not None and slot[1] < len(repeats) else None
        query = query_repeat_ties(v, slot, True if const is not None else entry)
        if query is not None:
            return query
        if not isinstance(entry, Known) or entry.value < 1:
            return Freeze("Tile repeats of the channel axis are computed at run time")
        n = v.dim((x, slot[1]))
        if n is None or v.dim((y, slot[1])) != n * entry.value:
            return Freeze("unknown channel count at Tile")
        return [Tie((x, slot[1]), (y, slot[1]), np.tile(np.arange(n), entry.value), np.arange(n * entry.value))]

    def update(self, v: NodeView, edit) -> None:
        """An axis of size 1 whose copies lose elements (gqa='query') repeats the kept count."""
        x, y = v.inputs[0], v.outputs[0]
        news = {a: edit.new_dim((y, a)) for a in range(v.rank(y) or 0) if v.dim((x, a)) == 1}
        news = {a: n for a, n in news.items() if n is not None}
        if not news:
            return
        const = v.const(v.inp(1))
        if const is None:
            entries = shape_value(v.tensors[v.inputs[1]], v.opset) or []
            return write_sources(edit, {a: (entries[a] if a < len(entries) else None, n) for a, n in news.items()},
                                  v.name)
        repeats = const.copy()
        for a, n in news.items():
            repeats[a] = n
        edit.set_input_const(v.node, 1, repeats)


@register("Expand")
class Expand(OpRule):
    """Broadcast to a target shape (GQA's repeat of K/V heads). An axis the input carries in full
    passes through; its target entry must be 1, a constant (rewritten with the kept count) or a
    dim read at run time (tied to the axis it sizes)."""

    value_preserving = True

    def anchors(self, v: NodeView) -> list[Slot]:
        return repeat_anchors(v)

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        rx, ry = v.rank(x), v.rank(y)
        if slot[0] not in (x, y) or rx is None or ry is None:
            return Freeze("Expand target shape is not a channel tensor, or ranks are unknown")
        out_axis = slot[1] + (ry - rx if slot[0] == x else 0)
        in_axis = out_axis - (ry - rx)
        target = ([Known(int(t)) for t in v.const(v.inputs[1]).reshape(-1)] if v.is_const(v.inputs[1])
                  else computed_target(v))
        entry = target[out_axis] if target is not None and len(target) == ry else None
        query = query_repeat_ties(v, slot, True if v.is_const(v.inputs[1]) else entry)
        if query is not None:
            return query
        n = v.dim((y, out_axis))
        if slot[0] == y and _is_fill(v, x, in_axis) and isinstance(entry, Known) and (
                entry.source is not None or v.is_const(v.inputs[1])):
            return []  # one value broadcast (a zero state): any channel may go, `update` rewrites the count
        if n is None or in_axis < 0 or v.dim((x, in_axis)) != n:
            return Freeze("Expand broadcasts the channel axis")
        if entry is None or (isinstance(entry, Known) and entry.value not in (1, n)):
            return Freeze("Expand target for the channel axis is computed at run time")
        main = identity((x, in_axis), (y, out_axis), n)
        if v.is_const(v.inputs[1]) or entry == Dim(x, in_axis):
            return [main]
        extra = target_entry_ties(v, target, [main])  # a dim read from another tensor (expand_as)
        return extra if isinstance(extra, Freeze) else [main] + extra

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        """A broadcast constant (a zero state) holds its one value in every channel (other slots
        get theirs along the ties)."""
        value = v.const(v.inputs[0])
        if value is not None and value.size and np.all(value == value.reshape(-1)[0]):
            fill_slots(v, float(value.reshape(-1)[0]), values)

    def update(self, v: NodeView, edit) -> None:
        if not v.is_const(v.inputs[1]):
            return update_computed_target(v, edit, fixed=(0, -1, 1))
        target = v.const(v.inputs[1]).copy()
        for axis in range(len(target)):
            new = edit.new_dim((v.outputs[0], axis))
            if new is not None and target[axis] != 1:
                target[axis] = new
        edit.set_input_const(v.node, 1, target)


def _is_fill(v: NodeView, x: str, in_axis: int) -> bool:
    """Whether Expand broadcasts one constant value along this axis (every element equal)."""
    value = v.const(x)
    return (value is not None and value.size > 0 and bool(np.all(value == value.reshape(-1)[0]))
            and (in_axis < 0 or v.dim((x, in_axis)) == 1))


def fill_slots(v: NodeView, value: float, values: ValueTable) -> None:
    """Every channel slot of the node's output holds `value` in each element."""
    y = v.outputs[0]
    for axis in range(v.rank(y) or 0):
        vals = values.get((y, axis))
        if vals is not None:
            values.set((y, axis), np.full(len(vals), value))


@register("ConstantOfShape")
class ConstantOfShape(OpRule):
    """One value filled into a shape (torch's zero state `ConstantOfShape(Concat(batch, [H]))`):
    every channel holds the same value, so any may go; the constant element that spells the
    channel count is rewritten."""

    def ties(self, v: NodeView, slot: Slot):
        if slot[0] != v.outputs[0]:
            return Freeze("the shape input of ConstantOfShape carries no channels")
        target = self._target(v)
        entry = target[slot[1]] if target is not None and slot[1] < len(target) else None
        if isinstance(entry, Known) and entry.source is not None:
            return []
        return Freeze("ConstantOfShape: the size of the channel axis is not a constant it can rewrite")

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        fill = v.attr("value")
        fill = np.asarray(fill.values if hasattr(fill, "values") else (0.0 if fill is None else fill)).reshape(-1)
        if fill.size == 1:
            fill_slots(v, float(fill[0]), values)

    def update(self, v: NodeView, edit) -> None:
        writes = {}
        for axis, entry in enumerate(self._target(v) or []):
            new = edit.new_dim((v.outputs[0], axis))
            if new is not None and isinstance(entry, Known):
                writes[axis] = (entry, new)
        write_sources(edit, writes, v.name)

    @staticmethod
    def _target(v: NodeView) -> "list | None":
        shape = v.const(v.inputs[0])
        if shape is not None:
            return [Known(int(d), (v.name, 0, k)) for k, d in enumerate(shape.reshape(-1))]
        return shape_value(v.tensors[v.inputs[0]], v.opset)
