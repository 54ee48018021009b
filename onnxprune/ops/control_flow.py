"""Loop and Scan: channels flow through the body graph by the same per-op rules.

A body is analysed in one walk with the outer graph: its tensors join the walk's tensor map (names
are made unique across scopes on import), its nodes are asked like any other, and this rule ties
each body input and output to the outer tensor it is bound to:

- loop-carried state: Loop input 2+k ↔ body input 2+k ↔ body output 1+k ↔ Loop output k (Scan:
  input k ↔ body input k ↔ body output k ↔ output k), axis for axis;
- scan outputs: body output axis a ↔ outer axis a+1 (Loop concatenates along a new axis 0; Scan
  inserts the iteration axis at `scan_output_axes`);
- Scan inputs: outer axis a ↔ body axis a (or a-1 past `scan_input_axes`, which the body does not see);
- tensors the body reads from the outer scope (initializers, activations) are shared objects, so
  the walk reaches the body's readers from them without a tie.

On import (`passes/canonical.py`), a loop-carried value that the body passes through unchanged and
that starts as a constant (how tf2onnx and Keras hand a recurrent cell its weights) becomes a
read of that constant from the outer scope, and the body's Constant nodes become initializers, so
the weight rules see weights. The trip count, the condition and the iteration number carry no
channels: a channel reaching them freezes with the reason.

Lossless removal follows the carried state to a fixed point (`propagate_loop`): a carried element
that starts constant and that one pass through the body maps to the same constant stays so at
every iteration (a dead GRU unit: zero state, zero gate columns, h' = z·h + (1-z)·tanh(0) = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.ir import nested_graphs
from onnxprune.ops.base import Freeze, NodeView, OpRule, Slot, Tie, ValueTable, identity, per_element, register

BODY_OPS = ("Loop", "Scan")
"""Ops whose body the analysis walks (an `If` still freezes what its branches read)."""


def bodies(graph: gs.Graph) -> Iterator[tuple[gs.Node, gs.Graph]]:
    """(owner node, body) of every Loop/Scan, nested ones included, outermost first."""
    for node in graph.nodes:
        if node.op in BODY_OPS and isinstance(node.attrs.get("body"), gs.Graph):
            body = node.attrs["body"]
            yield node, body
            yield from bodies(body)


def all_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes followed by the nodes of every analysed body."""
    nodes = list(graph.nodes)
    for _, body in bodies(graph):
        nodes.extend(body.nodes)
    return nodes


def all_tensors(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """`graph.tensors()` with the tensors of every analysed body (names are unique across scopes)."""
    tensors = graph.tensors()
    for _, body in bodies(graph):
        for name, tensor in body.tensors().items():
            tensors.setdefault(name, tensor)
    return tensors


def scope_of(graph: gs.Graph, node: gs.Node) -> gs.Graph:
    """The graph (outer, or an analysed body) whose node list holds `node`; new nodes that must
    run next to it go there."""
    for _, body in bodies(graph):
        if any(n is node for n in body.nodes):
            return body
    return graph


def body_owners(graph: gs.Graph) -> dict[str, gs.Node]:
    """Body input and output names mapped to the Loop/Scan that binds them."""
    owners: dict[str, gs.Node] = {}
    for node, body in bodies(graph):
        for tensor in (*body.inputs, *body.outputs):
            owners.setdefault(tensor.name, node)
    return owners


# --- protos (shape inference, export) --------------------------------------------------------------

def loop_output_infos(graph: onnx.GraphProto, known: set[str]) -> list[onnx.ValueInfoProto]:
    """Types for Loop outputs symbolic inference leaves shapeless (a carried value whose initial
    shape differs from the body's declared one), from the body's declared outputs: a final carried
    value has its body output's shape, a scan output gains a leading iteration axis. Given back to
    inference as value_info, they let it reach the layers after the loop."""
    infos = []
    for node in graph.node:
        if node.op_type != "Loop":
            continue
        body = next(a.g for a in node.attribute if a.name == "body")
        carried = len(node.input) - 2
        for k, name in enumerate(node.output):
            inner = body.output[1 + k] if 1 + k < len(body.output) else None
            if not name or name in known or inner is None or not inner.type.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inner.type.tensor_type.shape.dim]
            infos.append(onnx.helper.make_tensor_value_info(
                name, inner.type.tensor_type.elem_type, dims if k < carried else [None, *dims]))
    return infos


def hoist_shared_initializers(graph: onnx.GraphProto) -> None:
    """Move initializers that several subgraphs hold under one name (an outer constant that only
    bodies read: graphsurgeon exports it into each) to the outer graph, once; drop body copies of
    an outer initializer."""
    held: dict[str, list[tuple[onnx.GraphProto, int]]] = {}
    for inner in nested_graphs(graph):
        for k, init in enumerate(inner.initializer):
            held.setdefault(init.name, []).append((inner, k))
    outer = {t.name for t in graph.initializer}
    shared = {name: places for name, places in held.items() if len(places) > 1 or name in outer}
    for name, places in shared.items():
        if name not in outer:  # already there when an outer node reads it too
            first, k = places[0]
            graph.initializer.append(first.initializer[k])
    for sub in {id(g): g for places in shared.values() for g, _ in places}.values():
        keep = [t for t in sub.initializer if t.name not in shared]
        del sub.initializer[:]
        sub.initializer.extend(keep)


# --- analysis --------------------------------------------------------------------------------------

class _Binding:
    """Which outer and body tensors a Loop/Scan binds together, position by position."""

    def __init__(self, v: NodeView) -> None:
        self.body: gs.Graph = v.attr("body")
        node = v.node
        ins = [t.name for t in node.inputs]
        outs = [t.name for t in node.outputs]
        bin_ = [t.name for t in self.body.inputs]
        bout = [t.name for t in self.body.outputs]
        # chains of carried state, and (body output, outer output, outer axis of the iteration)
        self.chains: list[list[str]] = []
        self.scan_out: list[tuple[str, str, int]] = []
        self.scan_in: list[tuple[str, str, int]] = []
        self.control: dict[str, str] = {}
        if v.op == "Loop":
            carried = len(ins) - 2
            self.control = {n: what for n, what in ((ins[0], "trip count"), (ins[1] if len(ins) > 1 else "", "condition"),
                                                    (bin_[0], "iteration number"), (bin_[1], "condition"),
                                                    (bout[0], "condition")) if n}
            for k in range(carried):
                self.chains.append([ins[2 + k], bin_[2 + k], bout[1 + k], outs[k] if k < len(outs) else ""])
            for j, name in enumerate(bout[1 + carried:]):
                if carried + j < len(outs):
                    self.scan_out.append((name, outs[carried + j], 0))
        else:
            m = int(v.attr("num_scan_inputs"))
            carried = len(ins) - m
            in_axes = list(v.attr("scan_input_axes", [0] * m))
            k_out = len(bout) - carried
            out_axes = list(v.attr("scan_output_axes", [0] * k_out))
            for k in range(carried):
                self.chains.append([ins[k], bin_[k], bout[k], outs[k] if k < len(outs) else ""])
            for j in range(m):
                axis = _non_negative(in_axes[j], v.rank(ins[carried + j]))
                self.scan_in.append((ins[carried + j], bin_[carried + j], axis))
            for j in range(k_out):
                if carried + j < len(outs):
                    axis = _non_negative(out_axes[j], v.rank(outs[carried + j]))
                    self.scan_out.append((bout[carried + j], outs[carried + j], axis))


def _non_negative(axis: int, rank: int | None) -> int:
    """A Scan axis attribute counted from the front (as given when the rank is unknown)."""
    return axis + rank if axis < 0 and rank is not None else axis


@register("Loop", "Scan")
class BodyOp(OpRule):
    """Loop and Scan: ties across the scope boundary, body I/O shapes on rewrite."""

    def ties(self, v: NodeView, slot: Slot) -> "list[Tie] | Freeze":
        if not isinstance(v.attr("body"), gs.Graph):
            return Freeze(f"{v.op} has no body graph")
        if v.op == "Scan" and v.opset < 9:
            return Freeze("Scan before opset 9 (batch axis, sequence_lens) is not analysed")
        bind = _Binding(v)
        name, axis = slot
        if name in bind.control:
            return Freeze(f"channels reach the {bind.control[name]} of the {v.op}")
        for chain in bind.chains:
            if name in chain:
                return self._tie_all(v, [(n, axis) for n in chain if n and n != name], slot)
        for inner, outer, it in bind.scan_out:
            if name == inner:
                return self._tie_all(v, [(outer, axis + (axis >= it))], slot)
            if name == outer:
                if axis == it:
                    return Freeze(f"the iteration axis of {v.op} output {outer} is not a channel axis")
                return self._tie_all(v, [(inner, axis - (axis > it))], slot)
        for outer, inner, it in bind.scan_in:
            if name == outer:
                if axis == it:
                    return Freeze(f"channels lie along the scanned axis of {v.op} input {outer}")
                return self._tie_all(v, [(inner, axis - (axis > it))], slot)
            if name == inner:
                return self._tie_all(v, [(outer, axis + (axis >= it))], slot)
        return Freeze(f"{name} is not bound by the {v.op}")

    def _tie_all(self, v: NodeView, others: list[Slot], slot: Slot) -> "list[Tie] | Freeze":
        sizes = [d for d in (v.dim(s) for s in (slot, *others)) if d is not None]  # the walk's map holds body I/O
        if not sizes:
            return Freeze(f"size of the channel axis through {v.op} '{v.name}' is unknown")
        if len(set(sizes)) > 1:
            return Freeze(f"{v.op} binds tensors of different sizes along the channel axis ({sorted(set(sizes))})")
        return [identity(slot, other, sizes[0]) for other in others]

    def update(self, v: NodeView, edit) -> None:
        """Shrink the declared shapes of the body's inputs and outputs (the checker compares them)."""
        body = v.attr("body")
        for tensor in (*body.inputs, *body.outputs):
            if tensor.shape is None:
                continue
            shape = list(tensor.shape)
            for axis in range(len(shape)):
                size = edit.new_dim((tensor.name, axis))
                if size is not None:
                    shape[axis] = size
            tensor.shape = shape


# --- lossless ---------------------------------------------------------------------------------------

def propagate_loop(owner: gs.Node, table: ValueTable, run_body: Callable[[list[gs.Node]], None],
                   view: NodeView) -> None:
    """Constant values through a Loop/Scan: carried state to a fixed point, then the outputs.

    A carried element keeps a constant only if one pass through the body returns that same
    constant from it (by induction, every iteration does); scan outputs take the values the body
    computes at that fixed point. Scan inputs are per-step slices of their outer tensor.
    """
    bind = _Binding(view)
    body = bind.body
    for outer, inner, it in bind.scan_in:  # the scanned axis itself is not in the body
        _copy(table, outer, inner, lambda a: None if a == it else a - (a > it), view)
    state = {chain[1]: _values_of(table, chain[0], view) for chain in bind.chains}
    for _ in range(1 + sum(len(s) for s in state.values() if s is not None)):
        for inner, vals in state.items():
            if vals is not None:
                for axis, arr in vals.items():
                    table.set((inner, axis), arr.copy())
        _forget(table, body)
        run_body(list(body.nodes))
        changed = False
        for chain in bind.chains:
            vals = state.get(chain[1])
            if vals is None:
                continue
            for axis, arr in vals.items():
                after = table.get((chain[2], axis))
                same = after is not None and len(after) == len(arr)
                new = np.where(same & (after == arr), arr, np.nan) if same else np.full(len(arr), np.nan)
                if not np.array_equal(new, arr, equal_nan=True):
                    vals[axis], changed = new, True
        if not changed:
            break
    for chain in bind.chains:
        vals = state.get(chain[1])
        if vals and chain[3]:
            for axis, arr in vals.items():
                table.set((chain[3], axis), arr)
    for inner, outer, it in bind.scan_out:
        _copy(table, inner, outer, lambda a: a + (a >= it), view)


def _values_of(table: ValueTable, name: str, view: NodeView) -> dict[int, np.ndarray] | None:
    """Known values per channel axis of an outer tensor (from the table, a constant's slices, or
    the one value a fill such as `Expand(0, shape)` broadcasts)."""
    found = {}
    fill = fill_value(view.tensors.get(name))
    for (tensor, axis) in list(table.sizes):
        if tensor == name:
            vals = table.get((tensor, axis))
            const = view.const(name)
            if const is not None and np.all(np.isnan(vals)):
                vals = _const_slices(const, axis)
            elif fill is not None:
                vals = np.where(np.isnan(vals), fill, vals)
            found[axis] = np.array(vals, dtype=np.float64)
    return found or None


FILL_OPS = ("Expand", "Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Slice")
"""Ops that spread, select or relabel elements of their first input without changing them."""


def fill_value(tensor: gs.Tensor | None) -> float | None:
    """The single value every element of `tensor` holds, when it is a constant spread by FILL_OPS
    or a ConstantOfShape; None otherwise."""
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            return float(np.asarray(value.values).reshape(-1)[0]) if value is not None else 0.0
        if node.op not in FILL_OPS or not node.inputs:
            return None
        tensor = node.inputs[0]
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values, dtype=np.float64).reshape(-1)
        if values.size and np.all(values == values[0]):
            return float(values[0])
    return None


def _const_slices(array: np.ndarray, axis: int) -> np.ndarray:
    moved = per_element(np.asarray(array, dtype=np.float64), axis)
    same = np.all(moved == moved[:, :1], axis=1) if moved.shape[1] else np.zeros(len(moved), bool)
    return np.where(same, moved[:, 0] if moved.shape[1] else np.nan, np.nan)


def _copy(table: ValueTable, src: str, dst: str, axis_map: Callable[[int], "int | None"], view: NodeView) -> None:
    vals = _values_of(table, src, view) or {}
    for axis, arr in vals.items():
        target = axis_map(axis)
        if target is not None:
            table.set((dst, int(target)), arr)


def _forget(table: ValueTable, body: gs.Graph) -> None:
    """Reset the values the previous pass computed inside the body and its nested bodies (not its
    inputs): a node that sets nothing this pass must not keep a value from a less constrained one."""
    inputs = {t.name for t in body.inputs}
    produced = {t.name for n in all_nodes(body) for t in n.outputs} - inputs
    for slot in [s for s in table.values if s[0] in produced]:
        del table.values[slot]
