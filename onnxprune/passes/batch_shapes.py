"""Reshapes of exports with a dynamic batch (or sequence) axis, rewritten exactly at import.

Exported with `dynamic_axes` / `dynamic_shapes`, a model computes its reshape targets at run time
and may fold the batch into another axis. Two rewrites make the channel structure visible again:

- `pin_static_targets`: a Reshape target computed at run time (`Shape → Gather → Div → Cast →
  Concat`, reading the residual width to get a head size, the packed projection width, a patch
  grid) becomes a target whose every static output dim is a constant. The output's dims are known
  from shape inference at two input sizes (`static_shapes.py`): a dim equal in both is the same for
  every input, so spelling it as a constant is exact, and the rewrite can change it when channels
  go. The dynamic dims are read from the reshape's own input (`Shape → Gather`, times a constant)
  or left to a single -1. A target that already reads only constants and its own input stays.
- `split_batch_heads`: `nn.MultiheadAttention` merges the batch with the heads,
  `[S, B, H·D] → [S, B·H, D] → Transpose → [B·H, S, D] → [B, H, S, D]`. A channel cannot be
  followed through an axis of symbolic size B·H, so the first reshape splits into `[S, B, H, D]`
  at once, the transposes move the pair (B, H) together, and the last reshape, now an identity,
  goes.
- `drop_identity_gathers`: the dynamo exporter's `as_strided` over a flattened tensor, whose
  indices are built at run time from the batch size, is an identity when the indices spell the
  tensor's own layout; it goes too.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.shape_values import Dim, Known, shape_value
from onnxprune.passes import static_values
from onnxprune.passes.rewire import replace_uses


def rewrite(graph: gs.Graph, opset: int) -> None:
    """Every rewrite of this module (and the static values of `static_values.py`), in place. Run at
    import and again after constant folding, which makes more shapes known (a target built with
    `Mod` of constants)."""
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    pin_static_targets(graph, opset)
    static_values.pin_static_values(graph, opset)
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    split_batch_heads(graph)
    drop_identity_gathers(graph)
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    graph.toposort()


def pin_static_targets(graph: gs.Graph, opset: int) -> None:
    """Rewrite run-time Reshape targets whose static dims are not plain constants (see module doc)."""
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) < 2 or not node.outputs or isinstance(node.inputs[1], gs.Constant):
            continue
        x, y = node.inputs[0], node.outputs[0]
        dims = _dims(y)
        if dims is None or _plain(shape_value(node.inputs[1], opset), x):
            continue
        target = build_target(graph, x, dims, node.name)
        if target is not None:
            node.inputs[1] = target


def _dims(tensor: gs.Tensor) -> list | None:
    """Static ints and symbol names of a tensor's dims; None when one is unknown or zero."""
    if tensor.shape is None:
        return None
    dims = list(tensor.shape)
    ok = all(isinstance(d, str) or (isinstance(d, (int, np.integer)) and d > 0) for d in dims)
    return [d if isinstance(d, str) else int(d) for d in dims] if ok else None


def _plain(entries: "list | None", x: gs.Tensor) -> bool:
    """Whether a target already reads only constants (with their source) and dims of `x`."""
    if entries is None:
        return False
    return all((isinstance(e, Known) and (e.source is not None or e.value in (0, -1)))
               or (isinstance(e, Dim) and e.tensor == x.name) for e in entries)


def build_target(graph: gs.Graph, x: gs.Tensor, dims: list, owner: str) -> gs.Tensor | None:
    """A target tensor spelling `dims` for a reshape of `x`: static dims as constants, symbolic dims
    as `factor × x.shape[k]` (read at run time) and at most one -1; None when that cannot be done."""
    if sum(not isinstance(d, int) for d in dims) == 1:
        return gs.Constant(f"{owner}_target", np.array([d if isinstance(d, int) else -1 for d in dims], dtype=np.int64))
    xs = list(x.shape) if x.shape is not None else []
    pieces: list[gs.Tensor] = []
    consts: list[int] = []
    unknown = 0
    for d in dims:
        if isinstance(d, int):
            consts.append(d)
            continue
        read = _read_dim(xs, d)
        if read is None:
            unknown += 1
            consts.append(-1)
            continue
        if consts:
            pieces.append(gs.Constant(f"{owner}_target_{len(pieces)}", np.array(consts, dtype=np.int64)))
            consts = []
        pieces.append(_dim_reader(graph, x, *read, owner, len(pieces)))
    if unknown > 1:
        return None
    if consts or not pieces:
        pieces.append(gs.Constant(f"{owner}_target_{len(pieces)}", np.array(consts, dtype=np.int64)))
    if len(pieces) == 1 and isinstance(pieces[0], gs.Constant):
        return pieces[0]
    out = gs.Variable(f"{owner}_target", dtype=np.int64, shape=[len(dims)])
    graph.nodes.append(gs.Node("Concat", f"{owner}_target_concat", attrs={"axis": 0}, inputs=pieces, outputs=[out]))
    return out


def _read_dim(xs: list, symbol: str) -> "tuple[int, int] | None":
    """(axis of x, factor) with `symbol` = factor × that axis' symbolic size, or None."""
    for k, d in enumerate(xs):
        if d == symbol:
            return k, 1
    head, _, rest = symbol.partition("*")
    if head.isdigit() and rest in xs:
        return xs.index(rest), int(head)
    return None


def _dim_reader(graph: gs.Graph, x: gs.Tensor, axis: int, factor: int, owner: str, k: int) -> gs.Tensor:
    """`[factor × x.shape[axis]]` as a 1-element int64 tensor computed at run time."""
    shape = gs.Variable(f"{owner}_shape_{k}", dtype=np.int64, shape=[len(x.shape)])
    graph.nodes.append(gs.Node("Shape", f"{owner}_shape_{k}", inputs=[x], outputs=[shape]))
    dim = gs.Variable(f"{owner}_dim_{k}", dtype=np.int64, shape=[1])
    graph.nodes.append(gs.Node("Gather", f"{owner}_dim_{k}", attrs={"axis": 0},
                               inputs=[shape, gs.Constant(f"{owner}_axis_{k}", np.array([axis], dtype=np.int64))],
                               outputs=[dim]))
    if factor == 1:
        return dim
    scaled = gs.Variable(f"{owner}_scaled_{k}", dtype=np.int64, shape=[1])
    graph.nodes.append(gs.Node("Mul", f"{owner}_scaled_{k}",
                               inputs=[dim, gs.Constant(f"{owner}_factor_{k}", np.array([factor], dtype=np.int64))],
                               outputs=[scaled]))
    return scaled


def split_batch_heads(graph: gs.Graph) -> None:
    """Undo the batch x heads merge of `nn.MultiheadAttention` (see module doc)."""
    outputs = {t.name for t in graph.outputs}
    for first in list(graph.nodes):
        found = _batch_head_chain(first, outputs)
        if found is None:
            continue
        transposes, last, heads = found
        x, y = first.inputs[0], first.outputs[0]
        xs = _dims(x)
        split = xs[:-1] + [heads, xs[-1] // heads]
        target = build_target(graph, x, split, first.name + "_split")
        if target is None:
            continue
        first.inputs[1] = target
        y.shape = split
        merged = len(xs) - 2
        for node in transposes:
            perm = list(node.attrs["perm"])
            node.attrs["perm"] = [a for p in perm for a in ((p, p + 1) if p == merged else (p + (p > merged),))]
            node.outputs[0].shape = [node.inputs[0].shape[p] for p in node.attrs["perm"]]
            merged = perm.index(merged)
        replace_uses(last.outputs[0], last.inputs[0])
        last.outputs.clear()


def _batch_head_chain(first: gs.Node, outputs: set[str]) -> "tuple[list[gs.Node], gs.Node, int] | None":
    """(transposes, last reshape, heads) when `first` starts a batch x heads merge, else None."""
    if first.op != "Reshape" or len(first.inputs) < 2 or not first.outputs:
        return None
    xs, ys = _dims(first.inputs[0]), _dims(first.outputs[0])
    if xs is None or ys is None or len(xs) != len(ys) or len(xs) < 2:
        return None
    m = len(xs) - 2
    batch, width, head_dim = xs[m], xs[-1], ys[-1]
    if not isinstance(batch, str) or not isinstance(width, int) or not isinstance(head_dim, int) \
            or width % head_dim or xs[:m] != ys[:m]:
        return None
    heads = width // head_dim
    if ys[m] != f"{heads}*{batch}" or heads < 2:
        return None
    transposes, tensor, merged = [], first.outputs[0], m
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Transpose" and tensor.name not in outputs:
        node = tensor.outputs[0]
        perm = list(node.attrs.get("perm", []))
        if sorted(perm) != list(range(len(xs))):
            return None
        transposes.append(node)
        merged, tensor = perm.index(merged), node.outputs[0]
    if len(tensor.outputs) != 1 or tensor.name in outputs or tensor.outputs[0].op != "Reshape" \
            or tensor.outputs[0].outputs[0].name in outputs:
        return None
    last = tensor.outputs[0]
    ts, rs = _dims(tensor), _dims(last.outputs[0])
    if ts is None or rs is None or rs != ts[:merged] + [batch, heads] + ts[merged + 1:]:
        return None
    return transposes, last, heads


def drop_identity_gathers(graph: gs.Graph) -> None:
    """The dynamo exporter's `as_strided` on a contiguous tensor with a dynamic batch: Reshape to
    1-D, then Gather by indices built at run time as Σ Range(dimₖ)·strideₖ on each axis k (the
    batch) plus constant ramps (the other axes). When those indices spell x's own row-major layout,
    the Gather returns x unchanged: its readers read x."""
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or not node.outputs \
                or node.outputs[0].name in outputs or isinstance(node.inputs[1], gs.Constant):
            continue
        flat = node.inputs[0]
        if len(flat.inputs) != 1 or flat.inputs[0].op != "Reshape" or flat.shape is None or len(flat.shape) != 1:
            continue
        x = flat.inputs[0].inputs[0]
        dims = _dims(x)
        if dims is None or dims != _dims(node.outputs[0]) or not all(isinstance(d, int) for d in dims[1:]):
            continue
        strides = [int(np.prod(dims[k + 1:], dtype=np.int64)) for k in range(len(dims))]
        wanted = {k: s for k, s in enumerate(strides) if dims[k] != 1}
        if _index_terms(node.inputs[1], len(dims)) == wanted:
            replace_uses(node.outputs[0], x)
            node.outputs.clear()


def _index_terms(t: gs.Tensor, rank: int, depth: int = 0) -> "dict[int, int] | None":
    """{axis: stride} when `t` = Σ over axes of (index along that axis) x stride, else None."""
    if depth > 16:
        return None
    if isinstance(t, gs.Constant):
        return _ramp(np.asarray(t.values), rank)
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op == "Add":
        parts = [_index_terms(i, rank, depth + 1) for i in node.inputs]
        if any(p is None for p in parts) or set(parts[0]) & set(parts[1]):
            return None
        return {**parts[0], **parts[1]}
    if node.op in ("Unsqueeze", "Reshape") and t.shape is not None and len(t.shape) == rank:
        wide = [k for k, d in enumerate(t.shape) if d != 1]
        stride = _range_stride(node.inputs[0], depth + 1)
        return {wide[0]: stride} if len(wide) == 1 and stride is not None else None
    return None


def _ramp(values: np.ndarray, rank: int) -> "dict[int, int] | None":
    """A constant index term: zeros ({}), or arange(n)·stride along one axis."""
    if values.ndim != rank or not np.issubdtype(values.dtype, np.integer):
        return None
    if not values.any():
        return {}
    wide = [k for k, d in enumerate(values.shape) if d != 1]
    flat = values.reshape(-1)
    if len(wide) != 1 or len(flat) < 2 or flat[0] != 0 or not np.array_equal(flat, np.arange(len(flat)) * flat[1]):
        return None
    return {wide[0]: int(flat[1])}


def _range_stride(t: gs.Tensor, depth: int) -> int | None:
    """s when `t` is Range(0, n, 1) times the constant s (s = 1 without the Mul)."""
    if len(t.inputs) != 1 or depth > 16:
        return None
    node = t.inputs[0]
    if node.op == "Mul":
        consts = [i for i in node.inputs if isinstance(i, gs.Constant) and np.asarray(i.values).size == 1]
        rest = [i for i in node.inputs if not (isinstance(i, gs.Constant) and np.asarray(i.values).size == 1)]
        inner = _range_stride(rest[0], depth + 1) if len(consts) == 1 and len(rest) == 1 else None
        return None if inner is None else inner * int(np.asarray(consts[0].values).reshape(-1)[0])
    if node.op != "Range" or not all(isinstance(node.inputs[i], gs.Constant) for i in (0, 2)):
        return None
    start, delta = (int(np.asarray(node.inputs[i].values).reshape(-1)[0]) for i in (0, 2))
    return 1 if (start, delta) == (0, 1) else None
