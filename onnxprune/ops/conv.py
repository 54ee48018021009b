"""Convolutions: output channels are weight rows; input channels are weight columns per group.

Grouped convolutions prune per-group-uniformly: input channel r of every group is tied to weight
column r, and output channel s of every group to output channel s of group 0, so all groups keep
the same width and `group` stays valid. Depthwise convolutions tie each input channel to its
`multiplier` output channels, and `group` follows the new channel count.
"""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register


def _padded(v: NodeView) -> bool:
    auto_pad = v.attr("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return any(p != 0 for p in v.attr("pads", [])) or auto_pad not in ("NOTSET", "VALID")


def _tap_coverage(v: NodeView, kernel: tuple) -> np.ndarray:
    """Per kernel tap, the fraction of output positions where it reads inside the (unpadded) input;
    all ones without padding or when the spatial size is unknown."""
    spatial = (v.shape(v.inputs[0]) or ())[2:]
    nd = len(kernel)
    auto_pad = v.attr("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if not _padded(v) or auto_pad != "NOTSET" or len(spatial) != nd or not all(isinstance(d, int) for d in spatial):
        return np.ones(kernel)
    pads, strides = list(v.attr("pads", [0] * 2 * nd)), list(v.attr("strides", [1] * nd))
    dilations = list(v.attr("dilations", [1] * nd))
    coverage = np.ones(())
    for i, (size, k) in enumerate(zip(spatial, kernel)):
        out = (size + pads[i] + pads[i + nd] - (k - 1) * dilations[i] - 1) // strides[i] + 1
        index = np.arange(out)[:, None] * strides[i] - pads[i] + np.arange(k)[None] * dilations[i]
        coverage = np.multiply.outer(coverage, ((index >= 0) & (index < size)).mean(0) if out > 0 else np.ones(k))
    return coverage


class _ConvLike(OpRule):
    """Shared machinery; subclasses say which weight axis holds outputs and which inputs."""

    out_axis = 0  # weight axis of output channels (per group)
    in_axis = 1  # weight axis of input channels (per group)

    def _dims(self, v: NodeView):
        w = v.shape(v.inputs[1])
        cin = v.dim((v.inputs[0], 1))
        if w is None or cin is None or any(not isinstance(d, int) for d in w):
            return None
        g = int(v.attr("group", 1))
        if g < 1 or cin % g or (self.out_axis == 0 and w[0] % g):  # a damaged model: never guess
            return None
        per_out = w[self.out_axis] if self.out_axis == 0 else w[1]
        cout = per_out * g if self.out_axis == 1 else w[0]
        return g, cin, cout, cin // g, cout // g

    def seeds(self, v: NodeView) -> list[Slot]:
        return [(v.outputs[0], 1)] if v.is_const(v.inp(1)) else []

    def roles(self, v: NodeView) -> dict[str, str]:
        roles = {v.inputs[1]: "weight"}
        if v.inp(2):
            roles[v.inputs[2]] = "bias"
        return roles

    def ties(self, v: NodeView, slot: Slot):
        if not v.is_const(v.inp(1)):
            return Freeze(f"{v.op} weight is computed at run time")
        dims = self._dims(v)
        if dims is None:
            return Freeze(f"{v.op} shapes unknown")
        g, cin, cout, a, b = dims
        x, w, y, bias = v.inputs[0], v.inputs[1], v.outputs[0], v.inp(2)
        outputs = {(y, 1), (w, self.out_axis)} | ({(bias, 0)} if bias else set())
        inputs = {(x, 1), (w, self.in_axis)}
        if slot in outputs:
            return self._output_ties(v, dims, y, w, bias)
        if slot in inputs:
            return self._input_ties(v, dims, x, w, y)
        return Freeze(f"{v.op} does not carry channels on axis {slot[1]} of {slot[0]}")

    def _output_ties(self, v: NodeView, dims, y: str, w: str, bias: str | None) -> list[Tie]:
        g, cin, cout, a, b = dims
        ties = []
        if self.out_axis == 0:
            ties.append(identity((y, 1), (w, 0), cout))
        else:  # ConvTranspose: weight axis 1 holds the outputs of one group
            o = np.arange(cout)
            ties.append(Tie((y, 1), (w, 1), o, o % b))
        if bias:
            ties.append(identity((y, 1), (bias, 0), cout))
        if g > 1 and a == 1:  # depthwise (with channel multiplier b)
            o = np.arange(cout)
            ties.append(Tie((y, 1), (v.inputs[0], 1), o, o // b))
        elif g > 1:
            o = np.arange(cout)
            ties.append(Tie((y, 1), (y, 1), o, o % b))
        return ties

    def _input_ties(self, v: NodeView, dims, x: str, w: str, y: str) -> list[Tie]:
        g, cin, cout, a, b = dims
        c = np.arange(cin)
        if g > 1 and a == 1:
            return self._output_ties(v, dims, y, w, v.inp(2))
        if self.in_axis == 1:
            return [Tie((x, 1), (w, 1), c, c % a)]
        return [identity((x, 1), (w, 0), cin)] if g == 1 else [Tie((x, 1), (x, 1), c, c % a)]

    def update(self, v: NodeView, edit) -> None:
        dims = self._dims(v)
        g, cin, cout, a, b = dims
        if g > 1 and a == 1:
            edit.set_attr(v.node, "group", edit.new_dim((v.inputs[0], 1)))

    def output_rows(self, w: np.ndarray, dims) -> np.ndarray:
        """The weights producing each output channel, one row per channel."""
        g, cin, cout, a, b = dims
        if self.out_axis == 0:
            return w.reshape(cout, -1)
        per_group = w.reshape(g, a, b, -1).transpose(0, 2, 1, 3)
        return per_group.reshape(cout, -1)

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        """An output channel is its bias everywhere when every input it weighs is exactly zero."""
        w, dims = v.const(v.inputs[1]), self._dims(v)
        if w is None or dims is None:
            return
        g, cin, cout, a, b = dims
        used = self.output_rows(w, dims).reshape(cout, a, -1)
        used = np.any(used != 0, axis=2)  # [cout, a]: which inputs of its group each output weighs
        x = values.get((v.inputs[0], 1))
        zero_in = np.zeros(cin, dtype=bool) if x is None else (x == 0)
        zero_in = zero_in.reshape(g, a)[np.arange(cout) // b]  # [cout, a]
        dead = ~np.any(used & ~zero_in, axis=1)
        bias = v.const(v.inp(2)) if v.inp(2) else np.zeros(cout)
        values.set((v.outputs[0], 1), np.where(dead, bias.astype(np.float64), np.nan))


@register("Conv")
class Conv(_ConvLike):
    def contraction(self, v: NodeView) -> Slot | None:
        dims = self._dims(v)
        depthwise = dims is not None and dims[0] > 1 and dims[3] == 1
        return None if depthwise or not v.is_const(v.inp(1)) else (v.inputs[0], 1)

    def compensation_exact(self, v: NodeView, values: np.ndarray) -> bool:
        # Zero padding turns a constant input into a non-constant one at the borders.
        return not _padded(v) or bool(np.all(values == 0))

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, vals: np.ndarray, edit) -> None:
        """bias[o] += sum over kernel of W[o, c] * value[c] for each removed input channel c.

        With zero padding, each kernel tap counts by the fraction of output positions where it reads
        inside the input: the bias then matches the removed contribution averaged over positions.
        """
        w = v.const(v.inputs[1]).astype(np.float64)
        g, cin, cout, a, b = self._dims(v)
        delta = np.zeros(cout)
        spatial = (w.reshape(cout, a, -1) * _tap_coverage(v, w.shape[2:]).reshape(1, 1, -1)).sum(axis=2)
        for c, val in zip(removed, vals):
            grp, r = divmod(int(c), a)
            delta[grp * b:(grp + 1) * b] += spatial[grp * b:(grp + 1) * b, r] * val
        if np.any(delta != 0):
            edit.add_to_bias(v, 2, delta, like=(v.outputs[0], 1))


@register("ConvTranspose")
class ConvTranspose(_ConvLike):
    out_axis = 1
    in_axis = 0

    def ties(self, v: NodeView, slot: Slot):
        dims = self._dims(v)
        if dims is not None and dims[0] > 1 and dims[3] != 1:
            return Freeze("grouped ConvTranspose (not depthwise) is not supported")
        return super().ties(v, slot)

    def contraction(self, v: NodeView) -> Slot | None:
        dims = self._dims(v)
        depthwise = dims is not None and dims[0] > 1 and dims[3] == 1
        return None if depthwise or not v.is_const(v.inp(1)) else (v.inputs[0], 1)

    def compensation_exact(self, v: NodeView, values: np.ndarray) -> bool:
        # A constant input spreads unevenly over overlapping strides: only zero is exact.
        return bool(np.all(values == 0))

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, vals: np.ndarray, edit) -> None:
        """Interior approximation: each output sees the kernel sum once per stride step on average."""
        w = v.const(v.inputs[1]).astype(np.float64)
        g, cin, cout, a, b = self._dims(v)
        strides = np.prod(v.attr("strides", [1] * (w.ndim - 2)))
        per_in = w.reshape(cin, b, -1).sum(axis=2) / strides
        delta = np.zeros(cout)
        for c, val in zip(removed, vals):
            grp = int(c) // a
            delta[grp * b:(grp + 1) * b] += per_in[int(c)] * val
        if np.any(delta != 0):
            edit.add_to_bias(v, 2, delta, like=(v.outputs[0], 1))
