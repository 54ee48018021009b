"""Quantized ops: their channels are frozen, with the reason shown by `analyze`.

Slicing a quantized layer is possible in principle (per-channel scales and zero points follow
the weight rows), but per-tensor versus per-axis parameters, integer accumulation and
requantization make an exact proof per op; until one exists, the rules here seed the channels
these layers define (so they appear as groups) and freeze every slot they touch.
"""

from __future__ import annotations

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, register

_REASON = "quantized op: scales, zero points and integer weights are not sliced (frozen)"


class _Quantized(OpRule):
    weight_input: int | None = None
    """The constant integer weight whose rows define the layer's output channels (seeded)."""
    conv_like = True
    """Channels on axis 1 (convolutions) rather than on the last axis (matrix products)."""

    def seeds(self, v: NodeView) -> list[Slot]:
        out = v.out(0)
        if self.weight_input is None or not v.is_const(v.inp(self.weight_input)) or v.rank(out) is None:
            return []
        return [(out, 1 if self.conv_like else v.rank(out) - 1)]

    def ties(self, v: NodeView, slot: Slot) -> Freeze:
        return Freeze(f"{v.op}: {_REASON}")


@register("QLinearConv")
class QLinearConv(_Quantized):
    weight_input = 3


@register("ConvInteger")
class ConvInteger(_Quantized):
    weight_input = 1


@register("QLinearMatMul")
class QLinearMatMul(_Quantized):
    weight_input = 3
    conv_like = False


@register("MatMulInteger")
class MatMulInteger(_Quantized):
    weight_input = 1
    conv_like = False


@register("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
class QuantizeDequantize(_Quantized):
    """Activations and weights entering or leaving the quantized domain."""
