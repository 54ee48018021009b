"""Exporter idioms rewritten, at import, into the plain form the op rules reason about.

Both rewrites are exact (same values, bit for bit) and only make the channel structure visible:

- Exporters deduplicate equal initializers: the TorchScript exporter through `Identity` nodes, the
  dynamo exporter by feeding one initializer to many nodes. Random-init zero biases or planted
  zero rows are then shared by unrelated layers and would tie their channels together, so each
  extra use of a small constant gets a private copy (`<name>__shared<k>`); `rejoin_copies` shares
  the copies that are still equal again before export, so an unpruned model does not grow.
- The dynamo exporter also shares one computed reshape target among layers; each reader gets its
  own Concat so a layer's head count can change alone.
- A product of a zero state and a constant weight (`MatMul(0, W)`: the dynamo exporter's unrolled
  `nn.RNN` multiplies its zero initial state by the recurrent weight at the first step) is a zero
  fill of the product's shape (`fold_zero_products`). The state's width was tied to nothing (the
  weight's rows are a contraction, reached only from the state), so that step's weight kept all its
  rows; the fill's output meets the units at the bias Add, and its constant width is rewritten.
- The dynamo exporter decomposes `Kᵀ` of scaled dot-product attention into
  Reshape [B·H, S, D] → Transpose → Reshape [B, H, D, S], which merges the head axis with the
  symbolic batch axis; it is one Transpose(perm [0, 1, 3, 2]).
- Loop/Scan bodies (`canonicalize_bodies`) get names unique across scopes, read pass-through
  carried constants from the outer scope, and private copies of shared constants and zero states
  (see ops/control_flow.py).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.control_flow import all_nodes, all_tensors, bodies, fill_value, scope_of
from onnxprune.ops.shape_values import Dim, Known, shape_value
from onnxprune.passes import batch_shapes
from onnxprune.passes.rewire import replace_uses, set_input

SMALL_CONSTANT = 1 << 16
"""Elements up to which a shared constant is copied (large shared tensors are shared on purpose:
tied weights)."""

COPY_MARK = "__shared"


def canonicalize(graph: gs.Graph, opset: int) -> gs.Graph:
    """Apply every rewrite of this module to `graph` in place; returns it."""
    canonicalize_bodies(graph)
    fold_zero_products(graph)
    split_shared_constants(graph)
    split_shared_shape_targets(graph)
    fold_transpose_round_trips(graph, opset)
    batch_shapes.rewrite(graph, opset)
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    return graph


def split_shared_constants(graph: gs.Graph) -> None:
    """Give every extra reader of a small multi-element constant its own copy."""
    for node in list(graph.nodes):  # Identity(initializer) is a shared constant by another name
        if node.op == "Identity" and isinstance(node.inputs[0], gs.Constant) and node.outputs[0] not in graph.outputs:
            replace_uses(node.outputs[0], node.inputs[0])
            node.outputs.clear()
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or not 1 < _size(tensor) <= SMALL_CONSTANT:
                continue
            k = uses.get(tensor.name, 0)
            uses[tensor.name] = k + 1
            if k:
                set_input(node, i, gs.Constant(f"{tensor.name}{COPY_MARK}{k}", np.array(tensor.values, copy=True)))


def fold_zero_products(graph: gs.Graph) -> None:
    """`MatMul(A, W)` where every element of A is 0 (a fill, see `fill_value`) and W is a finite 2-D
    constant becomes `ConstantOfShape(Concat(Shape(A)[:-1], [N]), 0)`: exact (0·w = 0 for finite w),
    and the width N is a constant the ConstantOfShape rule rewrites with the kept units. Runs before
    `split_shared_constants`, so W, when the other steps read it too, gets no private copy for a
    product that is gone. Outer graph only (bodies keep their nodes)."""
    changed = False
    for node in list(graph.nodes):
        if not _zero_product(node):
            continue
        a, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        rank, name = len(a.shape), f"{y.name}_zero"  # tensor names are unique, node names may be empty
        shape = gs.Variable(f"{name}_input_shape", dtype=np.int64, shape=[rank])
        lead = gs.Variable(f"{name}_lead", dtype=np.int64, shape=[rank - 1])
        target = gs.Variable(f"{name}_shape", dtype=np.int64, shape=[rank])
        axes = gs.Constant(f"{name}_lead_axes", np.arange(rank - 1, dtype=np.int64))
        width = gs.Constant(f"{name}_width", np.array([w.shape[1]], dtype=np.int64))
        zero = gs.Constant(f"{name}_value", np.zeros(1, dtype=np.dtype(a.dtype)))
        node.outputs.clear()
        graph.nodes += [gs.Node("Shape", f"{name}_Shape", inputs=[a], outputs=[shape]),
                        gs.Node("Gather", f"{name}_Gather", {"axis": 0}, [shape, axes], [lead]),
                        gs.Node("Concat", f"{name}_Concat", {"axis": 0}, [lead, width], [target]),
                        gs.Node("ConstantOfShape", f"{name}_fill", {"value": zero}, [target], [y])]
        changed = True
    if changed:
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        graph.toposort()


def _zero_product(node: gs.Node) -> bool:
    """Whether `node` is `MatMul(A, W)` with A all zeros (float, rank >= 2 known) and W a finite
    2-D constant."""
    if node.op != "MatMul" or len(node.inputs) != 2:
        return False
    a, w = node.inputs
    if not isinstance(a, gs.Variable) or not isinstance(w, gs.Constant) or a.shape is None or len(a.shape) < 2 \
            or a.dtype is None or len(w.shape) != 2 or fill_value(a) != 0.0:
        return False
    try:
        floating = np.issubdtype(np.dtype(a.dtype), np.floating)
    except TypeError:  # a dtype numpy does not know (bfloat16)
        return False
    return floating and bool(np.all(np.isfinite(np.asarray(w.values))))  # 0·inf is NaN


def split_shared_shape_targets(graph: gs.Graph) -> None:
    """Give every Reshape/Expand its own Concat building its target shape.

    The dynamo exporter builds one target such as [B, 4, S, 16] for the reshapes of several layers;
    layers may keep different head counts, so each reader must own the constants it has rewritten.
    """
    for node in list(graph.nodes):
        if node.op not in ("Reshape", "Expand") or len(node.inputs) < 2:
            continue
        target = node.inputs[1]
        if isinstance(target, gs.Constant) or len(target.inputs) != 1 or len(target.outputs) < 2:
            continue
        producer = target.inputs[0]
        if producer.op != "Concat" or node is target.outputs[0]:
            continue
        own = gs.Variable(f"{target.name}_{node.name}", dtype=target.dtype, shape=target.shape)
        graph.nodes.append(gs.Node("Concat", f"{producer.name}_{node.name}", attrs=dict(producer.attrs),
                                   inputs=list(producer.inputs), outputs=[own]))
        node.inputs[1] = own


def rejoin_copies(graph: gs.Graph) -> None:
    """Point readers of a copy made by `split_shared_constants` back at the original, or at an
    earlier copy of the same original, where the two are still equal (neither was sliced, or both
    were sliced alike): layers that shared a zero bias and lost the same number of channels share
    one again, as the exporter had them, instead of each carrying its own."""
    constants = {name: t for name, t in all_tensors(graph).items() if isinstance(t, gs.Constant)}
    kept: dict[str, list[gs.Constant]] = {}
    for node in all_nodes(graph):  # copies read inside Loop/Scan bodies too
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or COPY_MARK not in tensor.name:
                continue
            base = tensor.name.rsplit(COPY_MARK, 1)[0]
            alike = kept.setdefault(base, [constants[base]] if base in constants else [])
            match = next((c for c in alike if c is not tensor and _equal(c, tensor)), None)
            if match is None:
                alike.append(tensor)
            else:
                node.inputs[i] = match


def fold_transpose_round_trips(graph: gs.Graph, opset: int) -> None:
    """Reshape(x[B,H,S,D] → [-1,S,D]) → Transpose(0,2,1) → Reshape(→ [B,H,D,S]) becomes
    Transpose(x, perm [0,1,3,2])."""
    for last in list(graph.nodes):
        first_t = _round_trip_source(last, opset)
        if first_t is None:
            continue
        out = last.outputs[0]
        last.outputs.clear()
        graph.nodes.append(gs.Node("Transpose", f"{last.name}_as_transpose", attrs={"perm": [0, 1, 3, 2]},
                                   inputs=[first_t], outputs=[out]))
    graph.toposort()


def _round_trip_source(last: gs.Node, opset: int) -> gs.Tensor | None:
    """The x of the round trip ending at `last`, or None when `last` does not end one."""
    if last.op != "Reshape" or len(last.inputs) < 2:
        return None
    mid = last.inputs[0]
    if len(mid.inputs) != 1 or mid.inputs[0].op != "Transpose" or len(mid.outputs) != 1:
        return None
    transpose = mid.inputs[0]
    if list(transpose.attrs.get("perm", [])) != [0, 2, 1]:
        return None
    flat = transpose.inputs[0]
    if len(flat.inputs) != 1 or flat.inputs[0].op != "Reshape" or len(flat.outputs) != 1:
        return None
    first = flat.inputs[0]
    x = first.inputs[0]
    if x.shape is None or len(x.shape) != 4:
        return None
    d = [Dim(x.name, axis) for axis in range(4)]
    into = _target(first, opset)
    back = _target(last, opset)
    if into != [Known(-1), d[2], d[3]] or back != [d[0], d[1], d[3], d[2]]:
        return None
    return x


def _target(reshape: gs.Node, opset: int) -> list | None:
    """A reshape target as Dim/Known entries (sources dropped, so entries compare by value)."""
    shape = reshape.inputs[1]
    if isinstance(shape, gs.Constant):
        return [Known(int(v)) for v in np.asarray(shape.values).reshape(-1)]
    entries = shape_value(shape, opset)
    return None if entries is None else [Known(e.value) if isinstance(e, Known) else e for e in entries]


def _size(tensor: gs.Constant) -> int:
    return int(np.prod(tensor.shape)) if tensor.shape is not None else 0


def _equal(a: gs.Constant, b: gs.Constant) -> bool:
    if tuple(a.shape) != tuple(b.shape) or _size(a) > SMALL_CONSTANT:
        return False
    va, vb = np.asarray(a.values), np.asarray(b.values)
    return va.dtype == vb.dtype and np.array_equal(va, vb)


# --- Loop/Scan bodies -----------------------------------------------------------------------------

def canonicalize_bodies(graph: gs.Graph) -> None:
    """Make body names unique across scopes and pass-through carried constants outer-scope reads,
    and give each body reader private copies of shared small constants and zero states (exact
    rewrites, see ops/control_flow.py; `ir.to_graph` has already made Constant nodes initializers)."""
    seen = dict(graph.tensors())
    taken_nodes = {n.name for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    for node, body in list(bodies(graph)):
        _unique_names(body, seen, taken_nodes)
        if node.op == "Loop":
            _inline_invariants(node, body, outputs)
            _carried_shapes(node, body)
    found = list(bodies(graph))
    for node, body in found:
        _private_copies(body)
        _private_fills(graph, node)
    if found:
        graph.toposort()  # copied fills run before their loops


def _unique_names(body: gs.Graph, seen: dict[str, gs.Tensor], nodes: set[str]) -> None:
    """Rename body tensors whose name another scope gives to a different tensor, and body nodes
    whose name is empty or taken (binding is positional, so a body's own names are free to change;
    outer tensors the body reads are the same objects and keep theirs)."""
    for name, tensor in body.tensors().items():
        if name in seen and seen[name] is not tensor:
            k = 1
            while f"{name}__{k}" in seen:
                k += 1
            tensor.name = f"{name}__{k}"
        seen[tensor.name] = tensor
    for index, node in enumerate(body.nodes):
        if not node.name or node.name in nodes:
            base = node.name or f"{node.op}_{index}"
            name, k = base, 0
            while name in nodes:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        nodes.add(node.name)


def _carried_shapes(loop: gs.Node, body: gs.Graph) -> None:
    """Pin a carried value's dims that the body input leaves symbolic where the initial value and
    the body's output agree on a static size (by induction every iteration has it): exporters
    declare body inputs with symbolic dims (torch.jit.script loops)."""
    for k in range(len(loop.inputs) - 2):
        start, inside, result = loop.inputs[2 + k], body.inputs[2 + k], body.outputs[1 + k]
        if not all(t.shape is not None for t in (start, inside, result)) or not \
                len(start.shape) == len(inside.shape) == len(result.shape):
            continue
        inside.shape = [int(b) if isinstance(b, (int, np.integer)) and b == c else a
                        for a, b, c in zip(inside.shape, start.shape, result.shape)]


def _private_copies(body: gs.Graph) -> None:
    """Every body reader of a small constant that others read too gets its own copy, as
    `split_shared_constants` does in the outer graph (exporters deduplicate equal initializers: two
    GRU layers' zero biases, once inlined, would otherwise tie the layers' units)."""
    for node in body.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and len(tensor.outputs) > 1 and 1 < _size(tensor) <= SMALL_CONSTANT:
                set_input(node, i, gs.Constant(f"{tensor.name}{COPY_MARK}_{node.name}", np.array(tensor.values, copy=True)))


def _private_fills(graph: gs.Graph, owner: gs.Node) -> None:
    """A zero state (`Expand(0, shape)`, `ConstantOfShape(shape)`) that several loops start from
    (tf2onnx shares one between the two directions of a Keras Bidirectional) gets one copy per
    loop, with its own target shape, so their units stay apart."""
    for i, tensor in enumerate(owner.inputs):
        producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None
        if producer is None or producer.op not in ("Expand", "ConstantOfShape") or len(tensor.outputs) < 2 \
                or fill_value(tensor) is None:
            continue
        owner.inputs[i] = _copy_chain(tensor, owner.name, scope_of(graph, producer))


TARGET_OPS = ("Expand", "ConstantOfShape", "Cast", "Concat", "Unsqueeze", "Identity")
"""Ops a zero state and its target shape are built from, copied per reader by `_private_fills`."""


def _copy_chain(tensor: gs.Tensor, suffix: str, scope: gs.Graph) -> gs.Tensor:
    """A private copy of `tensor` for one reader: constants are copied, and so are the TARGET_OPS
    nodes computing it from them, so each reader's channel count can be rewritten alone; other
    run-time values (the batch size read by Shape) stay shared."""
    name = f"{tensor.name}{COPY_MARK}_{suffix}"
    if isinstance(tensor, gs.Constant):
        return gs.Constant(name, np.array(tensor.values, copy=True))
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op not in TARGET_OPS:
        return tensor
    inputs = [_copy_chain(t, suffix, scope) for t in producer.inputs]
    copy = gs.Variable(name, dtype=tensor.dtype, shape=tensor.shape)
    scope.nodes.append(gs.Node(producer.op, f"{producer.name}_{suffix}", dict(producer.attrs), inputs, [copy]))
    return copy


def _inline_invariants(loop: gs.Node, body: gs.Graph, graph_outputs: set[str]) -> None:
    """Drop loop-carried values that start as a constant and that the body returns unchanged: the
    body reads the constant itself, and outer readers of the final value read it too."""
    carried = len(loop.inputs) - 2
    drop = []
    for k in range(carried):
        start, inside = loop.inputs[2 + k], body.inputs[2 + k]
        final = loop.outputs[k].name if k < len(loop.outputs) else ""
        if (isinstance(start, gs.Constant) and body.outputs[1 + k] is inside
                and sum(t is inside for t in body.outputs) == 1 and final not in graph_outputs):
            drop.append(k)
    for k in reversed(drop):
        start, inside = loop.inputs[2 + k], body.inputs[2 + k]
        replace_uses(inside, start)
        if k < len(loop.outputs):
            replace_uses(loop.outputs[k], start)
            del loop.outputs[k]
        del loop.inputs[2 + k], body.inputs[2 + k], body.outputs[1 + k]
