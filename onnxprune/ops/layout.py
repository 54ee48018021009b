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

from onnxprune.errors import InternalError
from onnxprune.ops.control_flow import all_nodes
from onnxprune.ops.chunks import chunk_ties, only_chunk_bounds
from onnxprune.ops.base import (Defer, Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, register,
                                slot_axes)
from onnxprune.ops.shape_values import Dim, Known, dim_readers, dim_size, reads, shape_value


def _product(dims) -> tuple[int, tuple] | None:
    """Product of dims as (static part, sorted symbolic names); None if any dim is unknown."""
    static, symbols = 1, Counter()
    for d in dims:
        if d is None:
            return None
        if isinstance(d, str):  # 'n*batch*seq' names a product (see onnxprune.static_shapes)
            for part in d.split("*"):
                if part.isdigit():
                    static *= int(part)
                else:
                    symbols[part] += 1
        else:
            static *= int(d)
    return static, tuple(sorted(symbols.elements()))


def _cuts(dims) -> list:
    return [_product(dims[:i]) for i in range(len(dims) + 1)]


def reshape_ties(src: Slot, src_shape: tuple, dst: str, dst_shape: tuple, known=frozenset(),
                 settled: bool = True) -> "list[Tie] | Freeze | Defer":
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
        if not chosen and not settled:
            return Defer()
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
        if v.op == "Reshape" and v.const(v.inp(1)) is None and _computed_target(v) is None:
            return Freeze("Reshape target shape is computed at run time")
        xs, ys = v.shape(x), v.shape(y)
        if v.op == "Reshape" and xs is not None:
            ys = _target_dims(v, xs, ys)
        if xs is None or ys is None:
            return Freeze(f"{v.op} shapes unknown")
        paired = _paired_ties(slot, x, xs, y, ys, v.known)
        if paired is not None:
            ties = paired
        elif slot[0] == x:
            ties = reshape_ties(slot, xs, y, ys, v.known, v.settled)
        else:
            ties = reshape_ties(slot, ys, x, xs, v.known, v.settled)
        if v.op != "Reshape" or v.is_const(v.inp(1)) or not isinstance(ties, list):
            return ties
        extra = _target_entry_ties(v, _computed_target(v), ties)
        return extra if isinstance(extra, Freeze) else ties + extra

    def update(self, v: NodeView, edit) -> None:
        if v.op != "Reshape":
            return
        if v.const(v.inputs[1]) is None:
            return _update_computed_target(v, edit)
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


def _paired_ties(slot: Slot, x: str, xs: tuple, y: str, ys: tuple, known) -> "list[Tie] | Freeze | None":
    """Ties of a paired (direction, unit) slot through a reshape that keeps both axes, or merges
    them in order into one axis (a bidirectional layer's [.., D, H] -> [.., D*H] features; element
    d*H + j is the same on both sides). Asked from the merged side, the pair is used only when it is
    already known; otherwise the plain rule ties unit j of both directions (None: not a pair case)."""
    pin, pout = _cuts(xs), _cuts(ys)

    def moved(axis: int) -> int | None:  # the output axis holding exactly input axis `axis`
        for j in range(len(ys)):
            if pin[axis] is not None and pin[axis] == pout[j] and pin[axis + 1] == pout[j + 1]:
                return j
        return None

    def merged(a: int) -> int | None:  # the output axis holding exactly input axes a and a + 1
        for j in range(len(ys)):
            if pin[a] is not None and pin[a] == pout[j] and pin[a + 2] == pout[j + 1]:
                return j
        return None

    if slot[0] == x and isinstance(slot[1], tuple):
        a, b = slot[1]
        n = int(np.prod([xs[a], xs[b]])) if isinstance(xs[a], int) and isinstance(xs[b], int) else None
        if n is None:
            return Freeze("size of a paired (direction, unit) slot unknown at reshape")
        ja, jb = moved(a), moved(b)
        if ja is not None and jb is not None:
            return [identity(slot, (y, (ja, jb)), n)]
        k = merged(a) if b == a + 1 else None
        if k is not None:
            return [identity(slot, (y, k), n)]
        return Freeze("reshape moves a (direction, unit) pair in a way onnxprune does not follow")
    if slot[0] == y and not isinstance(slot[1], tuple):
        for a in range(len(xs) - 1):
            pair = (x, (a, a + 1))
            if pair in known and merged(a) == slot[1] and isinstance(ys[slot[1]], int):
                return [identity(slot, pair, ys[slot[1]])]
    return None


def _target_dims(v: NodeView, xs: tuple, inferred: tuple | None) -> tuple | None:
    """Reshape output dims, with the non-static dims of shape inference worked out from the target.

    Inference loses a symbolic batch size behind -1 (`[N,C,1,1] → [-1,C]` gives `[unk,C]`), and
    reads of `Shape` resolve to the dims they name; 0 copies the input dim unless `allowzero`.
    """
    target = v.const(v.inp(1))
    entries = [int(t) for t in target.reshape(-1)] if target is not None else _computed_target(v)
    if entries is None or (inferred is not None and len(inferred) != len(entries)):
        return inferred
    dims: list = []
    for k, e in enumerate(entries):
        if isinstance(e, Dim):
            dims.append(dim_size(e, v.shape(e.tensor)))
            continue
        e = e.value if isinstance(e, Known) else e
        copies = e == 0 and not v.attr("allowzero", 0)
        dims.append(xs[k] if copies and k < len(xs) else ("infer" if e == -1 else e))
    if "infer" in dims:
        dims[dims.index("infer")] = _infer_dim(xs, [d for d in dims if d != "infer"])
    if inferred is None:
        return tuple(dims)
    return tuple(d if isinstance(d, int) or mine is None else mine for d, mine in zip(inferred, dims))


def _infer_dim(xs: tuple, others: list):
    """The -1 of a reshape: total size over the other dims, symbolic names cancelled as factors."""
    total, rest = _product(xs), _product(others)
    if total is None or rest is None or rest[0] == 0 or total[0] % rest[0]:
        return None
    left = Counter(total[1])
    left.subtract(rest[1])
    if any(n < 0 for n in left.values()):
        return None
    symbols = list(left.elements())
    static = total[0] // rest[0]
    if not symbols:
        return static
    return symbols[0] if symbols == symbols[:1] and static == 1 else None


def _computed_target(v: NodeView):
    """A run-time Reshape target (Shape → Gather → Slice → Concat) evaluated element by element.

    Its dims that `Shape` reads follow the pruned tensors by themselves (the Shape rule freezes a
    channel count that reaches one); the constant elements are rewritten by the update below.
    """
    return shape_value(v.tensors[v.inputs[1]], v.opset)


def _target_entry_ties(v: NodeView, target: list, ties: list[Tie]) -> "list[Tie] | Freeze":
    """What a run-time target needs so that it stays right for the output channel axes of `ties`.

    An element read from another tensor's dim (times a constant: KV heads x repeats) is tied to
    that dim, each of its channels owning `factor` consecutive output elements, so the output
    always keeps what the target computes. A constant not read verbatim from an initializer
    (the ones of `expand_as`) cannot be rewritten: only the values that stay valid pass.
    """
    y = v.outputs[0]
    offset = (v.rank(y) or 0) - len(target)
    if offset < 0 or (v.op == "Reshape" and offset):
        return Freeze(f"{v.op} target length differs from the output rank")
    keep = (0, -1) if v.op == "Reshape" else (1,)
    extra = []
    for axis in sorted({s[1] for t in ties for s in (t.a, t.b) if s[0] == y}):
        entry, n = target[axis - offset] if axis >= offset else None, v.dim((y, axis))
        if isinstance(entry, Dim) and v.gqa == "query" and merges_repeat(v):
            if entry.factor_source is None or (v.dim((entry.tensor, entry.axis)) or 0) * entry.factor != n:
                return Freeze(f"gqa='query': {v.op} target for the merged heads is not KV heads x a constant")
            continue  # KV heads stay; the update rewrites the repeat factor (_update_computed_target)
        if isinstance(entry, Dim) and not flows_from(v.node.inputs[0], entry.tensor):
            return Freeze(f"{v.op} target for channel axis {axis} reads the size of another layer's channels")
        if isinstance(entry, Dim) and entry.span > 1:
            if entry.tensor != v.inputs[0] or dim_size(entry, v.shape(entry.tensor)) != n:
                return Freeze(f"{v.op} target for channel axis {axis} multiplies dims onnxprune cannot follow")
            continue  # the product of the data's own merged dims: it follows the kept count by itself
        if isinstance(entry, Dim):
            size = v.dim((entry.tensor, entry.axis))
            if size is None or n is None or size * entry.factor != n:
                return Freeze(f"{v.op} target reads the size of channel axis {axis} from a dim that does not match")
            extra.append(block_tie((entry.tensor, entry.axis), (y, axis), size, entry.factor))
        elif axis < offset or (entry.source is None and entry.value not in keep):
            return Freeze(f"{v.op} target for channel axis {axis} is a computed constant onnxprune cannot rewrite")
    return extra


CHANNEL_MIXERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Shape"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Concat"})


def flows_from(tensor: gs.Tensor, source: str) -> bool:
    """Whether `tensor`'s data is `source`'s channels moved around (no layer mixes channels between).

    Only then may a run-time target that reads `source`'s channel count be tied to `tensor`'s axis:
    the count and the data are the same channels (K/V heads repeated for grouped-query attention).
    A target reading the residual stream's width to reshape an attention output (Swin) would
    otherwise merge two unrelated channel spaces; that case freezes instead.
    """
    stack, seen = [tensor], set()
    while stack:  # each tensor once: linear in the graph (a residual stream passes many Adds)
        t = stack.pop()
        if t.name == source:
            return True
        if t.name in seen or not t.inputs:
            continue
        seen.add(t.name)
        node = t.inputs[0]
        if node.op not in CHANNEL_MIXERS:
            stack += node.inputs if node.op in ELEMENTWISE else node.inputs[:1]
    return False


def block_tie(a: Slot, b: Slot, n: int, factor: int) -> Tie:
    """Element i of `a` owns elements i*factor .. i*factor + factor - 1 of `b` (a repeat)."""
    idx = np.arange(n, dtype=np.int64)
    return Tie(a, b, np.repeat(idx, factor), np.arange(n * factor, dtype=np.int64))


def _update_computed_target(v: NodeView, edit, fixed: tuple[int, ...] = (0, -1)) -> None:
    """Rewrite the constant elements that spell changed output dims, in the constants they come from.
    Elements equal to a value in `fixed` (copy, infer; broadcast for Expand) stay."""
    writes = {}
    for axis, entry in enumerate(_computed_target(v) or []):
        new = edit.new_dim((v.outputs[0], axis))
        if new is not None and isinstance(entry, Known) and entry.value not in (*fixed, new):
            writes[axis] = (entry, new)
        elif new is not None and isinstance(entry, Dim) and entry.factor != 1 and edit.new_dim(
                (entry.tensor, entry.axis)) is None:  # gqa='query': KV heads x the kept repeats
            old = edit.analysis.slot_sizes[(v.outputs[0], axis)]
            if new % (old // entry.factor):
                raise InternalError(f"{v.op} '{v.name}': {new} heads are not a multiple of the KV heads")
            writes[axis] = (Known(entry.factor, entry.factor_source), new // (old // entry.factor))
    _write_sources(edit, writes, v.name)


def _write_sources(edit, writes: dict, owner: str) -> None:
    """Write new values into the constants that run-time shape elements were read from;
    `writes` maps an output axis to (its Known element, new value)."""
    changes: dict[tuple[str, int], dict[int, int]] = {}
    for axis, (entry, new) in writes.items():
        if not isinstance(entry, Known) or entry.source is None:
            raise InternalError(f"'{owner}': target element {axis} is computed and cannot be rewritten")
        node_name, index, flat = entry.source
        changes.setdefault((node_name, index), {})[flat] = new
    nodes = {n.name: n for n in all_nodes(edit.graph)} if changes else {}  # Loop/Scan bodies too
    for (node_name, index), elems in changes.items():
        node = nodes[node_name]
        values = np.array(node.inputs[index].values)
        flat = values.reshape(-1)
        for k, new in elems.items():
            flat[k] = new
        edit.set_input_const(node, index, flat.reshape(values.shape))


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
            axes = tuple(perm.index(a) for a in slot_axes(slot))  # a paired slot keeps its (outer, inner) order
            return [identity(slot, (v.outputs[0], axes if len(axes) > 1 else axes[0]), n)]
        axes = tuple(perm[a] for a in slot_axes(slot))
        return [identity(slot, (v.inputs[0], axes if len(axes) > 1 else axes[0]), n)]


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
            return chunk_ties(v, slot)
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
        params = _slice_params(v)
        if params is None:
            return  # run-time bounds of an equal chunk follow the pruned channel count (chunks.py)
        starts, ends, axes, steps = params
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


def _last_axis_follower(reader: gs.Node, x: gs.Tensor, axis: int, opset: int) -> Slot | None:
    """The slot that must lose the same channels as axis `axis` of x because `reader` is a Reshape
    whose target ends with that dim (read only there), or None when `reader` is not one.

    `x.view(-1, x.size(-1))` (GPT-2's Conv1D) reads x's own last axis only to keep it last: x's slot.
    GPT-2's final `h.view(shape_of_embeddings)` reads the hidden size from another tensor: the
    data's last axis then gets the tie, so both always keep the same count and the run-time target
    stays right whatever the count becomes."""
    data = reader.inputs[0] if reader.op == "Reshape" else None
    if data is None or x.shape is None or data.shape is None or not data.shape:
        return None
    target = shape_value(reader.inputs[1], opset)
    wanted = Dim(x.name, axis)
    if not target or target[-1] != wanted or any(reads(e, x.name, axis) for e in target[:-1]):
        return None
    if data is x:
        return (x.name, axis) if axis == len(x.shape) - 1 else None
    n = x.shape[axis]
    return (data.name, len(data.shape) - 1) if isinstance(n, (int, np.integer)) and data.shape[-1] == n else None


def _sizes_follow_input(v: NodeView, axis: int) -> bool:
    """Run-time Resize sizes whose entry for `axis` is that dim of the Resize's own input, read by
    `Shape` (the TorchScript exporter's `interpolate(x, size=...)`: Concat(Shape(x)[:2], hw)): it
    follows the kept count by itself. Any other entry (a constant, another tensor's dim) does not."""
    if v.attr("axes") is not None:
        return False
    entries = shape_value(v.tensors[v.inputs[3]], v.opset)
    entry = entries[axis] if entries is not None and axis < len(entries) else None
    return isinstance(entry, Dim) and entry == Dim(v.inputs[0], axis, 1)


def merges_own_dims(reader: gs.Node, x: gs.Tensor, opset: int) -> bool:
    """Whether `reader` is a Reshape of `x` whose run-time target is x's leading dims as they are,
    then a product of the next few (`view(*x.shape[:k], -1)` written as Shape[k] * Shape[k+1]):
    the product follows the kept counts by itself, and the Reshape rule ties the merged axes."""
    if reader.op != "Reshape" or reader.inputs[0] is not x:
        return False
    target = shape_value(reader.inputs[1], opset) or []
    spans = [k for k, e in enumerate(target) if isinstance(e, Dim) and e.span > 1]
    return len(spans) == 1 and all(e == Dim(x.name, j) for j, e in enumerate(target[:spans[0]])) \
        and target[spans[0]] == Dim(x.name, spans[0], span=target[spans[0]].span) \
        and len(target) == spans[0] + 1


def _sized_by(reader: gs.Node, slot: Slot, n: int | None, opset: int) -> list[Tie] | None:
    """Ties from a channel axis to the output axes of a Reshape/Expand whose run-time target reads
    its size (times a constant, as KV heads x repeats in `repeat_kv`), or of a Resize whose run-time
    sizes do: the target then follows the kept count by itself, and the tie makes the output lose
    the matching elements. None when `reader` uses the dim any other way."""
    index = 3 if reader.op == "Resize" else 1
    if reader.op not in ("Reshape", "Expand", "Resize") or n is None or len(reader.inputs) <= index \
            or reader.outputs[0].shape is None or (reader.op == "Resize" and "axes" in reader.attrs):
        return None
    y, target = reader.outputs[0], shape_value(reader.inputs[index], opset)
    offset = len(y.shape) - len(target or [])
    if not target or offset < 0 or (reader.op != "Expand" and offset):
        return None
    ties = []
    for j, entry in enumerate(target):
        if reads(entry, *slot):
            if y.shape[offset + j] != n * entry.factor or not flows_from(reader.inputs[0], slot[0]):
                return None
            ties.append(block_tie(slot, (y.name, offset + j), n, entry.factor))
    return ties or None


def _reads_for_repeat(v: NodeView, reader: gs.Node) -> bool:
    """Whether a shape reader is a K/V repeat or the Reshape merging one (their targets)."""
    view = NodeView(reader, v.tensors, v.opset)
    return bool(repeat_axes(view)) if reader.op in ("Expand", "Tile") else (
        reader.op == "Reshape" and merges_repeat(view))


@register("Shape")
class Shape(OpRule):
    """Reading a tensor's shape is safe when no consumer picks out the channel dim."""

    def ties(self, v: NodeView, slot: Slot):
        rank = v.rank(v.inputs[0])
        start = v.attr("start", 0) % (rank + 1) if rank else 0
        end = v.attr("end", rank) if v.attr("end") is not None else rank
        end = end % (rank + 1) if end < 0 else min(end, rank)
        read = [a for a in slot_axes(slot) if start <= a < end]
        if not read:
            return []
        found = [dim_readers(v.node, a, v.opset) for a in read]
        if any(r is None for r in found):
            return Freeze("shape of a channel tensor feeds a computation onnxprune cannot follow")
        readers = [r for r in dict((r.name, r) for rs in found for r in rs).values()
                   if not merges_own_dims(r, v.node.inputs[0], v.opset)]
        if isinstance(slot[1], tuple):  # a (direction, unit) pair: only its own flatten may read it
            return Freeze(f"channel count is read at run time by {readers[0].op} '{readers[0].name}'") if readers else []
        if v.gqa == "query" and any(_reads_for_repeat(v, r) for r in readers):
            return Freeze("gqa='query': the K/V repeat reads the KV head count, which stays")
        followers = {r.name: _last_axis_follower(r, v.node.inputs[0], slot[1], v.opset) for r in readers}
        readers = [r for r in readers if followers[r.name] is None]
        if readers and only_chunk_bounds(v.node, v.tensors, v.opset):
            readers = []  # torch's chunk: the bounds follow the channel count (see ops/chunks.py)
        sized = [_sized_by(r, slot, v.dim(slot), v.opset) for r in readers]
        unread = [r for r, ties in zip(readers, sized) if ties is None]
        if unread:
            return Freeze(f"channel count is read at run time by {unread[0].op} '{unread[0].name}'")
        follow = [identity(slot, s, v.dim(slot)) for s in dict.fromkeys(followers.values()) if s not in (None, slot)]
        return follow + [t for ties in sized for t in ties]


def repeat_axes(v: NodeView) -> list[int]:
    """KV axes of a repeat: an axis of size 1 broadcast or tiled right after a full axis, as K/V
    heads are repeated for grouped-query attention ([B, kv_heads, 1, S, D]: masks are rank 4)."""
    x, y = v.inputs[0], v.outputs[0]
    rx, ry = v.rank(x), v.rank(y)
    if rx is None or ry is None or rx != ry or ry < 5:
        return []
    return [a for a in range(1, ry - 1)
            if (v.dim((x, a)) or 1) > 1 and v.dim((x, a)) == v.dim((y, a))
            and v.dim((x, a + 1)) == 1 and (v.dim((y, a + 1)) or 1) > 1]


def repeat_anchors(v: NodeView) -> list[Slot]:
    """In a repeat the full (KV) axis carries the channels, not the copies. With gqa='query' the
    copy axis does (query position j of every KV group), and the KV axis is anchored on the input
    side only, so K/V projections still split by head and freeze at the repeat."""
    axes = repeat_axes(v)
    if v.gqa == "query":
        return [(v.inputs[0], a) for a in axes] + [(v.outputs[0], a + 1) for a in axes]
    return [(v.outputs[0], a) for a in axes]


def query_repeat_ties(v: NodeView, slot: Slot, entry: "Known | Dim | bool | None") -> "list[Tie] | Freeze | None":
    """gqa='query' answers at a K/V repeat (None: not a repeat axis, or KV mode). The KV axis
    freezes (K/V heads stay whole); the copy axis is a broadcast with no tie to the input, valid
    when its repeat count (`entry`: a constant, or a run-time element) can be rewritten."""
    axes = repeat_axes(v) if v.gqa == "query" else []
    if slot[0] not in (v.inputs[0], v.outputs[0]) or not axes:
        return None
    if slot[1] in axes:
        return Freeze("gqa='query' keeps KV heads whole: K/V projections are not pruned")
    if slot[0] != v.outputs[0] or slot[1] - 1 not in axes:
        return None
    if entry is True or (isinstance(entry, Known) and entry.source is not None):
        return []
    return Freeze("gqa='query': the repeat count of the KV heads is computed and cannot be rewritten")


def merges_repeat(v: NodeView) -> bool:
    """Whether a Reshape merges a K/V repeat (its input is an Expand or Tile repeat's output)."""
    producer = v.node.inputs[0].inputs[0] if v.node.inputs and v.node.inputs[0].inputs else None
    return producer is not None and producer.op in ("Expand", "Tile") and bool(
        repeat_axes(NodeView(producer, v.tensors, v.opset)))


@register("Tile")
class Tile(OpRule):
    """Copies of the input along each axis (a Tile-based repeat of K/V heads). On an axis of size n
    repeated r times, output element k + j·n is input element k: channel k owns all its copies, and
    the output keeps r x the kept count with the repeats unchanged. Repeats must be constants (or
    traced to constants) on the channel axis; one computed from a dim at run time freezes it."""

    value_preserving = True

    def anchors(self, v: NodeView) -> list[Slot]:
        return repeat_anchors(v)

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze("Tile repeats are not a channel tensor")
        const = v.const(v.inp(1))
        repeats = ([Known(int(r)) for r in const.reshape(-1)] if const is not None
                   else shape_value(v.tensors[v.inputs[1]], v.opset))
        entry = repeats[slot[1]] if repeats is not None and slot[1] < len(repeats) else None
        query = query_repeat_ties(v, slot, True if const is not None else entry)
        if query is not None:
            return query
        if not isinstance(entry, Known) or entry.value < 1:
            return Freeze("Tile repeats of the channel axis are computed at run time")
        n = v.dim((x, slot[1]))
        if n is None or v.dim((y, slot[1])) != n * entry.value:
            return Freeze("unknown channel count at Tile")
        return [Tie((x, slot[1]), (y, slot[1]), np.tile(np.arange(n), entry.value), np.arange(n * entry.value))]

    def update(self, v: NodeView, edit) -> None:
        """An axis of size 1 whose copies lose elements (gqa='query') repeats the kept count."""
        x, y = v.inputs[0], v.outputs[0]
        news = {a: edit.new_dim((y, a)) for a in range(v.rank(y) or 0) if v.dim((x, a)) == 1}
        news = {a: n for a, n in news.items() if n is not None}
        if not news:
            return
        const = v.const(v.inp(1))
        if const is None:
            entries = shape_value(v.tensors[v.inputs[1]], v.opset) or []
            return _write_sources(edit, {a: (entries[a] if a < len(entries) else None, n) for a, n in news.items()},
                                  v.name)
        repeats = const.copy()
        for a, n in news.items():
            repeats[a] = n
        edit.set_input_const(v.node, 1, repeats)


@register("Expand")
class Expand(OpRule):
    """Broadcast to a target shape (GQA's repeat of K/V heads). An axis the input carries in full
    passes through; its target entry must be 1, a constant (rewritten with the kept count) or a
    dim read at run time (tied to the axis it sizes)."""

    value_preserving = True

    def anchors(self, v: NodeView) -> list[Slot]:
        return repeat_anchors(v)

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        rx, ry = v.rank(x), v.rank(y)
        if slot[0] not in (x, y) or rx is None or ry is None:
            return Freeze("Expand target shape is not a channel tensor, or ranks are unknown")
        out_axis = slot[1] + (ry - rx if slot[0] == x else 0)
        in_axis = out_axis - (ry - rx)
        target = ([Known(int(t)) for t in v.const(v.inputs[1]).reshape(-1)] if v.is_const(v.inputs[1])
                  else _computed_target(v))
        entry = target[out_axis] if target is not None and len(target) == ry else None
        query = query_repeat_ties(v, slot, True if v.is_const(v.inputs[1]) else entry)
        if query is not None:
            return query
        n = v.dim((y, out_axis))
        if slot[0] == y and _is_fill(v, x, in_axis) and isinstance(entry, Known) and (
                entry.source is not None or v.is_const(v.inputs[1])):
            return []  # one value broadcast (a zero state): any channel may go, `update` rewrites the count
        if n is None or in_axis < 0 or v.dim((x, in_axis)) != n:
            return Freeze("Expand broadcasts the channel axis")
        if entry is None or (isinstance(entry, Known) and entry.value not in (1, n)):
            return Freeze("Expand target for the channel axis is computed at run time")
        main = identity((x, in_axis), (y, out_axis), n)
        if v.is_const(v.inputs[1]) or entry == Dim(x, in_axis):
            return [main]
        extra = _target_entry_ties(v, target, [main])  # a dim read from another tensor (expand_as)
        return extra if isinstance(extra, Freeze) else [main] + extra

    def update(self, v: NodeView, edit) -> None:
        if not v.is_const(v.inputs[1]):
            return _update_computed_target(v, edit, fixed=(0, -1, 1))
        target = v.const(v.inputs[1]).copy()
        for axis in range(len(target)):
            new = edit.new_dim((v.outputs[0], axis))
            if new is not None and target[axis] != 1:
                target[axis] = new
        edit.set_input_const(v.node, 1, target)


def _is_fill(v: NodeView, x: str, in_axis: int) -> bool:
    """Whether Expand broadcasts one constant value along this axis (every element equal)."""
    value = v.const(x)
    return (value is not None and value.size > 0 and bool(np.all(value == value.reshape(-1)[0]))
            and (in_axis < 0 or v.dim((x, in_axis)) == 1))


@register("Gather")
class Gather(OpRule):
    """Axes other than the gathered one pass through, whatever the indices (ViT's class token
    `x[:, 0]`, an embedding lookup's hidden axis). On the gathered axis, constant indices map each
    output element to the input element they name (the dynamo exporter's `as_strided` on a
    flattened tensor) and are rewritten to the kept positions; indices computed at run time, or a
    scalar index picking one channel, freeze it.

    An embedding lookup (a 2-D constant table, axis 0, run-time ids) defines channels like a weight:
    the table's columns are the model's hidden size, so they seed a group that is the residual
    stream (`hidden`), pruned only on request."""

    value_preserving = True

    def _layout(self, v: NodeView):
        x, idx, y = v.inputs[0], v.const(v.inp(1)), v.outputs[0]
        rank = v.rank(x)
        idx_rank = idx.ndim if idx is not None else v.rank(v.inp(1))
        if rank is None or idx_rank is None:
            return Freeze("Gather rank of the data or the indices is unknown")
        return x, idx, idx_rank, y, v.attr("axis", 0) % rank

    def _table(self, v: NodeView) -> str | None:
        """The embedding table this node looks up, or None when it is not an embedding lookup
        (read from the tensor's shape and dtype: a large table is not loaded for this)."""
        table = v.tensors.get(v.inputs[0]) if v.is_const(v.inputs[0]) else None
        if table is None or table.shape is None or len(table.shape) != 2 or v.attr("axis", 0) % 2 != 0:
            return None
        return v.inputs[0] if v.inp(1) is not None and not v.is_const(v.inp(1)) else None

    def seeds(self, v: NodeView) -> list[Slot]:
        return self.hidden(v)

    def hidden(self, v: NodeView) -> list[Slot]:
        table = self._table(v)
        return [(table, 1)] if table is not None and v.dim((table, 1)) else []

    def roles(self, v: NodeView) -> dict[str, str]:
        table = self._table(v)
        return {table: "weight"} if table is not None else {}

    def ties(self, v: NodeView, slot: Slot):
        layout = self._layout(v)
        if isinstance(layout, Freeze):
            return layout
        x, idx, idx_rank, y, axis = layout
        if slot[0] not in (x, y):
            return Freeze("Gather indices are not a channel tensor")
        in_axis = slot[1] if slot[0] == x else _gather_in_axis(slot[1], axis, idx_rank)
        out_axis = slot[1] if slot[0] == y else (slot[1] if slot[1] < axis else slot[1] + idx_rank - 1)
        if in_axis is not None and in_axis != axis:
            n = v.dim((x, in_axis))
            return [identity((x, in_axis), (y, out_axis), n)] if n else Freeze("unknown channel count at Gather")
        if idx is None:
            return Freeze("Gather indices computed at run time pick elements of the channel axis")
        wide = [k for k, d in enumerate(idx.shape) if d != 1]
        n = v.dim((x, axis))
        if n is None or len(wide) != 1 or (slot[0] == y and slot[1] != axis + wide[0]):
            return Freeze("Gather picks single elements of the channel axis")
        picked = idx.reshape(-1) % n
        return [Tie((x, axis), (y, axis + wide[0]), picked, np.arange(len(picked)))]

    def update(self, v: NodeView, edit) -> None:
        layout = self._layout(v)
        if isinstance(layout, Freeze) or layout[1] is None:
            return  # only constant indices on the gathered axis are rewritten
        x, idx, _, y, axis = layout
        kept_in = edit.kept((x, axis))
        wide = [k for k, d in enumerate(idx.shape) if d != 1]
        if kept_in is None or len(wide) != 1:
            return
        n = v.dim((x, axis))
        picked = idx.reshape(-1) % n
        kept_out = edit.kept((y, axis + wide[0]))
        kept_out = np.arange(len(picked)) if kept_out is None else kept_out
        new = np.searchsorted(kept_in, picked[kept_out]).astype(idx.dtype)
        shape = list(idx.shape)
        shape[wide[0]] = len(new)
        edit.set_input_const(v.node, 1, new.reshape(shape))


def _gather_in_axis(out_axis: int, axis: int, index_rank: int) -> int | None:
    """The data axis an output axis of Gather comes from (None: an axis of the indices)."""
    if out_axis < axis:
        return out_axis
    if out_axis >= axis + index_rank:
        return out_axis - index_rank + 1
    return None


@register("ReverseSequence")
class ReverseSequence(OpRule):
    """Reverses each sequence along the time axis (Keras writes a backward recurrent layer's output
    so): every other axis but the batch axis passes through unchanged."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        x, y = v.inputs[0], v.outputs[0]
        if slot[0] not in (x, y):
            return Freeze("the sequence lengths of ReverseSequence carry no channels")
        rank = v.rank(x) or v.rank(y)
        fixed = {int(v.attr("batch_axis", 1)) % (rank or 2), int(v.attr("time_axis", 0)) % (rank or 2)}
        n = v.dim((x, slot[1])) or v.dim((y, slot[1]))
        if slot[1] in fixed or n is None:
            return Freeze("channels lie along the batch or time axis of ReverseSequence")
        return [identity((x, slot[1]), (y, slot[1]), n)]


@register("ConstantOfShape")
class ConstantOfShape(OpRule):
    """One value filled into a shape (torch's zero state `ConstantOfShape(Concat(batch, [H]))`):
    every channel holds the same value, so any may go; the constant element that spells the
    channel count is rewritten."""

    value_preserving = True

    def ties(self, v: NodeView, slot: Slot):
        if slot[0] != v.outputs[0]:
            return Freeze("the shape input of ConstantOfShape carries no channels")
        target = self._target(v)
        entry = target[slot[1]] if target is not None and slot[1] < len(target) else None
        if isinstance(entry, Known) and entry.source is not None:
            return []
        return Freeze("ConstantOfShape: the size of the channel axis is not a constant it can rewrite")

    def update(self, v: NodeView, edit) -> None:
        writes = {}
        for axis, entry in enumerate(self._target(v) or []):
            new = edit.new_dim((v.outputs[0], axis))
            if new is not None and isinstance(entry, Known):
                writes[axis] = (entry, new)
        _write_sources(edit, writes, v.name)

    @staticmethod
    def _target(v: NodeView) -> "list | None":
        shape = v.const(v.inputs[0])
        if shape is not None:
            return [Known(int(d), (v.name, 0, k)) for k, d in enumerate(shape.reshape(-1))]
        return shape_value(v.tensors[v.inputs[0]], v.opset)
