"""Layout and shape arithmetic. Integer shape tensors are int64 torch tensors, so run-time reshape
targets (Shape -> Gather -> Concat -> Reshape) follow the actual batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxprune.train.ops import Node, axis_of, ints, torch_dtype, torch_op


def _long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _wrapped(indices, size):
    """Indices with negative ones counted from the end of an axis of `size`, as int64."""
    return torch.where(indices < 0, indices + size, indices).long()


@torch_op("Constant")
def constant(node: Node):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            if isinstance(value, torch.Tensor):
                return value
            dtype = torch.float32 if key.startswith("value_float") else torch.int64
            return torch.tensor(value, dtype=dtype)
    raise node.error("only numeric value attributes have a training rule")


@torch_op("Shape")
def shape(node: Node, x):
    return _long(x.shape[node.attr("start", 0):node.attr("end", None)])


@torch_op("Size")
def size(node: Node, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@torch_op("Reshape")
def reshape(node: Node, x, target):
    dims = ints(target)
    if not node.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@torch_op("Flatten")
def flatten(node: Node, x):
    axis = axis_of(node.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _axes(node: Node, axes) -> list[int] | None:
    return node.attr("axes") if node.opset < 13 else (None if axes is None else ints(axes))


@torch_op("Squeeze")
def squeeze(node: Node, x, axes=None):
    listed = _axes(node, axes)
    if listed is None:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(a, x.dim()) for a in listed)) if listed else x


@torch_op("Unsqueeze")
def unsqueeze(node: Node, x, axes=None):
    listed = _axes(node, axes)
    rank = x.dim() + len(listed)
    for a in sorted(axis_of(a, rank) for a in listed):
        x = x.unsqueeze(a)
    return x


@torch_op("Transpose")
def transpose(node: Node, x):
    return x.permute(node.attr("perm") or list(range(x.dim() - 1, -1, -1)))


@torch_op("Concat")
def concat(node: Node, *xs):
    return torch.cat([x for x in xs if x is not None], node.attr("axis"))


@torch_op("Split")
def split(node: Node, x, sizes=None):
    axis = axis_of(node.attr("axis", 0), x.dim())
    n = x.shape[axis]
    listed = node.attr("split") if node.opset < 13 else (ints(sizes) if sizes is not None else None)
    if not listed:
        parts = node.attr("num_outputs", node.num_outputs)
        chunk = -(-n // parts)
        listed = [min(chunk, n - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, listed, axis))


def _slice_one(x, axis: int, start: int, end: int, step: int):
    n = x.shape[axis]
    if step > 0:
        start = min(max(start + n if start < 0 else start, 0), n)
        end = min(max(end + n if end < 0 else end, 0), n)
        index = [slice(None)] * axis + [slice(start, end, step)]
        return x[tuple(index)]
    start = min(max(start + n if start < 0 else start, 0), n - 1)
    end = min(max(end + n if end < 0 else end, -1), n - 1)
    return x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))


@torch_op("Slice")
def slice_(node: Node, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
    else:
        starts, ends, axes = ints(starts), ints(ends), (ints(axes) if axes is not None else None)
    axes = axes or list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        x = _slice_one(x, axis_of(axis, x.dim()), start, end, step)
    return x


@torch_op("Gather")
def gather(node: Node, x, indices):
    axis = axis_of(node.attr("axis", 0), x.dim())
    indices = _wrapped(indices, x.shape[axis])
    picked = x.index_select(axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


@torch_op("GatherElements")
def gather_elements(node: Node, x, indices):
    axis = axis_of(node.attr("axis", 0), x.dim())
    return torch.gather(x, axis, _wrapped(indices, x.shape[axis]))


@torch_op("Expand")
def expand(node: Node, x, target):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(target))))


@torch_op("Tile")
def tile(node: Node, x, repeats):
    return x.repeat(ints(repeats))


@torch_op("Range")
def range_(node: Node, start, limit, delta):
    n = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return start + torch.arange(n, dtype=start.dtype) * delta


@torch_op("ConstantOfShape")
def constant_of_shape(node: Node, target):
    value = node.attr("value")
    if value is None:
        return torch.zeros(ints(target), dtype=torch.float32)
    return torch.full(ints(target), value.reshape(-1)[0].item(), dtype=value.dtype)


@torch_op("Trilu")
def trilu(node: Node, x, k=None):
    k = 0 if k is None else int(k)
    return torch.triu(x, k) if node.attr("upper", 1) else torch.tril(x, k)


@torch_op("NonZero")
def non_zero(node: Node, x):
    return torch.nonzero(x).t().contiguous()


def _pad_indices(mode: str, n: int, begin: int, end: int) -> torch.Tensor:
    p = torch.arange(-begin, n + end)
    if mode == "edge":
        return p.clamp(0, n - 1)
    if mode == "wrap":
        return p.remainder(n)
    p = p.abs()  # reflect: mirror at both ends without repeating the edge
    return torch.where(p > n - 1, 2 * (n - 1) - p, p)


@torch_op("Pad")
def pad(node: Node, x, pads=None, value=None, axes=None):
    if node.opset < 11:
        pads, value, axes = node.attr("pads"), node.attr("value", 0.0), None
    else:
        pads, axes = ints(pads), (ints(axes) if axes is not None else None)
        value = 0 if value is None else value.item()
    axes = [axis_of(a, x.dim()) for a in axes] if axes else list(range(x.dim()))
    half = len(pads) // 2
    begin, end = dict(zip(axes, pads[:half])), dict(zip(axes, pads[half:]))
    mode = node.attr("mode", "constant")
    if mode == "constant":
        flat: list[int] = []
        for a in range(x.dim() - 1, -1, -1):
            flat += [begin.get(a, 0), end.get(a, 0)]
        return F.pad(x, flat, value=value)
    for a in axes:  # a negative pad crops first, then the mode fills from what is left
        if begin[a] < 0 or end[a] < 0:
            x = x.narrow(a, max(-begin[a], 0), x.shape[a] - max(-begin[a], 0) - max(-end[a], 0))
        if begin[a] > 0 or end[a] > 0:
            x = x.index_select(a, _pad_indices(mode, x.shape[a], max(begin[a], 0), max(end[a], 0)))
    return x


@torch_op("OneHot")
def one_hot(node: Node, indices, depth, values):
    depth = int(depth)
    indices = _wrapped(indices, depth)
    hot = F.one_hot(indices.clamp(0, depth - 1), depth).bool() & ((indices >= 0) & (indices < depth)).unsqueeze(-1)
    y = torch.where(hot, values[1], values[0])
    return y.movedim(-1, axis_of(node.attr("axis", -1), y.dim()))


@torch_op("GatherND")
def gather_nd(node: Node, x, indices):
    """Index tuples over the axes after `batch_dims` (dynamo exports pick the last token with it)."""
    batch_dims = node.attr("batch_dims", 0)
    depth = indices.shape[-1]
    batch = math.prod(x.shape[:batch_dims])
    indexed = x.shape[batch_dims:batch_dims + depth]
    rest = x.shape[batch_dims + depth:]
    tuples = _wrapped(indices.reshape(batch, -1, depth).long(), torch.tensor(indexed))
    flat = torch.zeros(tuples.shape[:2], dtype=torch.int64)
    for j, size in enumerate(indexed):
        flat = flat * size + tuples[..., j]
    table = x.reshape(batch, math.prod(indexed), *rest)
    picked = table[torch.arange(batch).unsqueeze(1), flat]
    return picked.reshape((*indices.shape[:-1], *rest))


@torch_op("ReverseSequence")
def reverse_sequence(node: Node, x, lengths):
    """Reverse the first lengths[b] steps of every batch entry (Keras go_backwards)."""
    time, batch = node.attr("time_axis", 0), node.attr("batch_axis", 1)
    steps = torch.arange(x.shape[time]).unsqueeze(1)  # [T, 1]
    lengths = lengths.long().unsqueeze(0)  # [1, B]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [T, B]
    if time > batch:
        index = index.t()
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(x.shape)
    return torch.gather(x, time, index)
