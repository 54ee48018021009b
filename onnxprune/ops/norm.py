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
    """Axes before `axis` pass through; the normalised axes are coupled across channels."""

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        if rank is None or slot[0] not in (v.inputs[0], v.outputs[0]):
            return Freeze("LayerNormalization parameters span the normalised axes")
        if slot[1] >= v.attr("axis", -1) % rank:
            return Freeze("LayerNormalization normalises over the channel axis")
        n = v.dim(slot)
        other = v.outputs[0] if slot[0] == v.inputs[0] else v.inputs[0]
        return [identity(slot, (other, slot[1]), n)] if n else Freeze("unknown channel count")
