"""Dense layers: Gemm and MatMul with a constant weight matrix.

Output features are weight columns (rows with transB); input features are weight rows. A MatMul
between two run-time tensors contracts activations with each other and is not a weight layer:
`onnxprune.ops.attention` gives its ties (batch/head axes pass through, the contraction pairs up).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.attention import (activation_matmul_anchors, activation_matmul_propagate, activation_matmul_ties,
                                     is_activation_matmul)
from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, ValueTable, identity, register


@register("Gemm")
class Gemm(OpRule):
    def _axes(self, v: NodeView) -> tuple[int, int, int]:
        """(A's feature axis, B's input axis, B's output axis)."""
        a_feat = 0 if v.attr("transA", 0) else 1
        return (a_feat, 1, 0) if v.attr("transB", 0) else (a_feat, 0, 1)

    def seeds(self, v: NodeView) -> list[Slot]:
        return [(v.outputs[0], 1)] if v.is_const(v.inp(1)) else []

    def roles(self, v: NodeView) -> dict[str, str]:
        roles = {v.inputs[1]: "weight"}
        if v.inp(2):
            roles[v.inputs[2]] = "bias"
        return roles

    def ties(self, v: NodeView, slot: Slot):
        a, b, y, c = v.inputs[0], v.inputs[1], v.outputs[0], v.inp(2)
        a_feat, b_in, b_out = self._axes(v)
        if not v.is_const(b):
            return Freeze("Gemm weight is computed at run time")
        if slot in ((a, a_feat), (b, b_in)):
            n = v.dim((b, b_in))
            return [identity((a, a_feat), (b, b_in), n)]
        if slot in ((y, 1), (b, b_out)) or (c and slot[0] == c):
            n = v.dim((b, b_out))
            ties = [identity((y, 1), (b, b_out), n)]
            if c and v.rank(c) and v.dim((c, v.rank(c) - 1)) == n and n != 1:
                ties.append(identity((y, 1), (c, v.rank(c) - 1), n))
            elif c and v.dim((c, (v.rank(c) or 1) - 1)) not in (1, None):
                return Freeze("Gemm bias shape does not broadcast per output feature")
            return ties
        return Freeze("Gemm batch axis")

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        b = v.const(v.inputs[1])
        _, b_in, b_out = self._axes(v)
        dead = ~np.any(np.moveaxis(b, b_out, 0) != 0, axis=1)
        c = v.const(v.inp(2)) if v.inp(2) else None
        n = b.shape[b_out]
        if c is not None and c.ndim == 2 and c.shape[0] > 1:
            return  # a per-row bias (M, N) or (M, 1) is no per-feature constant: checked before broadcasting
        bias = np.zeros(n) if c is None else np.broadcast_to(c.astype(np.float64), (1, n))[-1]
        values.set((v.outputs[0], 1), np.where(dead, v.attr("beta", 1.0) * bias, np.nan))

    def contraction(self, v: NodeView) -> Slot | None:
        return (v.inputs[0], self._axes(v)[0]) if v.is_const(v.inp(1)) else None

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, vals: np.ndarray, edit) -> None:
        a_feat, b_in, b_out = self._axes(v)
        b = np.moveaxis(v.const(v.inputs[1]).astype(np.float64), b_in, 0)
        delta = v.attr("alpha", 1.0) * (vals @ b[removed])
        beta = v.attr("beta", 1.0)
        if v.inp(2) is None:
            edit.set_attr(v.node, "beta", 1.0)
            beta = 1.0
        if np.any(delta != 0):
            edit.add_to_bias(v, 2, delta / beta, like=(v.outputs[0], 1))


def _transposed_table(v: NodeView) -> gs.Constant | None:
    """The 2-D initializer W when input 1 is `Transpose(W)`: an LM head reading the embedding
    table it is tied to (the constant folding leaves it, rather than store a large table twice)."""
    producers = v.node.inputs[1].inputs if len(v.node.inputs) > 1 else []
    if len(producers) != 1 or producers[0].op != "Transpose" or not isinstance(producers[0].inputs[0], gs.Constant):
        return None
    table = producers[0].inputs[0]
    ok = table.shape is not None and len(table.shape) == 2 and list(producers[0].attrs.get("perm", [1, 0])) == [1, 0]
    return table if ok else None


def has_matmul_weight(v: NodeView) -> bool:
    """Whether input 1 is a constant matrix, as an initializer or as the Transpose of one."""
    return v.is_const(v.inp(1)) or _transposed_table(v) is not None


def matmul_weight(v: NodeView) -> np.ndarray | None:
    """The constant [K, N] matrix a MatMul multiplies by (loaded: call only where values are needed)."""
    w = v.const(v.inp(1))
    if w is not None:
        return w
    table = _transposed_table(v)
    return None if table is None else np.asarray(table.values).T


def _activations(v: NodeView) -> bool:
    return is_activation_matmul(v) and _transposed_table(v) is None


@register("MatMul")
class MatMul(OpRule):
    """x @ W with W a constant matrix (or the Transpose of one): x's last axis meets W's rows, W's
    columns make the output.

    Leading axes of x pass through to the output unchanged.
    """

    def seeds(self, v: NodeView) -> list[Slot]:
        w = v.inp(1)
        return [(w, 1)] if v.is_const(w) and v.rank(w) == 2 else []

    def anchors(self, v: NodeView) -> list[Slot]:
        return activation_matmul_anchors(v) if _activations(v) else []

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        rank = v.rank(v.outputs[0])
        contracted = {(v.inputs[0], (rank or 0) - 1), (v.inputs[1], (rank or 0) - 2)}
        if _activations(v) and slot in contracted:
            return "MatMul of two activations contracts the channel axis: every dot product changes"
        return None

    def roles(self, v: NodeView) -> dict[str, str]:
        return {v.inputs[1]: "weight"} if v.is_const(v.inputs[1]) else {}

    def ties(self, v: NodeView, slot: Slot):
        x, w, y = v.inputs[0], v.inputs[1], v.outputs[0]
        if _activations(v):
            return activation_matmul_ties(v, slot)
        if not has_matmul_weight(v) or v.rank(w) != 2 or v.is_const(x):
            return Freeze("MatMul without a constant 2-D weight")
        rank = v.rank(y)
        if rank is None or v.rank(x) != rank:
            return Freeze("MatMul rank unknown")
        if slot in ((x, rank - 1), (w, 0)):
            return [identity((x, rank - 1), (w, 0), v.dim((w, 0)))]
        if slot in ((y, rank - 1), (w, 1)):
            return [identity((y, rank - 1), (w, 1), v.dim((w, 1)))]
        n = v.dim(slot)
        if n is None:
            return Freeze("unknown size of a MatMul batch axis")
        other = y if slot[0] == x else x
        return [identity(slot, (other, slot[1]), n)]

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        if _activations(v):
            return activation_matmul_propagate(v, values)
        w = matmul_weight(v)
        rank = v.rank(v.outputs[0])
        if w is None or w.ndim != 2 or rank is None:
            return
        dead = ~np.any(w != 0, axis=0)
        values.set((v.outputs[0], rank - 1), np.where(dead, 0.0, np.nan))

    def contraction(self, v: NodeView) -> Slot | None:
        rank = v.rank(v.outputs[0])
        ok = has_matmul_weight(v) and v.rank(v.inputs[1]) == 2 and not v.is_const(v.inputs[0])
        return (v.inputs[0], rank - 1) if ok and rank else None

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, vals: np.ndarray, edit) -> None:
        w = matmul_weight(v)
        delta = vals @ w.astype(np.float64)[removed]
        if np.any(delta != 0):
            edit.add_bias_after(v, delta, like=(v.outputs[0], v.rank(v.outputs[0]) - 1), dtype=w.dtype)
