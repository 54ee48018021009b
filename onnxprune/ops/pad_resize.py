"""Pad and Resize: spatial ops that keep each channel separate unless they act on the channel axis."""

from __future__ import annotations

import numpy as np

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, ValueTable, identity, register
from onnxprune.ops.shape_values import Dim, shape_value


@register("Pad")
class Pad(OpRule):
    def _pads(self, v: NodeView) -> list[int] | None:
        pads = v.int_list("pads", 1)
        if pads is None or (v.opset >= 18 and v.inp(3)):
            axes = v.int_list("axes", 3)
            if pads is None or axes is None:
                return None
            rank = v.rank(v.inputs[0])
            full = [0] * (2 * rank)
            for k, a in enumerate(axes):
                full[a % rank], full[a % rank + rank] = pads[k], pads[k + len(axes)]
            return full
        return pads

    def ties(self, v: NodeView, slot: Slot):
        pads, rank = self._pads(v), v.rank(v.inputs[0])
        x, y = v.inputs[0], v.outputs[0]
        if pads is None or rank is None or slot[0] not in (x, y):
            return Freeze("Pad amounts are computed at run time")
        if pads[slot[1]] or pads[slot[1] + rank]:
            return Freeze("Pad pads the channel axis")
        n = v.dim(slot)
        other = y if slot[0] == x else x
        return [identity(slot, (other, slot[1]), n)] if n else Freeze("unknown channel count at Pad")

    def propagate(self, v: NodeView, values: ValueTable) -> None:
        mode = v.attr("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        fill = v.attr("value", 0.0)
        if v.inp(2) is not None and v.const(v.inp(2)) is not None:
            fill = float(v.const(v.inp(2)).reshape(-1)[0])
        for axis in range(v.rank(v.inputs[0]) or 0):
            x = values.get((v.inputs[0], axis))
            if x is not None:
                values.set((v.outputs[0], axis), x if mode != "constant" else np.where(x == fill, x, np.nan))


@register("Resize", "Upsample")
class Resize(OpRule):
    """Spatial resampling keeps each channel separate when the channel axis is not resized."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze(f"{v.op} parameter is not a channel tensor")
        n = v.dim((x, slot[1]))
        if n is None or v.dim((y, slot[1])) != n:
            return Freeze(f"{v.op} resizes the channel axis")
        mode = v.attr("coordinate_transformation_mode", "half_pixel")
        if (mode.decode() if isinstance(mode, bytes) else mode) == "tf_crop_and_resize":
            return Freeze("tf_crop_and_resize fills channels with an extrapolation value")
        sizes = v.inp(3) if v.op == "Resize" else None
        if sizes is not None and v.const(sizes) is None and not _sizes_follow_input(v, slot[1]):
            return Freeze("Resize sizes are computed at run time")
        return [identity((x, slot[1]), (y, slot[1]), n)]

    def update(self, v: NodeView, edit) -> None:
        sizes = v.inp(3) if v.op == "Resize" else None
        if sizes is None or v.const(sizes) is None:
            return  # run-time sizes: the channel entry reads the pruned input's own dim
        values = v.const(sizes).copy()
        axes = v.attr("axes", list(range(len(values))))
        for k, axis in enumerate(axes):
            new = edit.new_dim((v.outputs[0], axis))
            if new is not None:
                values[k] = new
        edit.set_input_const(v.node, 3, values)


def _sizes_follow_input(v: NodeView, axis: int) -> bool:
    """Run-time Resize sizes whose entry for `axis` is that dim of the Resize's own input, read by
    `Shape` (the TorchScript exporter's `interpolate(x, size=...)`: Concat(Shape(x)[:2], hw)): it
    follows the kept count by itself. Any other entry (a constant, another tensor's dim) does not."""
    if v.attr("axes") is not None:
        return False
    entries = shape_value(v.tensors[v.inputs[3]], v.opset)
    entry = entries[axis] if entries is not None and axis < len(entries) else None
    return isinstance(entry, Dim) and entry == Dim(v.inputs[0], axis, 1)
