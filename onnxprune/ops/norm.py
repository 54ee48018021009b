"""Normalisations. Per-channel ones (BatchNorm, InstanceNorm) shrink their parameters with the
channels; ones that normalise *across* the channel axis (LayerNorm, RMSNorm as an op or decomposed)
change every kept channel's value when one is removed, so they prune in lossy mode only."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, ValueTable, identity, register


class _PerChannelNorm(OpRule):
    params: tuple[int, ...] = ()

    def ties(self, v: NodeView, slot: Slot):
        if slot[1] != (1 if slot[0] in (v.inputs[0], v.outputs[0]) else 0):
            return Freeze(f"{v.op} channel axis is 1")
        if any(v.out(i) is not None and v.tensors[v.out(i)].outputs for i in range(1, len(v.outputs))):
            return Freeze(f"{v.op} training-mode outputs are used")
        n = v.dim((v.inputs[0], 1))
        if n is None:
            return Freeze(f"unknown channel count at {v.op}")
        ties = [identity((v.inputs[0], 1), (v.outputs[0], 1), n)]
        for i in self.params:
            if v.inp(i) is None or v.dim((v.inputs[i], 0)) != n:
                return Freeze(f"{v.op} parameter {i} is not per-channel")
            ties.append(identity((v.inputs[0], 1), (v.inputs[i], 0), n))
        return ties


@register("BatchNormalization")
class BatchNorm(_PerChannelNorm):
    params = (1, 2, 3, 4)

    def roles(self, v: NodeView) -> dict[str, str]:
        return dict(zip(v.inputs[1:5], ("scale", "bias", "stat", "stat")))

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        x = values.get((v.inputs[0], 1))
        consts = [v.const(v.inp(i)) for i in self.params]
        if x is None or any(c is None for c in consts):
            return
        scale, bias, mean, var = (c.astype(np.float64) for c in consts)
        y = scale * (x - mean) / np.sqrt(var + v.attr("epsilon", 1e-5)) + bias
        values.set((v.outputs[0], 1), np.where(scale == 0, bias, y))


@register("InstanceNormalization")
class InstanceNorm(_PerChannelNorm):
    params = (1, 2)

    def roles(self, v: NodeView) -> dict[str, str]:
        return dict(zip(v.inputs[1:3], ("scale", "bias")))

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        x = values.get((v.inputs[0], 1))
        scale, bias = v.const(v.inp(1)), v.const(v.inp(2))
        if x is None or scale is None or bias is None:
            return
        # A constant channel normalises to 0, so only the shift survives.
        values.set((v.outputs[0], 1), np.where(~np.isnan(x) | (scale == 0), bias.astype(np.float64), np.nan))


@register("LayerNormalization")
class LayerNorm(OpRule):
    """Axes before `axis` pass through. A single normalised (last) axis with per-channel scale and
    bias can lose channels, but the mean and variance then cover fewer values, so the remaining
    channels change: such groups prune in lossy mode only (see `lossy_reason`)."""

    def _layout(self, v: NodeView):
        """(x, y, rank, first normalised axis, per-channel parameter names) or a Freeze."""
        x, y, rank = v.inputs[0], v.outputs[0], v.rank(v.inputs[0])
        if rank is None:
            return Freeze(f"{v.op} rank unknown")
        params = [v.inp(i) for i in (1, 2) if v.inp(i)]
        return x, y, rank, v.attr("axis", -1) % rank, params

    def ties(self, v: NodeView, slot: Slot):
        layout = self._layout(v)
        if isinstance(layout, Freeze):
            return layout
        x, y, rank, axis, params = layout
        if slot[0] in (x, y) and slot[1] < axis:
            n = v.dim(slot)
            other = y if slot[0] == x else x
            return [identity(slot, (other, slot[1]), n)] if n else Freeze("unknown channel count")
        if axis != rank - 1:
            return Freeze(f"{v.op} normalises over several axes together")
        if any(v.out(i) is not None and v.tensors[v.out(i)].outputs for i in (1, 2)):
            return Freeze(f"{v.op} statistics outputs are used")
        n = v.dim((x, axis))
        if n is None or any(v.const(p) is None or v.const(p).shape != (n,) for p in params):
            return Freeze(f"{v.op} scale/bias are not per-channel constants")
        if slot not in {(x, axis), (y, axis)} | {(p, 0) for p in params}:
            return Freeze(f"{v.op} does not carry channels there")
        return [identity((x, axis), (y, axis), n)] + [identity((x, axis), (p, 0), n) for p in params]

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        layout = self._layout(v)
        if isinstance(layout, Freeze) or (slot[0] in layout[:2] and slot[1] < layout[3]):
            return None
        return f"{v.op} normalises over the channel axis: removing channels changes the statistics"

    def roles(self, v: NodeView) -> dict[str, str]:
        return dict(zip([v.inp(1), v.inp(2)], ("scale", "bias"))) if v.inp(1) else {}


@register("RMSNormalization")
class RMSNorm(LayerNorm):
    """x / sqrt(mean(x²) + eps) · scale (opset 23): no mean subtraction and no bias, otherwise the
    same channel structure and the same lossy-only semantics as LayerNormalization."""


RMS_REASON = "RMSNorm (mean of squares over the channel axis): removing channels changes the statistics"
LN_REASON = ("LayerNorm written out as primitive ops (mean and variance over the channel axis): "
             "removing channels changes the statistics")


def _last_axis_mean(v: NodeView, slot: Slot) -> bool:
    """Whether this node averages its input over exactly the last axis, read over that axis, keeping
    it as a size-1 dim that broadcasts back: ReduceMean (axes attribute before opset 18, input
    since) or a rank-3 GlobalAveragePool, which tf2onnx writes for a last-axis tf.reduce_mean."""
    x = v.inputs[0]
    rank = v.rank(x)
    if rank is None or slot != (x, rank - 1):
        return False
    if v.op == "GlobalAveragePool":
        return rank == 3
    if v.op != "ReduceMean" or not v.attr("keepdims", 1):
        return False
    axes = v.attr("axes") if v.opset < 18 else v.int_list("axes", 1)
    return axes is not None and [a % rank for a in axes] == [rank - 1]


def _cast_root(t: gs.Tensor) -> gs.Tensor:
    """The tensor whose values `t` holds, past any chain of Casts (fp16 exports compute the
    statistics of a norm in float32 between Casts)."""
    while len(t.inputs) == 1 and t.inputs[0].op == "Cast":
        t = t.inputs[0].inputs[0]
    return t


def _cast_readers(t: gs.Tensor) -> list[tuple[gs.Node, gs.Tensor]]:
    """The nodes reading `t` directly or through Casts, each with the tensor it reads."""
    found: list[tuple[gs.Node, gs.Tensor]] = []
    for node in t.outputs:
        if node.op == "Cast":
            found.extend(_cast_readers(node.outputs[0]))
        else:
            found.append((node, t))
    return found


def _product_with(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The other factor when `node` is the two-input Mul `t · s`, else None."""
    if node.op != "Mul" or len(node.inputs) != 2 or not any(i is t for i in node.inputs):
        return None
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


def _subtracts_from(node: gs.Node, mean: gs.Tensor, root: gs.Tensor) -> bool:
    """Whether this use of `mean` subtracts it from `root`: `root - mean` (torch), or tf2onnx's
    Keras form `root·s + ((-mean)·s + β)`, the same factor s on both sides of the final Add."""
    if node.op == "Sub":
        return len(node.inputs) == 2 and node.inputs[1] is mean and _cast_root(node.inputs[0]) is root
    negated = node.outputs[0] if node.op == "Neg" else None
    if negated is None or len(negated.outputs) != 1:
        return False
    scale = _product_with(negated.outputs[0], negated)
    if scale is None:
        return False
    shift = negated.outputs[0].outputs[0]
    # Follow the shift through the Adds that join it (β) to the one adding root·s.
    while len(shift.outputs) == 1 and shift.outputs[0].op == "Add" and len(shift.outputs[0].inputs) == 2:
        add = shift.outputs[0]
        other = add.inputs[1] if add.inputs[0] is shift else add.inputs[0]
        factor = _product_with(other.inputs[0], scale) if len(other.inputs) == 1 else None
        if factor is not None and _cast_root(factor) is root:
            return True
        shift = add.outputs[0]
    return False


def _centering_mean(v: NodeView) -> bool:
    """Whether every use of this mean subtracts it from the tensor it was computed from (through
    Casts): `x - mean(x)`, the first step of a LayerNorm written out as primitive ops. A mean used
    any other way (a pooled feature, subtracted from another tensor) is not a norm statistic."""
    root = _cast_root(v.node.inputs[0])
    readers = _cast_readers(v.node.outputs[0])
    return bool(readers) and all(_subtracts_from(node, mean, root) for node, mean in readers)


def _squared(t: gs.Tensor) -> gs.Tensor | None:
    """The tensor that `t` is the square of (`Pow(a, 2)` or `a·a`), or None."""
    if len(t.inputs) != 1 or len(t.inputs[0].inputs) != 2:
        return None
    node = t.inputs[0]
    if node.op == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    if node.op == "Pow" and isinstance(node.inputs[1], gs.Constant):
        exponent = np.asarray(node.inputs[1].values)
        return node.inputs[0] if exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0 else None
    return None


def _centered(t: gs.Tensor, v: NodeView) -> bool:
    """Whether `t` is (a Cast of) `x - mean(x)` with a centering mean (a LayerNorm's deviation)."""
    sub = _cast_root(t).inputs
    if len(sub) != 1 or sub[0].op != "Sub" or len(sub[0].inputs) != 2:
        return False
    means = _cast_root(sub[0].inputs[1]).inputs
    if len(means) != 1:
        return False
    mean = NodeView(means[0], v.tensors, v.opset)
    return _last_axis_mean(mean, (mean.inputs[0], (mean.rank(mean.inputs[0]) or 0) - 1)) and _centering_mean(mean)


def norm_statistic(v: NodeView, slot: Slot) -> str | None:
    """Why removing channels changes values, when this reduction over `slot` (the last, channel
    axis) is the statistic of a norm written out as primitive ops, else None (it then freezes).
    The [..., 1] statistic broadcasts back, so the pruned graph stays valid but averages over the
    kept channels only: lossy mode only. Recognised by structure: a mean subtracted from its own
    input (LayerNorm), the mean of that deviation's square (its variance), or a mean of squares
    (RMSNorm, as torch exports Llama-style norms)."""
    if not _last_axis_mean(v, slot):
        return None
    if _centering_mean(v):
        return LN_REASON
    squared = _squared(v.node.inputs[0])
    if squared is None:
        return None
    return LN_REASON if _centered(squared, v) else RMS_REASON
