"""Slice and Gather: they select elements; channels pass through the axes they do not select on,
and constant positions on the selected axis are rewritten to the kept channels."""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, identity, register
from onnxprune.ops.chunks import chunk_ties


def _slice_params(v: NodeView) -> tuple[list[int], list[int], list[int], list[int]] | None:
    rank = v.rank(v.inputs[0])
    starts = v.int_list("starts", 1)
    ends = v.int_list("ends", 2)
    if starts is None or ends is None or rank is None:
        return None
    axes = v.int_list("axes", 3) if (v.opset < 10 and "axes" in v.node.attrs) or v.inp(3) else list(range(len(starts)))
    steps = v.int_list("steps", 4) if v.inp(4) else [1] * len(starts)
    if axes is None or steps is None:
        return None
    return starts, ends, [a % rank for a in axes], steps


@register("Slice")
class Slice(OpRule):
    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        params = _slice_params(v)
        if params is None:
            return chunk_ties(v, slot)
        starts, ends, axes, steps = params
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze("Slice parameter is not a channel tensor")
        axis = slot[1]
        n_in, n_out = v.dim((x, axis)), v.dim((y, axis))
        if n_in is None or n_out is None:
            return Freeze("unknown channel count at Slice")
        if axis not in axes:
            return [identity((x, axis), (y, axis), n_in)]
        k = axes.index(axis)
        if steps[k] != 1:
            return Freeze("Slice with a step on the channel axis")
        start = max(0, min(starts[k] + n_in if starts[k] < 0 else starts[k], n_in))
        idx = np.arange(n_out)
        return [Tie((x, axis), (y, axis), idx + start, idx)]

    def update(self, v: NodeView, edit) -> None:
        params = _slice_params(v)
        if params is None:
            return  # run-time bounds of an equal chunk follow the pruned channel count (chunks.py)
        starts, ends, axes, steps = params
        x, y = v.inputs[0], v.outputs[0]
        new_starts, new_ends, changed = list(starts), list(ends), False
        for k, axis in enumerate(axes):
            kept = edit.kept((x, axis))
            if kept is None:
                continue
            n_in = v.dim((x, axis))
            start = max(0, min(starts[k] + n_in if starts[k] < 0 else starts[k], n_in))
            new_start = int(np.sum(kept < start))
            new_starts[k] = new_start
            new_ends[k] = new_start + (edit.new_dim((y, axis)) or v.dim((y, axis)))
            changed = True
        if not changed:
            return
        if v.opset < 10:
            edit.set_attr(v.node, "starts", new_starts)
            edit.set_attr(v.node, "ends", new_ends)
        else:
            dtype = v.const(v.inputs[1]).dtype
            edit.set_input_const(v.node, 1, np.array(new_starts, dtype=dtype))
            edit.set_input_const(v.node, 2, np.array(new_ends, dtype=dtype))


@register("Gather")
class Gather(OpRule):
    """Axes other than the gathered one pass through, whatever the indices (ViT's class token
    `x[:, 0]`, an embedding lookup's hidden axis). On the gathered axis, constant indices map each
    output element to the input element they name (the dynamo exporter's `as_strided` on a
    flattened tensor) and are rewritten to the kept positions; indices computed at run time, or a
    scalar index picking one channel, freeze it.

    An embedding lookup (a 2-D constant table, axis 0, run-time ids) defines channels like a weight:
    the table's columns are the model's hidden size, so they seed a group that is the residual
    stream (`hidden`), pruned only on request."""

    value_preserving = True

    def _layout(self, v: NodeView):
        x, idx, y = v.inputs[0], v.const(v.inp(1)), v.outputs[0]
        rank = v.rank(x)
        idx_rank = idx.ndim if idx is not None else v.rank(v.inp(1))
        if rank is None or idx_rank is None:
            return Freeze("Gather rank of the data or the indices is unknown")
        return x, idx, idx_rank, y, v.attr("axis", 0) % rank

    def _table(self, v: NodeView) -> str | None:
        """The embedding table this node looks up, or None when it is not an embedding lookup
        (read from the tensor's shape and dtype: a large table is not loaded for this)."""
        table = v.tensors.get(v.inputs[0]) if v.is_const(v.inputs[0]) else None
        if table is None or table.shape is None or len(table.shape) != 2 or v.attr("axis", 0) % 2 != 0:
            return None
        return v.inputs[0] if v.inp(1) is not None and not v.is_const(v.inp(1)) else None

    def seeds(self, v: NodeView) -> list[Slot]:
        return self.hidden(v)

    def hidden(self, v: NodeView) -> list[Slot]:
        table = self._table(v)
        return [(table, 1)] if table is not None and v.dim((table, 1)) else []

    def roles(self, v: NodeView) -> dict[str, str]:
        table = self._table(v)
        return {table: "weight"} if table is not None else {}

    def ties(self, v: NodeView, slot: Slot):
        layout = self._layout(v)
        if isinstance(layout, Freeze):
            return layout
        x, idx, idx_rank, y, axis = layout
        if slot[0] not in (x, y):
            return Freeze("Gather indices are not a channel tensor")
        in_axis = slot[1] if slot[0] == x else _gather_in_axis(slot[1], axis, idx_rank)
        out_axis = slot[1] if slot[0] == y else (slot[1] if slot[1] < axis else slot[1] + idx_rank - 1)
        if in_axis is not None and in_axis != axis:
            n = v.dim((x, in_axis))
            return [identity((x, in_axis), (y, out_axis), n)] if n else Freeze("unknown channel count at Gather")
        if idx is None:
            return Freeze("Gather indices computed at run time pick elements of the channel axis")
        wide = [k for k, d in enumerate(idx.shape) if d != 1]
        n = v.dim((x, axis))
        if n is None or len(wide) != 1 or (slot[0] == y and slot[1] != axis + wide[0]):
            return Freeze("Gather picks single elements of the channel axis")
        picked = idx.reshape(-1) % n
        return [Tie((x, axis), (y, axis + wide[0]), picked, np.arange(len(picked)))]

    def update(self, v: NodeView, edit) -> None:
        layout = self._layout(v)
        if isinstance(layout, Freeze) or layout[1] is None:
            return  # only constant indices on the gathered axis are rewritten
        x, idx, _, y, axis = layout
        kept_in = edit.kept((x, axis))
        wide = [k for k, d in enumerate(idx.shape) if d != 1]
        if kept_in is None or len(wide) != 1:
            return
        n = v.dim((x, axis))
        picked = idx.reshape(-1) % n
        kept_out = edit.kept((y, axis + wide[0]))
        kept_out = np.arange(len(picked)) if kept_out is None else kept_out
        new = np.searchsorted(kept_in, picked[kept_out]).astype(idx.dtype)
        shape = list(idx.shape)
        shape[wide[0]] = len(new)
        edit.set_input_const(v.node, 1, new.reshape(shape))


def _gather_in_axis(out_axis: int, axis: int, index_rank: int) -> int | None:
    """The data axis an output axis of Gather comes from (None: an axis of the indices)."""
    if out_axis < axis:
        return out_axis
    if out_axis >= axis + index_rank:
        return out_axis - index_rank + 1
    return None
