"""Run-time shape targets of layout ops (Reshape, Expand, Tile, ConstantOfShape): read, tied, rewritten.

Exporters with a dynamic batch build these targets at run time (Shape -> Gather -> Concat). An
element read from a dim follows the pruned channels by itself when it is the data's own channels
(`flows_from`); a constant element read from an initializer is rewritten in place
(`write_sources`). K/V repeats of grouped-query attention are recognised here too, since a
target that merges one needs its repeat factor rewritten instead.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import InternalError
from onnxprune.ops.base import Freeze, NodeView, Slot, Tie
from onnxprune.ops.control_flow import all_nodes
from onnxprune.ops.shape_values import Dim, Known, dim_size, shape_value


def computed_target(v: NodeView):
    """A run-time Reshape target (Shape → Gather → Slice → Concat) evaluated element by element.

    Its dims that `Shape` reads follow the pruned tensors by themselves (the Shape rule freezes a
    channel count that reaches one); the constant elements are rewritten by the update below.
    """
    return shape_value(v.tensors[v.inputs[1]], v.opset)


def target_entry_ties(v: NodeView, target: list, ties: list[Tie]) -> "list[Tie] | Freeze":
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
            continue  # KV heads stay; the update rewrites the repeat factor (update_computed_target)
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


def update_computed_target(v: NodeView, edit, fixed: tuple[int, ...] = (0, -1)) -> None:
    """Rewrite the constant elements that spell changed output dims, in the constants they come from.
    Elements equal to a value in `fixed` (copy, infer; broadcast for Expand) stay."""
    writes = {}
    for axis, entry in enumerate(computed_target(v) or []):
        new = edit.new_dim((v.outputs[0], axis))
        if new is not None and isinstance(entry, Known) and entry.value not in (*fixed, new):
            writes[axis] = (entry, new)
        elif new is not None and isinstance(entry, Dim) and entry.factor != 1 and edit.new_dim(
                (entry.tensor, entry.axis)) is None:  # gqa='query': KV heads x the kept repeats
            old = edit.analysis.slot_sizes[(v.outputs[0], axis)]
            if new % (old // entry.factor):
                raise InternalError(f"{v.op} '{v.name}': {new} heads are not a multiple of the KV heads")
            writes[axis] = (Known(entry.factor, entry.factor_source), new // (old // entry.factor))
    write_sources(edit, writes, v.name)


def write_sources(edit, writes: dict, owner: str) -> None:
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


def merges_repeat(v: NodeView) -> bool:
    """Whether a Reshape merges a K/V repeat (its input is an Expand or Tile repeat's output)."""
    producer = v.node.inputs[0].inputs[0] if v.node.inputs and v.node.inputs[0].inputs else None
    return producer is not None and producer.op in ("Expand", "Tile") and bool(
        repeat_axes(NodeView(producer, v.tensors, v.opset)))
