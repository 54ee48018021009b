"""Recurrent ops: LSTM, GRU and RNN hidden units are channels.

A hidden unit owns one row in every gate block of W [D, G*H, I] and R [D, G*H, H], its column of R,
its entries of B [D, 2*G*H] (the W-bias and R-bias halves), of the peephole P [D, 3*H], of
initial_h / initial_c [.., .., H] and its position in Y [.., .., .., H], Y_h and Y_c. The unit axis
is the last axis of every state tensor in both layouts, so `layout` never changes the ties.

Bidirectional layers: each direction's units are channels of their own. The weights, states and
outputs are named by *paired* slots (direction axis, unit axis), whose element d*H + j is unit j of
direction d, so the union-find keeps forward unit j and backward unit j apart; Transpose and
Reshape carry the pair to the 2*H merged features the next layer reads. The group then holds both
directions with `parts` = the direction of each channel: plans keep the same count in each
(`hidden_size` is one attribute) but choose the units per direction. A state or output read by an
op that only knows single axes (a Gather of `h_n[-1]`) uses the plain unit axis, which ties unit j
of both directions together, as before.

A recurrence exported as a Loop or Scan body is analysed through the body (ops/control_flow.py).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register

PAIR_READERS = {"Transpose", "Reshape", "LSTM", "GRU", "RNN"}
"""Ops whose rules follow a paired (direction, unit) slot; other readers get the plain unit axis."""

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

    def _paired(self, v: NodeView) -> bool:
        w = v.shape(v.inp(W))
        return w is not None and w[0] == 2

    def _weight_slot(self, v: NodeView, name: str, axis: int) -> Slot:
        """A weight axis, paired with the direction axis in a bidirectional layer."""
        return (name, (0, axis)) if self._paired(v) else (name, axis)

    def _hub(self, v: NodeView) -> Slot:
        """Each unit's column of R: the slot every other unit slot is tied to."""
        return self._weight_slot(v, v.inp(R), 2)

    def _state_slot(self, v: NodeView, name: str, output: bool) -> Slot:
        """The unit slot of a state ([D, B, H] / [B, D, H]) or of Y ([T, D, B, H] / [B, T, D, H]);
        paired when the layer is bidirectional and every reader follows pairs."""
        unit = (v.rank(name) or 3) - 1
        if not self._paired(v):
            return (name, unit)
        tensor = v.tensors[name]
        readers = tensor.outputs if output else tensor.inputs
        if isinstance(tensor, gs.Constant) or all(n.op in PAIR_READERS for n in readers):
            return (name, ((1 if unit == 3 else 0) + v.attr("layout", 0), unit))
        return (name, unit)

    def _hidden_slots(self, v: NodeView) -> list[Slot]:
        slots = [self._weight_slot(v, v.inp(W), 1), self._weight_slot(v, v.inp(R), 1), self._hub(v)]
        if v.inp(B):
            slots.append(self._weight_slot(v, v.inp(B), 1))
        if v.op == "LSTM" and v.inp(P):
            slots.append(self._weight_slot(v, v.inp(P), 1))
        for index in self._state_inputs(v):
            if not _zero_state(v, index):
                slots.append(self._state_slot(v, v.inp(index), False))
        for name in v.outputs:
            if name:
                slots.append(self._state_slot(v, name, True))
        return slots

    def _state_inputs(self, v: NodeView) -> list[int]:
        return [INIT_H, INIT_C] if v.op == "LSTM" else [INIT_H]

    def seeds(self, v: NodeView) -> list[Slot]:
        if not (v.is_const(v.inp(W)) and v.is_const(v.inp(R))):
            return []
        outputs = [self._state_slot(v, name, True) for name in v.outputs if name]
        return outputs[:1] or [self._hub(v)]

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
            return self._unit_ties(v, d, g, h, hidden)
        live = [v.inp(k) for k in self._state_inputs(v) if not _zero_state(v, k)]
        if slot[0] in [n for n in (*v.outputs, *live) if n] and slot[1] == (v.rank(slot[0]) or 0) - 1:
            # the plain unit axis of a state named paired here: unit j of every direction
            return [Tie(self._hub(v), slot, np.arange(d * h), np.tile(np.arange(h), d))]
        if slot[0] in (v.inp(INIT_H), v.inp(INIT_C)):
            return []  # a zero initial state is dropped by `update`, not sliced
        return Freeze(f"{v.op} does not carry units on axis {slot[1]} of {slot[0]}")

    def _unit_ties(self, v: NodeView, d: int, g: int, h: int, hidden: list[Slot]) -> list[Tie]:
        """Tie each unit (the hub: its column of R) to its rows, bias entries and state positions.
        In a bidirectional layer the hub is paired (element d*H + j); a state kept on its plain unit
        axis there gets unit j of every direction."""
        hub = self._hub(v)
        paired = isinstance(hub[1], tuple)
        dirs = d if paired else 1
        unit = np.arange(dirs * h)
        direction, j = unit // h, unit % h

        def blocks(count: int) -> tuple[np.ndarray, np.ndarray]:
            rows = direction[None, :] * count * h + np.arange(count)[:, None] * h + j[None, :]
            return np.tile(unit, count), rows.reshape(-1)

        ties = [Tie(hub, self._weight_slot(v, v.inp(W), 1), *blocks(g)),
                Tie(hub, self._weight_slot(v, v.inp(R), 1), *blocks(g))]
        if v.inp(B):
            ties.append(Tie(hub, self._weight_slot(v, v.inp(B), 1), *blocks(2 * g)))
        if v.op == "LSTM" and v.inp(P):
            ties.append(Tie(hub, self._weight_slot(v, v.inp(P), 1), *blocks(3)))
        weights = {v.inp(W), v.inp(R), v.inp(B), v.inp(P) if v.op == "LSTM" else None}
        for s in hidden:
            if s[0] not in weights:
                ties.append(Tie(hub, s, unit, unit if isinstance(s[1], tuple) or not paired else j))
        return ties

    def update(self, v: NodeView, edit) -> None:
        hub = self._hub(v)
        new = edit.new_dim(hub)
        if new is not None:
            edit.set_attr(v.node, "hidden_size", int(new) // (self._dims(v)[0] if isinstance(hub[1], tuple) else 1))
        changed = {slot[0] for slot, gone in edit.removed.items() if len(gone)}
        for index in self._state_inputs(v):
            name = v.inp(index)
            if name and _zero_state(v, index) and (new is not None or name in changed):
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
        rows_slot = self._weight_slot(v, v.inp(R), 1)
        paired = isinstance(rows_slot[1], tuple)
        bias_slot = (name, (0, 1)) if paired else (name, 1)
        edit.analysis.slot_sizes[bias_slot] = (d if paired else 1) * 2 * g * h
        rows = edit.removed.get(rows_slot)
        if rows is not None and len(rows):
            direction, row = rows // (g * h), rows % (g * h)  # a W/R row -> its W-bias and R-bias entries
            edit.removed[bias_slot] = np.sort(np.concatenate([direction * 2 * g * h + row,
                                                              direction * 2 * g * h + g * h + row]))

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        """A unit whose candidate stays 0 from a zero state outputs exactly 0 (Y, Y_h and Y_c)."""
        try:
            d, g, h, i = self._dims(v)
        except ValueError:
            return
        dead = self._dead_units(v, d, g, h)
        if dead is None:
            return
        for name in v.outputs:
            if name:
                slot = self._state_slot(v, name, True)
                per_slot = dead.reshape(-1) if isinstance(slot[1], tuple) else dead.all(axis=0)
                values.set(slot, np.where(per_slot, 0.0, np.nan))

    def _dead_units(self, v: NodeView, d: int, g: int, h: int) -> np.ndarray | None:
        """[D, H]: whether unit j of direction d provably stays 0."""
        readable = v.is_const(v.inp(W)) and v.is_const(v.inp(R)) and (v.inp(B) is None or v.is_const(v.inp(B)))
        if not readable or not self._candidate_zero_at_zero(v, d):
            return None
        c = CANDIDATE[v.op]
        w = v.const(v.inp(W))[:, c * h:(c + 1) * h, :]
        r = v.const(v.inp(R))[:, c * h:(c + 1) * h, :]
        dead = ~np.any(w != 0, axis=2) & ~np.any(r != 0, axis=2)
        bias = v.const(v.inp(B)) if v.inp(B) else None
        if bias is not None:
            wb = bias[:, c * h:(c + 1) * h]
            rb = bias[:, (g + c) * h:(g + c + 1) * h]
            if v.op == "GRU" and v.attr("linear_before_reset", 0):
                dead &= (wb == 0) & (rb == 0)  # r * Rb_h varies with r
            else:
                dead &= (wb + rb) == 0  # ORT adds the two biases once, exactly
        for index in self._state_inputs(v):
            if not _zero_state(v, index):
                state = v.const(v.inp(index))
                if state is None:
                    return None
                direction_axis = 1 if v.attr("layout", 0) else 0
                dead &= ~np.any(np.moveaxis(state, direction_axis, 0) != 0, axis=1)
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

