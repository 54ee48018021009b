"""Axis reorderings: Transpose permutes axes, ReverseSequence reverses the time axis; channels
keep their values and move with their axis."""

from __future__ import annotations

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, identity, register, slot_axes


@register("Transpose")
class Transpose(OpRule):
    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        if rank is None:
            return Freeze("Transpose rank unknown")
        perm = list(v.attr("perm", list(range(rank))[::-1]))
        n = v.dim(slot)
        if n is None:
            return Freeze("unknown channel count at Transpose")
        if slot[0] == v.inputs[0]:
            axes = tuple(perm.index(a) for a in slot_axes(slot))  # a paired slot keeps its (outer, inner) order
            return [identity(slot, (v.outputs[0], axes if len(axes) > 1 else axes[0]), n)]
        axes = tuple(perm[a] for a in slot_axes(slot))
        return [identity(slot, (v.inputs[0], axes if len(axes) > 1 else axes[0]), n)]


@register("ReverseSequence")
class ReverseSequence(OpRule):
    """Reverses each sequence along the time axis (Keras writes a backward recurrent layer's output
    so): every other axis but the batch axis passes through unchanged."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze("the sequence lengths of ReverseSequence carry no channels")
        rank = v.rank(x) or v.rank(y)
        fixed = {int(v.attr("batch_axis", 1)) % (rank or 2), int(v.attr("time_axis", 0)) % (rank or 2)}
        n = v.dim((x, slot[1])) or v.dim((y, slot[1]))
        if slot[1] in fixed or n is None:
            return Freeze("channels lie along the batch or time axis of ReverseSequence")
        return [identity((x, slot[1]), (y, slot[1]), n)]
