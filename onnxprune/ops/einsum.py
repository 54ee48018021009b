"""Einsum: a general contraction, read from its equation.

A label shared by several terms ties those axes element for element; a constant operand is a
weight and shrinks along pruned labels; `x·W` with one contracted label is a dense layer.
"""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, ValueTable, identity, register


EinsumLabels = "tuple[list[list[str]], list[str]]"
"""One label per axis of each operand, and of the output."""


def _term_labels(term: str, rank: int | None) -> "list[str] | str":
    """Labels of one Einsum term over `rank` axes, or why the term is not understood.

    Ellipsis axes get labels numbered from the right ('...0' is the last one), so operands of
    different ranks line up the way broadcasting aligns them.
    """
    head, dots, tail = term.partition("...")
    if "." in head + tail or not all(c.isalpha() and c.isascii() for c in head + tail):
        return f"Einsum term {term!r} is not letters with at most one '...'"
    if rank is None:
        return "Einsum operand rank unknown"
    extra = rank - len(head) - len(tail)
    if extra < 0 or (extra and not dots):
        return f"Einsum term {term!r} does not match a rank-{rank} operand"
    return list(head) + [f"...{extra - 1 - k}" for k in range(extra)] + list(tail)


def einsum_labels(equation: str, ranks: list[int | None], out_rank: int | None) -> "EinsumLabels | str":
    """Parse an Einsum equation (explicit or implicit output, '...' allowed, spaces ignored).

    Returns the labels per axis, or the reason it is left alone: a label repeated within one term
    (a diagonal or trace) or anything malformed freezes the channels that meet the node.
    """
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks) or "->" in rhs:
        return f"Einsum equation {equation!r} does not match its {len(ranks)} inputs"
    inputs = [_term_labels(t, r) for t, r in zip(terms, ranks)]
    errors = [x for x in inputs if isinstance(x, str)]
    if errors:
        return errors[0]
    if any(len(set(x)) != len(x) for x in inputs):
        return "Einsum repeats a label within one term (a diagonal or trace)"
    dots = max((sum(lab.startswith("...") for lab in x) for x in inputs), default=0)
    if arrow:
        rank = len(rhs.replace("...", "")) + (dots if "..." in rhs else 0)
        output = _term_labels(rhs, out_rank if out_rank is not None else rank)
    else:
        once = sorted(lab for lab in {lab for x in inputs for lab in x} if not lab.startswith("...")
                      and sum(x.count(lab) for x in inputs) == 1)
        output = [f"...{dots - 1 - k}" for k in range(dots)] + once
    if isinstance(output, str):
        return output
    known = {lab for x in inputs for lab in x}
    if len(set(output)) != len(output) or not set(output) <= known or (out_rank not in (None, len(output))):
        return f"Einsum output of {equation!r} is malformed"
    return inputs, output


@register("Einsum", opsets=(12, 10**6))
class Einsum(OpRule):
    """A general contraction: a label shared by several terms ties those axes element for element.

    A label in an input and the output passes through; a label shared by two inputs and not in the
    output is contracted, so removing its element k drops the k-th term of every sum (exact when
    that element is zero on either side, lossy otherwise). Constant operands are weights and shrink
    along pruned labels; `x·W` with one contracted label and W's other label last in the output
    is a dense layer (seeded by W's output label, dead inputs folded into a bias after it).
    """

    def _parse(self, v: NodeView) -> "EinsumLabels | str":
        equation = v.attr("equation", "")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        if len(set(v.inputs)) != len(v.inputs):
            return "Einsum reads the same tensor in two terms"
        return einsum_labels(equation, [v.rank(name) for name in v.inputs], v.rank(v.outputs[0]))

    def _positions(self, v: NodeView, labels: EinsumLabels) -> list[tuple[str, list[str]]]:
        return list(zip(v.inputs, labels[0])) + [(v.outputs[0], labels[1])]

    def _label(self, v: NodeView, slot: Slot) -> "tuple[EinsumLabels, str] | str":
        parsed = self._parse(v)
        if isinstance(parsed, str):
            return parsed
        for name, labels in self._positions(v, parsed):
            if name == slot[0] and slot[1] < len(labels):
                return parsed, labels[slot[1]]
        return f"axis {slot[1]} of {slot[0]} is not an Einsum axis"

    def ties(self, v: NodeView, slot: Slot):
        found = self._label(v, slot)
        if isinstance(found, str):
            return Freeze(found)
        parsed, label = found
        n = v.dim(slot)
        if n is None:
            return Freeze(f"unknown size of Einsum label {label!r}")
        ties = []
        for name, labels in self._positions(v, parsed):
            if name == slot[0] or label not in labels:
                continue
            other = (name, labels.index(label))
            d = v.dim(other)
            if d == n and n != 1:
                ties.append(identity(slot, other, n))
            elif d != 1 and n != 1:
                return Freeze(f"Einsum label {label!r} has sizes {n} and {d}")
        return ties

    def _dense(self, v: NodeView) -> "tuple[str, int, int, int] | None":
        """(x, x's contracted axis, W's contracted axis, W's output axis) for `x·W` layers: the
        weight second (as MatMul has it), one label contracted, W's other label last in the output
        (where a 1-D bias added after the node lands)."""
        parsed = self._parse(v)
        if isinstance(parsed, str) or len(v.inputs) != 2:
            return None
        (xl, wl), out = parsed
        x, w = v.inputs
        if v.is_const(x) or not v.is_const(w) or len(wl) != 2 or not out:
            return None
        shared = [lab for lab in wl if lab in xl]
        rest = [lab for lab in wl if lab not in xl]
        if len(shared) != 1 or shared[0] in out or rest != [out[-1]]:
            return None
        if any(lab not in out for lab in xl if lab != shared[0]):
            return None  # x also sums over another axis: a removed input would count that many times
        return x, xl.index(shared[0]), wl.index(shared[0]), wl.index(rest[0])

    def seeds(self, v: NodeView) -> list[Slot]:
        dense = self._dense(v)
        return [(v.inputs[1], dense[3])] if dense else []

    def anchors(self, v: NodeView) -> list[Slot]:
        """Like a batched activation MatMul: labels every operand and the output share (heads)."""
        parsed = self._parse(v)
        if isinstance(parsed, str) or any(v.is_const(name) for name in v.inputs):
            return []
        inputs, out = parsed
        return [(v.outputs[0], axis) for axis, lab in enumerate(out)
                if axis > 0 and all(lab in x for x in inputs) and (v.dim((v.outputs[0], axis)) or 1) > 1]

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        found = self._label(v, slot)
        if isinstance(found, str) or found[1] in found[0][1]:
            return None
        dense = self._dense(v)
        if dense and slot in ((dense[0], dense[1]), (v.inputs[1], dense[2])):
            return None  # a weight layer's input: dead channels fold into the bias after it
        return "Einsum sums over this label: removing elements drops terms of the sum (lossy mode only)"

    def roles(self, v: NodeView) -> dict[str, str]:
        return {name: "weight" for name in v.inputs if v.is_const(name)}

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        """An output element is 0 where any operand's slice along the same label is all zero."""
        parsed = self._parse(v)
        if isinstance(parsed, str):
            return
        y, (inputs, out) = v.outputs[0], parsed
        for axis, label in enumerate(out):
            n = v.dim((y, axis))
            if n is None or values.get((y, axis)) is None:
                continue
            zero = np.zeros(n, dtype=bool)
            for name, labels in zip(v.inputs, inputs):
                if label not in labels or v.dim((name, labels.index(label))) != n:
                    continue
                a = labels.index(label)
                const = v.const(name)
                vals = values.get((name, a))
                if const is not None:
                    zero |= ~np.any(np.moveaxis(const, a, 0).reshape(n, -1) != 0, axis=1)
                elif vals is not None:
                    zero |= vals == 0
            values.set((y, axis), np.where(zero, 0.0, np.nan))

    def contraction(self, v: NodeView) -> Slot | None:
        dense = self._dense(v)
        return (dense[0], dense[1]) if dense else None

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, vals: np.ndarray, edit) -> None:
        _, _, w_in, w_out = self._dense(v)
        w = np.moveaxis(v.const(v.inputs[1]).astype(np.float64), (w_in, w_out), (0, 1))
        delta = vals @ w[removed]
        if np.any(delta != 0):
            edit.add_bias_after(v, delta, like=(v.outputs[0], v.rank(v.outputs[0]) - 1))
