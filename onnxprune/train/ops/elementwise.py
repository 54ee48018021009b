"""Element-wise ops: activations, arithmetic with numpy broadcasting, comparisons, logic, Clip,
Where, Cast, Identity/Dropout (inference: identity)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from onnxprune.train.ops import Node, torch_dtype, torch_op

_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Erf": torch.erf,
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
    "Atanh": torch.atanh, "Softsign": F.softsign, "Softplus": F.softplus, "Mish": F.mish,
    "Not": torch.logical_not, "IsNaN": torch.isnan,
}
for _op, _fn in _UNARY.items():
    torch_op(_op)(lambda node, x, fn=_fn: fn(x))


_WITH_ALPHA = {"LeakyRelu": (F.leaky_relu, 0.01), "Elu": (F.elu, 1.0), "Celu": (F.celu, 1.0)}
"""Activations of one `alpha` attribute: (torch function, ONNX default alpha)."""
for _op, (_fn, _alpha) in _WITH_ALPHA.items():
    torch_op(_op)(lambda node, x, fn=_fn, alpha=_alpha: fn(x, node.attr("alpha", alpha)))


@torch_op("Selu")
def selu(node: Node, x):
    alpha, gamma = node.attr("alpha", 1.67326319217681884765625), node.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@torch_op("ThresholdedRelu")
def thresholded_relu(node: Node, x):
    return torch.where(x > node.attr("alpha", 1.0), x, torch.zeros_like(x))


@torch_op("HardSigmoid")
def hard_sigmoid(node: Node, x):
    return torch.clamp(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0.0, 1.0)


@torch_op("HardSwish")
def hard_swish(node: Node, x):
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@torch_op("Gelu")
def gelu(node: Node, x):
    return F.gelu(x, approximate=node.attr("approximate", "none"))


@torch_op("PRelu")
def prelu(node: Node, x, slope):
    return torch.where(x < 0, x * slope, x)


@torch_op("IsInf")
def is_inf(node: Node, x):
    positive = torch.isposinf(x) if node.attr("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    negative = torch.isneginf(x) if node.attr("detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    return positive | negative


@torch_op("Div")
def div(node: Node, a, b):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C integer division, as ONNX Runtime


@torch_op("Pow")
def pow_(node: Node, a, b):
    return torch.pow(a, b).to(a.dtype)


@torch_op("Mod")
def mod(node: Node, a, b):
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
for _op, _fn in _BINARY.items():
    torch_op(_op)(lambda node, a, b, fn=_fn: fn(a, b))

_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}


@torch_op(*_VARIADIC)
def variadic(node: Node, *xs):
    return functools.reduce(_VARIADIC[node.op], xs)


@torch_op("Mean")
def mean(node: Node, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


@torch_op("Clip")
def clip(node: Node, x, lo=None, hi=None):
    if node.opset < 11:
        lo, hi = node.attr("min"), node.attr("max")
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


@torch_op("Where")
def where(node: Node, cond, a, b):
    return torch.where(cond, a, b)


@torch_op("Cast")
def cast(node: Node, x):
    return x.to(torch_dtype(node.attr("to"), node))


@torch_op("CastLike")
def cast_like(node: Node, x, like):
    return x.to(like.dtype)


@torch_op("Identity")
def identity(node: Node, x):
    return x


@torch_op("Dropout")
def dropout(node: Node, x, ratio=None, training_mode=None):
    """Inference form (as ONNX Runtime runs an exported model): the input, and an all-true mask."""
    return x, torch.ones_like(x, dtype=torch.bool)
