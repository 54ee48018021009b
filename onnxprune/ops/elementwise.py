"""Element-wise ops: channels pass straight through, values transform channel by channel."""

from __future__ import annotations

import math

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register


def _same_axis_ties(v: NodeView, slot: Slot, ins: list[str], outs: list[str]) -> "list[Tie] | Freeze":
    """Tie axis `slot[1]` of every listed input and output, which must share rank and size."""
    n = v.dim(slot)
    if n is None:
        return Freeze(f"unknown size of axis {slot[1]} of {slot[0]}")
    ties = []
    for name in ins + outs:
        other = (name, slot[1])
        if name == slot[0]:
            continue
        if v.dim(other) != n:
            return Freeze(f"{name} does not carry axis {slot[1]} with {n} channels")
        ties.append(identity(slot, other, n))
    return ties


_UNARY = {
    "Relu": lambda x, v: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, v: np.where(x >= 0, x, x * v.attr("alpha", 0.01)),
    "Sigmoid": lambda x, v: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, v: np.clip(v.attr("alpha", 0.2) * x + v.attr("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, v: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, v: np.tanh(x),
    "Elu": lambda x, v: np.where(x >= 0, x, v.attr("alpha", 1.0) * (np.exp(x) - 1)),
    "Selu": lambda x, v: v.attr("gamma", 1.0507009873554805) * np.where(
        x > 0, x, v.attr("alpha", 1.6732632423543772) * (np.exp(x) - 1)),
    "Celu": lambda x, v: np.maximum(x, 0) + np.minimum(0, v.attr("alpha", 1.0) * (np.exp(x / v.attr("alpha", 1.0)) - 1)),
    "Gelu": lambda x, v: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))) if x.size else x,
    "Softplus": lambda x, v: np.log1p(np.exp(x)),
    "Softsign": lambda x, v: x / (1 + np.abs(x)),
    "Mish": lambda x, v: x * np.tanh(np.log1p(np.exp(x))),
    "Erf": lambda x, v: np.vectorize(math.erf)(x) if x.size else x,
    "ThresholdedRelu": lambda x, v: np.where(x > v.attr("alpha", 1.0), x, 0.0),
    "Abs": lambda x, v: np.abs(x),
    "Neg": lambda x, v: -x,
    "Exp": lambda x, v: np.exp(x),
    "Sqrt": lambda x, v: np.sqrt(x),
    "Reciprocal": lambda x, v: 1.0 / x,
    "Floor": lambda x, v: np.floor(x),
    "Ceil": lambda x, v: np.ceil(x),
    "Sin": lambda x, v: np.sin(x),
    "Cos": lambda x, v: np.cos(x),
    "Log": lambda x, v: np.log(x),
    "Sign": lambda x, v: np.sign(x),
    "Round": lambda x, v: np.round(x),
}


@register(*_UNARY)
class Unary(OpRule):
    """One input, one output, same shape; the constant value of a channel maps through f."""

    def ties(self, v: NodeView, slot: Slot):
        return _same_axis_ties(v, slot, [v.inputs[0]], [v.outputs[0]])

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        for axis in range(v.rank(v.inputs[0]) or 0):
            x = values.get((v.inputs[0], axis))
            if x is not None:
                with np.errstate(all="ignore"):
                    values.set((v.outputs[0], axis), _UNARY[v.op](x, v))


@register("Clip")
class Clip(OpRule):
    """Clip with scalar bounds (attributes before opset 11, inputs after)."""

    def ties(self, v: NodeView, slot: Slot):
        for i in (1, 2):
            bound = v.inp(i)
            if bound is not None and (v.const(bound) is None or v.const(bound).size != 1):
                return Freeze("Clip bounds are not scalar constants")
        return _same_axis_ties(v, slot, [v.inputs[0]], [v.outputs[0]])

    def _bounds(self, v: NodeView) -> tuple[float, float]:
        lo, hi = v.attr("min", -np.inf), v.attr("max", np.inf)
        if v.inp(1) is not None:
            lo = float(v.const(v.inp(1)).reshape(-1)[0])
        if v.inp(2) is not None:
            hi = float(v.const(v.inp(2)).reshape(-1)[0])
        return lo, hi

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        lo, hi = self._bounds(v)
        for axis in range(v.rank(v.inputs[0]) or 0):
            x = values.get((v.inputs[0], axis))
            if x is not None:
                values.set((v.outputs[0], axis), np.clip(x, lo, hi))


@register("Identity", "Dropout")
class PassThrough(OpRule):
    """Output 0 is input 0 at inference (Dropout's mask output must be unused)."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        if v.op == "Dropout" and v.out(1) is not None and v.tensors[v.out(1)].outputs:
            return Freeze("Dropout mask output is used")
        return _same_axis_ties(v, slot, [v.inputs[0]], [v.outputs[0]])


@register("Cast")
class Cast(OpRule):
    def ties(self, v: NodeView, slot: Slot):
        return _same_axis_ties(v, slot, [v.inputs[0]], [v.outputs[0]])

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        import onnx

        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.attr("to"))
        for axis in range(v.rank(v.inputs[0]) or 0):
            x = values.get((v.inputs[0], axis))
            if x is not None:
                known = ~np.isnan(x)
                out = np.full_like(x, np.nan)
                with np.errstate(all="ignore"):
                    out[known] = x[known].astype(dtype).astype(np.float64)
                values.set((v.outputs[0], axis), out)


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum, "Pow": np.power, "PRelu": None,
    "Sum": np.add, "Mean": None,
}


@register(*_BINARY)
class Broadcast(OpRule):
    """Numpy-broadcasting ops: an input axis is tied to the output axis it aligns with by rank,
    unless that input broadcasts (size 1 or missing) there. Per-channel constants are sliced."""

    def ties(self, v: NodeView, slot: Slot):
        out = v.outputs[0]
        rank = v.rank(out)
        if rank is None or any(v.rank(i) is None for i in v.inputs):
            return Freeze("unknown rank of an operand")
        out_axis = slot[1] if slot[0] == out else slot[1] + rank - v.rank(slot[0])
        n = v.dim((out, out_axis))
        if n is None:
            return Freeze(f"unknown size of axis {out_axis} of {out}")
        ties = [identity((out, out_axis), slot, n)] if slot[0] != out else []
        for name in dict.fromkeys(v.inputs):
            if name == slot[0]:
                continue
            axis = out_axis - (rank - v.rank(name))
            if axis < 0:
                continue
            d = v.dim((name, axis))
            if d == n and (n != 1):
                ties.append(identity((out, out_axis), (name, axis), n))
            elif d != 1:
                return Freeze(f"operand {name} has unknown or mismatched size on the channel axis")
        return ties

    def roles(self, v: NodeView) -> dict[str, str]:
        return {name: "param" for name in v.inputs if v.is_const(name)}

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        out = v.outputs[0]
        rank = v.rank(out) or 0
        for axis in range(rank):
            if (out, axis) not in values.sizes:
                continue
            operands = [_operand_values(v, values, name, axis - (rank - (v.rank(name) or 0)), values.sizes[(out, axis)])
                        for name in v.inputs]
            values.set((out, axis), _combine(v, operands))


def _operand_values(v: NodeView, values: ValueTable, name: str, axis: int, n: int) -> np.ndarray:
    """Per-channel values of one operand along the output channel axis (NaN where not constant)."""
    const = v.const(name)
    if const is not None:
        if const.size == 1:
            return np.full(n, float(const.reshape(-1)[0]))
        if axis >= 0 and const.shape[axis] == n and const.size == n:
            return const.reshape(-1).astype(np.float64)
        if axis >= 0 and const.shape[axis] == n:  # e.g. a folded [1, B, C] bias: per channel where uniform
            per = np.moveaxis(const, axis, 0).reshape(n, -1).astype(np.float64)
            return np.where(np.all(per == per[:, :1], axis=1), per[:, 0], np.nan)
        return np.full(n, np.nan)
    if axis >= 0 and (name, axis) in values.sizes:
        return values.get((name, axis))
    return np.full(n, np.nan)


def _combine(v: NodeView, operands: list[np.ndarray]) -> np.ndarray:
    with np.errstate(all="ignore"):
        if v.op == "Mean":
            return sum(operands) / len(operands)
        if v.op == "PRelu":
            x, slope = operands
            return np.where(x >= 0, x, x * slope)
        result = operands[0]
        for other in operands[1:]:
            result = _BINARY[v.op](result, other)
        if v.op == "Mul":  # 0 times anything finite is 0, even when the other factor varies
            zero = np.zeros(len(result), dtype=bool)
            for x in operands:
                zero |= x == 0
            result = np.where(zero, 0.0, result)
        return result
