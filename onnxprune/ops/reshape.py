"""Reshape-like ops: they merge and split axes without changing values.

Reshape, Flatten, Squeeze and Unsqueeze share one rule that works on the inferred input and
output shapes, whatever the layout: the channel axis is located inside the block of axes whose
cumulative size both shapes share, and each channel maps to the elements it occupies there
(a block of H*W features after an NCHW flatten, a stride-C comb after an NHWC one, the inner axis
of a channel-shuffle split).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from onnxprune.ops.base import Defer, Freeze, NodeView, OpRule, Slot, Tie, identity, register
from onnxprune.ops.shape_values import Dim, Known, dim_size
from onnxprune.ops.targets import computed_target, target_entry_ties, update_computed_target


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
        if v.op == "Reshape" and v.const(v.inp(1)) is None and computed_target(v) is None:
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
        extra = target_entry_ties(v, computed_target(v), ties)
        return extra if isinstance(extra, Freeze) else ties + extra

    def update(self, v: NodeView, edit) -> None:
        if v.op != "Reshape":
            return
        if v.const(v.inputs[1]) is None:
            return update_computed_target(v, edit)
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
    entries = [int(t) for t in target.reshape(-1)] if target is not None else computed_target(v)
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
