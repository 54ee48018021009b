"""Recurrent ops: LSTM, GRU and RNN hidden units are channels.

A hidden unit owns one row in every gate block of W [D, G*H, I] and R [D, G*H, H], its column of R,
its entries of B [D, 2*G*H] (the W-bias and R-bias halves), of the peephole P [D, 3*H], of
initial_h / initial_c [.., .., H] and its position in Y [.., .., .., H], Y_h and Y_c. The unit axis
is the last axis of every state tensor in both layouts, so `layout` never changes the ties.

Bidirectional layers: the two directions share the unit axis of Y, Y_h and Y_c, and exporters merge
Y into 2*H features with a Reshape whose element ties pair forward unit j with backward unit j.
A channel is therefore unit j *of both directions*: both directions keep the same count and the
same indices, and a channel is scored by both directions' weights. (Keeping different units per
direction would need slots spanning two axes; see docs/recurrent.md.)

A recurrence exported as a Loop or Scan body is analysed through the body (ops/control_flow.py).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Gate blocks per op, in ONNX order: LSTM i, o, f, c; GRU z, r, h; RNN one."""

CANDIDATE = {"LSTM": 3, "GRU": 2, "RNN": 0}
"""Index of the block whose activation must be 0 for a unit to stay exactly 0."""

DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
ZERO_AT_ZERO = {"Tanh", "Relu", "LeakyRelu", "ThresholdedRelu", "Elu", "Softsign", "ScaledTanh"}
"""Activations f with f(0) = 0 whatever their alpha/beta."""

ZERO_KEEPING = {"Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Cast", "Expand", "Slice", "Gather",
                "Split", "Tile"}
"""Ops whose output is all zero when their first input (the data) is."""

X, W, R, B, SEQ_LENS, INIT_H, INIT_C, P = range(8)
"""Input positions of the recurrent ops (GRU and RNN stop at INIT_H)."""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _zero_state(v: NodeView, index: int) -> bool:
    """Whether an initial-state input is provably all zeros (absent, a zero constant, or zeros of a
    run-time shape: a zero constant or ConstantOfShape(0) through Expand, Slice, Unsqueeze, ...)."""
    name = v.inp(index)
    if name is None:
        return True
    value = v.const(name)
    if value is not None:
        return not np.any(value)
    node = _producer(v.tensors[name])
    while node is not None and node.op in ZERO_KEEPING and not isinstance(node.inputs[0], gs.Constant):
        node = _producer(node.inputs[0])  # Keras: Unsqueeze(Expand(0, ..)); torch: Slice(ConstantOfShape)
    if node is None:
        return False
    if node.op in ZERO_KEEPING and isinstance(node.inputs[0], gs.Constant):
        return not np.any(np.asarray(node.inputs[0].values))
    if node.op == "ConstantOfShape":
        fill = node.attrs.get("value")
        return fill is None or not np.any(np.asarray(fill.values if hasattr(fill, "values") else fill))
    return False


class _Recurrent(OpRule):
    """Shared machinery; the op type picks the gate count and candidate block."""

    def _dims(self, v: NodeView) -> tuple[int, int, int, int]:
        """(directions D, gates G, hidden H, input size I) from the static weight shapes."""
        w, r = v.shape(v.inp(W)), v.shape(v.inp(R))
        if w is None or r is None or any(not isinstance(d, int) for d in (*w, *r)):
            raise ValueError("weight shapes unknown")
        g, h = GATES[v.op], r[2]
        if w[1] != g * h or r[1] != g * h or v.attr("hidden_size", h) != h:
            raise ValueError(f"weights do not match hidden_size {v.attr('hidden_size')}")
        return w[0], g, h, w[2]

    def _hidden_slots(self, v: NodeView) -> list[Slot]:
        slots = [(v.inp(W), 1), (v.inp(R), 1), (v.inp(R), 2)]
        if v.inp(B):
            slots.append((v.inp(B), 1))
        if v.op == "LSTM" and v.inp(P):
            slots.append((v.inp(P), 1))
        for index in self._state_inputs(v):
            if not _zero_state(v, index):
                slots.append((v.inp(index), 2))
        for index, name in enumerate(v.outputs):
            if name:
                slots.append((name, 3 if index == 0 else 2))
        return slots

    def _state_inputs(self, v: NodeView) -> list[int]:
        return [INIT_H, INIT_C] if v.op == "LSTM" else [INIT_H]

    def seeds(self, v: NodeView) -> list[Slot]:
        if not (v.is_const(v.inp(W)) and v.is_const(v.inp(R))):
            return []
        outputs = [(name, 3 if index == 0 else 2) for index, name in enumerate(v.outputs) if name]
        return outputs[:1] or [(v.inp(R), 2)]

    def roles(self, v: NodeView) -> dict[str, str]:
        roles = {v.inp(W): "weight", v.inp(R): "weight"}
        if v.inp(B):
            roles[v.inp(B)] = "bias"
        if v.op == "LSTM" and v.inp(P):
            roles[v.inp(P)] = "param"
        return roles

    def ties(self, v: NodeView, slot: Slot):
        if not (v.is_const(v.inp(W)) and v.is_const(v.inp(R))):
            return Freeze(f"{v.op} weights are computed at run time")
        d, g, h, i = self._dims(v)
        if slot in ((v.inputs[X], 2), (v.inp(W), 2)):
            return [identity((v.inputs[X], 2), (v.inp(W), 2), i)]
        hidden = self._hidden_slots(v)
        if slot in hidden:
            return self._unit_ties(v, g, h, hidden)
        if slot[0] in (v.inp(INIT_H), v.inp(INIT_C)) and slot[1] == 2:
            return []  # a zero initial state is dropped by `update`, not sliced
        return Freeze(f"{v.op} does not carry units on axis {slot[1]} of {slot[0]}")

    def _unit_ties(self, v: NodeView, g: int, h: int, hidden: list[Slot]) -> list[Tie]:
        """Tie each unit (the hub: its column of R) to its rows, bias entries and state positions."""
        hub = (v.inp(R), 2)
        unit = np.arange(h)

        def blocks(count: int) -> tuple[np.ndarray, np.ndarray]:
            return np.tile(unit, count), (np.arange(count)[:, None] * h + unit[None, :]).reshape(-1)

        ties = [Tie(hub, (v.inp(W), 1), *blocks(g)), Tie(hub, (v.inp(R), 1), *blocks(g))]
        if v.inp(B):
            ties.append(Tie(hub, (v.inp(B), 1), *blocks(2 * g)))
        if v.op == "LSTM" and v.inp(P):
            ties.append(Tie(hub, (v.inp(P), 1), *blocks(3)))
        for s in hidden:
            if s[0] not in (v.inp(W), v.inp(R), v.inp(B), v.inp(P) if v.op == "LSTM" else None):
                ties.append(identity(hub, s, h))
        return ties

    def update(self, v: NodeView, edit) -> None:
        new = edit.new_dim((v.inp(R), 2))
        if new is not None:
            edit.set_attr(v.node, "hidden_size", int(new))
        for index in self._state_inputs(v):
            name = v.inp(index)
            touched = any(edit.new_dim((name, axis)) for axis in range(v.rank(name) or 0)) if name else False
            if name and _zero_state(v, index) and (new is not None or touched):
                v.node.inputs[index] = gs.Variable.empty()  # absent initial state means zeros

    def contraction(self, v: NodeView) -> Slot | None:
        bias_readable = v.inp(B) is None or v.is_const(v.inp(B))  # compensation rewrites B
        return (v.inputs[X], 2) if v.is_const(v.inp(W)) and bias_readable else None

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, vals: np.ndarray, edit) -> None:
        """Constant input features add W[:, :, c] * value to every gate, like the W-bias does."""
        d, g, h, i = self._dims(v)
        w = v.const(v.inp(W)).astype(np.float64)
        delta = w[:, :, removed] @ vals  # [D, G*H]
        if not np.any(delta):
            return
        old = v.const(v.inp(B)) if v.inp(B) else None
        dtype = v.const(v.inp(W)).dtype if old is None else old.dtype
        bias = np.zeros((d, 2 * g * h)) if old is None else old.astype(np.float64)
        bias[:, :g * h] += delta
        name = edit.unique_name(f"{v.name}_bias_comp")
        edit.set_input_const(v.node, B, bias.astype(dtype), name)
        edit.analysis.slot_sizes[(name, 1)] = 2 * g * h
        rows = edit.removed.get((v.inp(R), 1))
        if rows is not None and len(rows):
            edit.removed[(name, 1)] = np.concatenate([rows, rows + g * h])

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        """A unit whose candidate stays 0 from a zero state outputs exactly 0 (Y, Y_h and Y_c)."""
        try:
            d, g, h, i = self._dims(v)
        except ValueError:
            return
        dead = self._dead_units(v, d, g, h)
        if dead is None:
            return
        vals = np.where(dead, 0.0, np.nan)
        for index, name in enumerate(v.outputs):
            if name:
                values.set((name, 3 if index == 0 else 2), vals)

    def _dead_units(self, v: NodeView, d: int, g: int, h: int) -> np.ndarray | None:
        readable = v.is_const(v.inp(W)) and v.is_const(v.inp(R)) and (v.inp(B) is None or v.is_const(v.inp(B)))
        if not readable or not self._candidate_zero_at_zero(v, d):
            return None
        c = CANDIDATE[v.op]
        w = v.const(v.inp(W))[:, c * h:(c + 1) * h, :]
        r = v.const(v.inp(R))[:, c * h:(c + 1) * h, :]
        dead = ~np.any(w != 0, axis=(0, 2)) & ~np.any(r != 0, axis=(0, 2))
        bias = v.const(v.inp(B)) if v.inp(B) else None
        if bias is not None:
            wb = bias[:, c * h:(c + 1) * h]
            rb = bias[:, (g + c) * h:(g + c + 1) * h]
            if v.op == "GRU" and v.attr("linear_before_reset", 0):
                dead &= ~np.any(wb != 0, axis=0) & ~np.any(rb != 0, axis=0)  # r * Rb_h varies with r
            else:
                dead &= ~np.any((wb + rb) != 0, axis=0)  # ORT adds the two biases once, exactly
        for index in self._state_inputs(v):
            if not _zero_state(v, index):
                state = v.const(v.inp(index))
                if state is None:
                    return None
                dead &= ~np.any(state.reshape(-1, h) != 0, axis=0)
        return dead

    def _candidate_zero_at_zero(self, v: NodeView, d: int) -> bool:
        """The activations a dead unit's state passes through must map 0 to 0 in every direction."""
        per_dir = len(DEFAULT_ACTIVATIONS[v.op])
        names = [_text(a) for a in v.attr("activations", [])] or DEFAULT_ACTIVATIONS[v.op] * d
        if len(names) != per_dir * d:
            return False  # a malformed list: prove nothing
        used = {"LSTM": (1, 2), "GRU": (1,), "RNN": (0,)}[v.op]
        return all(names[k * per_dir + u] in ZERO_AT_ZERO for k in range(d) for u in used)


@register("LSTM")
class LSTM(_Recurrent):
    pass


@register("GRU")
class GRU(_Recurrent):
    pass


@register("RNN")
class RNN(_Recurrent):
    pass

