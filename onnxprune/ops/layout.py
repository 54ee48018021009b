"""Layout ops: they move, merge, split or select channels without changing values.

Reshape, Flatten, Squeeze and Unsqueeze share one rule that works on the inferred input and
output shapes, whatever the layout: the channel axis is located inside the block of axes whose
cumulative size both shapes share, and each channel maps to the elements it occupies there
(a block of H*W features after an NCHW flatten, a stride-C comb after an NHWC one, the inner axis
of a channel-shuffle split).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register


def _product(dims) -> tuple[int, tuple] | None:
    """Product of dims as (static part, sorted symbolic names); None if any dim is unknown."""
    static, symbols = 1, Counter()
    for d in dims:
        if d is None:
            return None
        if isinstance(d, str):
            symbols[d] += 1
        else:
            static *= int(d)
    return static, tuple(sorted(symbols.elements()))


def _cuts(dims) -> list:
    return [_product(dims[:i]) for i in range(len(dims) + 1)]


def reshape_ties(src: Slot, src_shape: tuple, dst: str, dst_shape: tuple, known=frozenset()) -> "list[Tie] | Freeze":
    """Element ties between axis `src[1]` of a tensor and the axis of its reshaped view.

    When one axis splits into several, the channel follows the split axis already known to carry
    channels, else the innermost one (a channel shuffle's channels-per-group axis).
    """
    a = src[1]
    size = src_shape[a]
    if not isinstance(size, int):
        return Freeze("channel axis size unknown at reshape")
    pin, pout = _cuts(src_shape), _cuts(dst_shape)
    lo = [i for i in range(a + 1) if pin[i] is not None and pin[i] in pout]
    hi = [i for i in range(a + 1, len(src_shape) + 1) if pin[i] is not None and pin[i] in pout]
    if not lo or not hi:
        return Freeze("reshape mixes the channel axis with dims of unknown size")
    i0, i1 = lo[-1], hi[0]
    j0 = max(j for j, p in enumerate(pout) if p == pin[i0])
    j1 = min(j for j, p in enumerate(pout) if p == pin[i1] and j > j0) if any(
        p == pin[i1] and j > j0 for j, p in enumerate(pout)) else None
    if j1 is None:
        return Freeze("reshape boundaries do not line up")
    block_in = [i for i in range(i0, i1) if src_shape[i] != 1 or i == a]
    block_out = [j for j in range(j0, j1) if dst_shape[j] != 1]
    if any(not isinstance(src_shape[i], int) for i in range(i0, i1)) or any(
            not isinstance(dst_shape[j], int) for j in range(j0, j1)):
        return Freeze("reshape block around the channel axis has symbolic dims")
    c = np.arange(size)
    if len(block_out) == 1:  # merge: channel c owns (o*C + c)*inner + i
        outer = int(np.prod([src_shape[i] for i in range(i0, a)], dtype=np.int64))
        inner = int(np.prod([src_shape[i] for i in range(a + 1, i1)], dtype=np.int64))
        o, i = np.arange(outer), np.arange(inner)
        elems = ((o[:, None, None] * size + c[None, :, None]) * inner + i[None, None, :])
        src_idx = np.broadcast_to(c[None, :, None], elems.shape).reshape(-1)
        return [Tie(src, (dst, block_out[0]), src_idx, elems.reshape(-1))]
    if block_in == [a] and block_out:  # split
        chosen = [j for j in block_out if (dst, j) in known]
        if len(chosen) > 1:
            return Freeze("reshape splits the channel axis into several channel axes")
        axis = chosen[0] if chosen else block_out[-1]
        stride = int(np.prod([dst_shape[j] for j in block_out if j > axis], dtype=np.int64))
        return [Tie(src, (dst, axis), c, (c // stride) % dst_shape[axis])]
    if not block_out and size == 1:
        return []
    return Freeze("reshape regroups the channel axis with other axes")


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
class ReshapeLike(OpRule):
    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze(f"{v.op} shape input is not a channel tensor")
        if v.op == "Reshape" and v.const(v.inp(1)) is None:
            return Freeze("Reshape target shape is computed at run time")
        xs, ys = v.shape(x), v.shape(y)
        if xs is None or ys is None:
            return Freeze(f"{v.op} shapes unknown")
        if slot[0] == x:
            return reshape_ties(slot, xs, y, ys, v.known)
        return reshape_ties(slot, ys, x, xs, v.known)

    def update(self, v: NodeView, edit) -> None:
        if v.op != "Reshape":
            return
        shape = v.const(v.inputs[1]).copy()
        y = v.outputs[0]
        changed = False
        for axis in range(len(shape)):
            new = edit.new_dim((y, axis))
            if new is not None and shape[axis] not in (0, -1) and shape[axis] != new:
                shape[axis] = new
                changed = True
        if changed:
            edit.set_input_const(v.node, 1, shape)


@register("Transpose")
class Transpose(OpRule):
    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        if rank is None:
            return Freeze("Transpose rank unknown")
        perm = list(v.attr("perm", list(range(rank))[::-1]))
        n = v.dim(slot)
        if n is None:
            return Freeze("unknown channel count at Transpose")
        if slot[0] == v.inputs[0]:
            return [identity(slot, (v.outputs[0], perm.index(slot[1])), n)]
        return [identity(slot, (v.inputs[0], perm[slot[1]]), n)]


@register("Concat")
class Concat(OpRule):
    """Each input occupies an offset range of the output's concat axis; other axes are shared."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.outputs[0])
        if rank is None:
            return Freeze("Concat rank unknown")
        axis = v.attr("axis") % rank
        y = v.outputs[0]
        if slot[1] != axis:
            n = v.dim(slot)
            if n is None or any(v.dim((t, slot[1])) != n for t in v.inputs + [y]):
                return Freeze("Concat operands differ on the channel axis")
            return [identity((y, slot[1]), (t, slot[1]), n) for t in dict.fromkeys(v.inputs)]
        ties, offset = [], 0
        for t in v.inputs:
            n = v.dim((t, axis))
            if n is None:
                return Freeze("Concat input size unknown")
            idx = np.arange(n)
            if n:
                ties.append(Tie((t, axis), (y, axis), idx, idx + offset))
            offset += n
        return ties


@register("Split")
class Split(OpRule):
    """Output j is the offset range of input elements; `split` sizes follow the kept channels."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        x = v.inputs[0]
        rank = v.rank(x)
        if rank is None:
            return Freeze("Split rank unknown")
        axis = v.attr("axis", 0) % rank
        if slot[1] != axis:
            n = v.dim(slot)
            if n is None:
                return Freeze("unknown channel count at Split")
            return [identity((x, slot[1]), (y, slot[1]), n) for y in v.outputs if y]
        ties, offset = [], 0
        for y in v.outputs:
            n = v.dim((y, axis))
            if n is None:
                return Freeze("Split output size unknown")
            idx = np.arange(n)
            ties.append(Tie((x, axis), (y, axis), idx + offset, idx))
            offset += n
        if offset != v.dim((x, axis)):
            return Freeze("Split outputs do not cover the input")
        return ties

    def update(self, v: NodeView, edit) -> None:
        axis = v.attr("axis", 0) % v.rank(v.inputs[0])
        sizes = [edit.new_dim((y, axis)) or v.dim((y, axis)) for y in v.outputs]
        old = [v.dim((y, axis)) for y in v.outputs]
        if sizes == old:
            return
        if v.opset < 13:
            edit.set_attr(v.node, "split", sizes)
        else:
            edit.del_attr(v.node, "num_outputs")
            edit.set_input_const(v.node, 1, np.array(sizes, dtype=np.int64))


def _slice_params(v: NodeView) -> tuple[list[int], list[int], list[int], list[int]] | None:
    rank = v.rank(v.inputs[0])
    starts = v.int_list("starts", 1)
    ends = v.int_list("ends", 2)
    if starts is None or ends is None or rank is None:
        return None
    axes = v.int_list("axes", 3) if (v.opset < 10 and "axes" in v.node.attrs) or v.inp(3) else list(range(len(starts)))
    steps = v.int_list("steps", 4) if v.inp(4) else [1] * len(starts)
    if axes is None or steps is None:
        return None
    return starts, ends, [a % rank for a in axes], steps


@register("Slice")
class Slice(OpRule):
    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        params = _slice_params(v)
        if params is None:
            return Freeze("Slice parameters are computed at run time")
        starts, ends, axes, steps = params
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze("Slice parameter is not a channel tensor")
        axis = slot[1]
        n_in, n_out = v.dim((x, axis)), v.dim((y, axis))
        if n_in is None or n_out is None:
            return Freeze("unknown channel count at Slice")
        if axis not in axes:
            return [identity((x, axis), (y, axis), n_in)]
        k = axes.index(axis)
        if steps[k] != 1:
            return Freeze("Slice with a step on the channel axis")
        start = max(0, min(starts[k] + n_in if starts[k] < 0 else starts[k], n_in))
        idx = np.arange(n_out)
        return [Tie((x, axis), (y, axis), idx + start, idx)]

    def update(self, v: NodeView, edit) -> None:
        starts, ends, axes, steps = _slice_params(v)
        x, y = v.inputs[0], v.outputs[0]
        new_starts, new_ends, changed = list(starts), list(ends), False
        for k, axis in enumerate(axes):
            kept = edit.kept((x, axis))
            if kept is None:
                continue
            n_in = v.dim((x, axis))
            start = max(0, min(starts[k] + n_in if starts[k] < 0 else starts[k], n_in))
            new_start = int(np.sum(kept < start))
            new_starts[k] = new_start
            new_ends[k] = new_start + (edit.new_dim((y, axis)) or v.dim((y, axis)))
            changed = True
        if not changed:
            return
        if v.opset < 10:
            edit.set_attr(v.node, "starts", new_starts)
            edit.set_attr(v.node, "ends", new_ends)
        else:
            dtype = v.const(v.inputs[1]).dtype
            edit.set_input_const(v.node, 1, np.array(new_starts, dtype=dtype))
            edit.set_input_const(v.node, 2, np.array(new_ends, dtype=dtype))


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
        if sizes is not None and v.const(sizes) is None:
            return Freeze("Resize sizes are computed at run time")
        return [identity((x, slot[1]), (y, slot[1]), n)]

    def update(self, v: NodeView, edit) -> None:
        sizes = v.inp(3) if v.op == "Resize" else None
        if sizes is None:
            return
        values = v.const(sizes).copy()
        axes = v.attr("axes", list(range(len(values))))
        for k, axis in enumerate(axes):
            new = edit.new_dim((v.outputs[0], axis))
            if new is not None:
                values[k] = new
        edit.set_input_const(v.node, 3, values)


@register("Shape")
class Shape(OpRule):
    """Reading a tensor's shape is safe when no consumer picks out the channel dim."""

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        start = v.attr("start", 0) % (rank + 1) if rank else 0
        end = v.attr("end", rank) if v.attr("end") is not None else rank
        end = end % (rank + 1) if end < 0 else min(end, rank)
        if not start <= slot[1] < end:
            return []
        position = slot[1] - start
        for consumer in v.tensors[v.outputs[0]].outputs:
            if consumer.op != "Gather" or not isinstance(consumer.inputs[1], gs.Constant):
                return Freeze(f"shape of a channel tensor is used by {consumer.op} '{consumer.name}'")
            picked = np.asarray(consumer.inputs[1].values).reshape(-1) % (end - start)
            if position in picked:
                return Freeze(f"channel count is read at run time by Gather '{consumer.name}'")
        return []
