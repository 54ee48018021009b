"""Normalisations. Per-channel ones (BatchNorm, InstanceNorm) shrink their parameters with the
channels; ones that normalise *across* the channel axis change every channel's value when one is
removed, so they freeze it."""

from __future__ import annotations

import numpy as np

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
            return Freeze("LayerNormalization rank unknown")
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
            return Freeze("LayerNormalization normalises over several axes together")
        if any(v.out(i) is not None and v.tensors[v.out(i)].outputs for i in (1, 2)):
            return Freeze("LayerNormalization mean/inv-std outputs are used")
        n = v.dim((x, axis))
        if n is None or any(v.const(p) is None or v.const(p).shape != (n,) for p in params):
            return Freeze("LayerNormalization scale/bias are not per-channel constants")
        if slot not in {(x, axis), (y, axis)} | {(p, 0) for p in params}:
            return Freeze("LayerNormalization does not carry channels there")
        return [identity((x, axis), (y, axis), n)] + [identity((x, axis), (p, 0), n) for p in params]

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        layout = self._layout(v)
        if isinstance(layout, Freeze) or (slot[0] in layout[:2] and slot[1] < layout[3]):
            return None
        return "LayerNormalization normalises over the channel axis: removing channels changes the statistics"

    def roles(self, v: NodeView) -> dict[str, str]:
        return dict(zip([v.inp(1), v.inp(2)], ("scale", "bias"))) if v.inp(1) else {}
