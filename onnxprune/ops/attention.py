"""Attention: products of two activations, softmax over keys, and the masks around them.

A head is a unit. Scores `Q·Kᵀ` of shape [B, H, S, S] are anchored on their head axis, so the walk
reaches the (heads, head_dim) split of each projection from the head side: element h·D + d of a
projection belongs to head h, and removing a head removes its D consecutive rows of Wq, Wk, Wv
(and biases) and D input rows of the output projection. Grouped-query attention needs no special
case: the repeat of K/V heads (Unsqueeze → Expand → Reshape) ties each KV head to its query heads,
so a unit is a whole KV group.
"""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register
from onnxprune.ops.elementwise import Broadcast


def is_activation_matmul(v: NodeView) -> bool:
    """MatMul of two run-time tensors (attention scores and context), not a weight layer."""
    return v.op == "MatMul" and not v.is_const(v.inputs[0]) and not v.is_const(v.inputs[1])


def activation_matmul_anchors(v: NodeView) -> list[Slot]:
    """The head axes of a batched product: every static batch axis after the first."""
    y = v.outputs[0]
    rank = v.rank(y)
    if rank is None or rank < 4 or v.rank(v.inputs[0]) != rank or v.rank(v.inputs[1]) != rank:
        return []
    return [(y, axis) for axis in range(1, rank - 2) if (v.dim((y, axis)) or 1) > 1]


def activation_matmul_ties(v: NodeView, slot: Slot) -> "list[Tie] | Freeze":
    """A[..., M, K] @ B[..., K, N]: batch axes pass through, K is contracted between A and B.

    Removing element k of A's last axis together with element k of B's row axis drops one term
    of every dot product, so that tie is a valid (lossy) channel; M and N pass to the output.
    """
    a, b, y = v.inputs[0], v.inputs[1], v.outputs[0]
    rank = v.rank(y)
    if rank is None or rank < 2 or v.rank(a) != rank or v.rank(b) != rank:
        return Freeze("MatMul of two activations with unknown or broadcast ranks")
    n = v.dim(slot)
    if n is None:
        return Freeze(f"unknown size of axis {slot[1]} of {slot[0]} at MatMul")
    axis = slot[1]
    if axis < rank - 2:
        ties = []
        for other in dict.fromkeys((a, b, y)):
            if other == slot[0]:
                continue
            d = v.dim((other, axis))
            if d == n and n != 1:
                ties.append(identity(slot, (other, axis), n))
            elif d != 1:
                return Freeze("MatMul operands differ on a batch axis")
        return ties
    pairs = {(a, rank - 1): (b, rank - 2), (b, rank - 2): (a, rank - 1),
             (a, rank - 2): (y, rank - 2), (y, rank - 2): (a, rank - 2),
             (b, rank - 1): (y, rank - 1), (y, rank - 1): (b, rank - 1)}
    if slot not in pairs or v.dim(pairs[slot]) != n:
        return Freeze("MatMul axes do not line up")
    return [identity(slot, pairs[slot], n)]


def activation_matmul_propagate(v: NodeView, values: ValueTable) -> None:
    """A head whose slice of either operand is all zero yields an all-zero output slice."""
    a, b, y = v.inputs[0], v.inputs[1], v.outputs[0]
    rank = v.rank(y)
    for axis in range(max((rank or 0) - 2, 0)):
        out = values.get((y, axis))
        if out is None:
            continue
        zero = np.zeros(len(out), dtype=bool)
        for name in (a, b):
            vals = values.get((name, axis)) if v.dim((name, axis)) == len(out) else None
            if vals is not None:
                zero |= vals == 0
        values.set((y, axis), np.where(zero, 0.0, np.nan))


@register("Softmax", "LogSoftmax")
class Softmax(OpRule):
    """Every axis except the normalised one(s) keeps its elements independent.

    Before opset 13 the input is flattened to 2-D at `axis`: only the axes before it are free.
    """

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        if rank is None:
            return Freeze(f"{v.op} rank unknown")
        axis = v.attr("axis", -1 if v.opset >= 13 else 1) % rank
        coupled = slot[1] == axis if v.opset >= 13 else slot[1] >= axis
        if coupled:
            return Freeze(f"{v.op} normalises over the channel axis")
        n = v.dim(slot)
        other = v.outputs[0] if slot[0] == v.inputs[0] else v.inputs[0]
        return [identity(slot, (other, slot[1]), n)] if n else Freeze(f"unknown channel count at {v.op}")


@register("Where")
class Where(Broadcast):
    """Select between two broadcast operands by a broadcast condition (masking scores)."""

    def roles(self, v: NodeView) -> dict[str, str]:
        return {name: "param" for name in v.inputs[1:] if v.is_const(name)}

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        return None  # the condition is data: no per-channel constant is provable here


@register("IsNaN", "IsInf", "Not")
class Predicate(OpRule):
    """Element-wise tests that turn a tensor into a same-shaped boolean mask."""

    def ties(self, v: NodeView, slot: Slot):
        n = v.dim(slot)
        other = v.outputs[0] if slot[0] == v.inputs[0] else v.inputs[0]
        if n is None or v.dim((other, slot[1])) != n:
            return Freeze(f"unknown channel count at {v.op}")
        return [identity(slot, (other, slot[1]), n)]
