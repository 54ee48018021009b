"""Concat and Split: each input (output) occupies an offset range of the joined axis."""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, identity, register


@register("Concat")
class Concat(OpRule):
    """Each input occupies an offset range of the output's concat axis; other axes are shared."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.outputs[0])
        if rank is None:
            return Freeze("Concat rank unknown")
        axis = v.attr("axis") % rank
        y = v.outputs[0]
        if slot[1] != axis:
            n = v.dim(slot)
            if n is None or any(v.dim((t, slot[1])) != n for t in v.inputs + [y]):
                return Freeze("Concat operands differ on the channel axis")
            return [identity((y, slot[1]), (t, slot[1]), n) for t in dict.fromkeys(v.inputs)]
        ties, offset = [], 0
        for t in v.inputs:
            n = v.dim((t, axis))
            if n is None:
                return Freeze("Concat input size unknown")
            idx = np.arange(n)
            if n:
                ties.append(Tie((t, axis), (y, axis), idx, idx + offset))
            offset += n
        return ties


@register("Split")
class Split(OpRule):
    """Output j is the offset range of input elements; `split` sizes follow the kept channels."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        x = v.inputs[0]
        rank = v.rank(x)
        if rank is None:
            return Freeze("Split rank unknown")
        axis = v.attr("axis", 0) % rank
        if slot[1] != axis:
            n = v.dim(slot)
            if n is None:
                return Freeze("unknown channel count at Split")
            return [identity((x, slot[1]), (y, slot[1]), n) for y in v.outputs if y]
        ties, offset = [], 0
        for y in v.outputs:
            n = v.dim((y, axis))
            if n is None:
                return Freeze("Split output size unknown")
            idx = np.arange(n)
            ties.append(Tie((x, axis), (y, axis), idx + offset, idx))
            offset += n
        if offset != v.dim((x, axis)):
            return Freeze("Split outputs do not cover the input")
        return ties

    def update(self, v: NodeView, edit) -> None:
        axis = v.attr("axis", 0) % v.rank(v.inputs[0])
        sizes = [edit.new_dim((y, axis)) or v.dim((y, axis)) for y in v.outputs]
        old = [v.dim((y, axis)) for y in v.outputs]
        if sizes == old:
            return
        if v.opset < 13:
            edit.set_attr(v.node, "split", sizes)
        else:
            edit.del_attr(v.node, "num_outputs")
            edit.set_input_const(v.node, 1, np.array(sizes, dtype=np.int64))
