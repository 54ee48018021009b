"""Pooling and reductions: the channel axis survives when it is not pooled or reduced."""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, ValueTable, identity, register
from onnxprune.ops.norm import norm_statistic


def _channel_only(v: NodeView, slot: Slot, axis: int = 1):
    """Tie input 0 and output 0 on `axis` (pooling keeps N and C, changes the spatial dims)."""
    if slot[1] != axis:
        return Freeze(f"{v.op} pools over axis {slot[1]}")
    if v.op == "MaxPool" and v.out(1) is not None and v.tensors[v.out(1)].outputs:
        return Freeze("MaxPool indices output is used")
    n = v.dim(slot)
    other = (v.outputs[0] if slot[0] == v.inputs[0] else v.inputs[0], axis)
    if n is None or v.dim(other) != n:
        return Freeze("pooling input and output channel counts differ or are unknown")
    return [identity(slot, other, n)]


def _pool_keeps_constant(v: NodeView) -> bool:
    """A constant channel stays the same constant (zero padding does not dilute it)."""
    if v.op in ("GlobalAveragePool", "GlobalMaxPool", "MaxPool"):
        return True
    if v.op == "AveragePool":
        pads = v.attr("pads", [0])
        padded = any(p > 0 for p in pads) or v.attr("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
        return not (padded and v.attr("count_include_pad", 0))
    return False


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
class Pool(OpRule):
    value_preserving = False

    def ties(self, v: NodeView, slot: Slot):
        if slot[1] != 1 and norm_statistic(v, slot):
            return []  # a rank-3 GlobalAveragePool as a LayerNorm mean (tf2onnx): see lossy_reason
        return _channel_only(v, slot)

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        return norm_statistic(v, slot) if slot[1] != 1 else None

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        x = values.get((v.inputs[0], 1))
        if x is None:
            return
        values.set((v.outputs[0], 1), x if _pool_keeps_constant(v) else np.where(x == 0, 0.0, np.nan))


_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}
_REDUCE_KEEPS_CONSTANT = {"ReduceMean", "ReduceMax", "ReduceMin"}


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum")
class Reduce(OpRule):
    """Reductions over axes other than the channel axis; keepdims=0 shifts the axis left."""

    def _axes(self, v: NodeView) -> list[int] | None:
        rank = v.rank(v.inputs[0])
        since = _REDUCE_AXES_INPUT_SINCE.get(v.op, 18)
        axes = v.attr("axes") if v.opset < since else v.int_list("axes", 1)
        if v.opset >= since and v.inp(1) is not None and axes is None:
            return None  # axes computed at run time
        if not axes:
            return None if v.attr("noop_with_empty_axes", 0) else list(range(rank))
        return sorted(a % rank for a in axes)

    def _out_axis(self, v: NodeView, axis: int, axes: list[int]) -> int | None:
        if axis in axes:
            return None
        return axis if v.attr("keepdims", 1) else axis - sum(a < axis for a in axes)

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        axes = self._axes(v) if rank is not None else None
        if axes is None:
            return Freeze("reduction axes unknown")
        if slot[0] == v.inputs[0]:
            in_axis = slot[1]
        else:
            kept = [a for a in range(rank) if a not in axes] if not v.attr("keepdims", 1) else list(range(rank))
            in_axis = kept[slot[1]]
        out_axis = self._out_axis(v, in_axis, axes)
        if out_axis is None and norm_statistic(v, slot):
            return []  # the channels end in a broadcast statistic: valid, lossy (see lossy_reason)
        if out_axis is None:
            return Freeze(f"{v.op} reduces over the channel axis")
        n = v.dim((v.inputs[0], in_axis))
        if n is None or v.dim((v.outputs[0], out_axis)) != n:
            return Freeze("reduction changes the channel count")
        return [identity((v.inputs[0], in_axis), (v.outputs[0], out_axis), n)]

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        return norm_statistic(v, slot)

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        axes = self._axes(v)
        if axes is None or v.op not in _REDUCE_KEEPS_CONSTANT:
            return
        for axis in range(v.rank(v.inputs[0]) or 0):
            x = values.get((v.inputs[0], axis))
            out_axis = self._out_axis(v, axis, axes)
            if x is not None and out_axis is not None:
                values.set((v.outputs[0], out_axis), x)
