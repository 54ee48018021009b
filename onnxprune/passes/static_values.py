"""Integer values computed at run time from static dims, pinned to constants at import.

The TorchScript exporter computes some values from `Shape` even when every dim they read is
static: Swin's window padding `(ws - W % ws) % ws` (a Pad's amounts) and its attention scale
`(C // heads) ** -0.5` (an integer cast to float). Such a value is the same for every input, so a
constant computes the same thing; as a constant it no longer reads a channel count at run time,
and the Pad rule can see that the channel axis is not padded. A scale pinned this way keeps the
value the original model used, which is what a pruned model must compute for its kept channels.

Three kinds of reader are pinned: a Pad's amounts, a Slice's bounds (rewritten by the Slice rule
when channels go, as in a static export) and a Cast to a float type. Values that give
shapes (Reshape and Expand targets, ConstantOfShape sizes) must follow the pruned channel counts
instead and are left alone (see `batch_shapes.py` and `ops/shape_values.py`). A value is static
when evaluating it twice, with every symbolic dim set to different sizes, gives the same result.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

ARITHMETIC = {"Gather", "Slice", "Concat", "Cast", "Squeeze", "Unsqueeze", "Mul", "Div", "Add", "Sub", "Mod",
              "Reshape", "Transpose", "Identity", "Neg", "Abs", "Min", "Max", "Floor", "Ceil", "Equal", "Where",
              "ConstantOfShape", "Expand", "Range"}
MAX_NODES = 64
_PROBES = ((7, 11, 13, 17, 19, 23), (29, 31, 37, 41, 43, 47))
"""Sizes given to distinct symbolic dims in the two evaluations."""
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def pin_static_values(graph: gs.Graph, opset: int) -> None:
    """Replace the static run-time inputs of Pads, Slices and float Casts by constants."""
    for node in list(graph.nodes):
        for index in _pinnable(node):
            if index < len(node.inputs) and node.inputs[index].name and not isinstance(node.inputs[index], gs.Constant):
                value = static_value(node.inputs[index], opset)
                if value is not None:
                    node.inputs[index] = gs.Constant(f"{node.name}_pinned_{index}", value)


def _pinnable(node: gs.Node) -> tuple[int, ...]:
    """Inputs whose static value may be written as a constant: a Pad's amounts, a Slice's bounds
    (torch's `chunk` with a dynamic batch computes them from the channel count; constant bounds are
    rewritten by the Slice rule), the integer input of a float Cast."""
    if node.op == "Pad":
        return (1,)
    if node.op == "Slice":
        return (1, 2, 3, 4)
    if node.op == "Cast" and node.attrs.get("to") in FLOATS:
        return (0,)
    return ()


def static_value(tensor: gs.Tensor, opset: int) -> np.ndarray | None:
    """The value of an integer tensor computed from `Shape` by plain arithmetic, when it does not
    depend on the symbolic dims it reads; None otherwise."""
    nodes, shapes = _subgraph(tensor)
    if nodes is None or not shapes:
        return None
    results = [_evaluate(nodes, shapes, tensor, sizes, opset) for sizes in _PROBES]
    first, second = results
    if first is None or second is None or first.shape != second.shape or not np.array_equal(first, second):
        return None
    return first if np.issubdtype(first.dtype, np.integer) else None


def _subgraph(tensor: gs.Tensor) -> "tuple[list[gs.Node] | None, list[gs.Node]]":
    """The arithmetic nodes computing `tensor` (topological order) and the Shape nodes it reads."""
    order: list[gs.Node] = []
    shapes: list[gs.Node] = []
    seen: set[str] = set()

    def visit(t: gs.Tensor) -> bool:
        if isinstance(t, gs.Constant) or not t.name or t.name in seen:
            return True
        seen.add(t.name)
        if len(t.inputs) != 1:
            return False
        node = t.inputs[0]
        if node.op == "Shape":
            shape = node.inputs[0].shape
            if shape is None or any(not isinstance(d, (str, int, np.integer)) for d in shape):
                return False
            shapes.append(node)
            return True
        if node.op not in ARITHMETIC or len(order) > MAX_NODES:
            return False
        if not all(visit(i) for i in node.inputs):
            return False
        order.append(node)
        return True

    return (order if visit(tensor) else None), shapes


def _evaluate(nodes: list[gs.Node], shapes: list[gs.Node], tensor: gs.Tensor, sizes: tuple[int, ...],
              opset: int) -> np.ndarray | None:
    """Run the arithmetic with each Shape replaced by its value at the given symbolic sizes."""
    symbols: dict[str, int] = {}
    feeds = {}
    for node in shapes:
        dims = [int(d) if not isinstance(d, str) else symbols.setdefault(d, sizes[len(symbols) % len(sizes)])
                for d in node.inputs[0].shape]
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        feeds[node.outputs[0].name] = np.array(dims[slice(start, end)], dtype=np.int64)
    inputs = [gs.Variable(name, dtype=np.int64, shape=list(v.shape)) for name, v in feeds.items()]
    known: dict[str, gs.Tensor] = {i.name: i for i in inputs}
    copies = []
    for node in nodes:  # copies joined by fresh variables: the model's own graph stays untouched
        outs = [gs.Variable(o.name) for o in node.outputs]
        copies.append(gs.Node(node.op, node.name, attrs=dict(node.attrs), outputs=outs,
                              inputs=[i if isinstance(i, gs.Constant) or not i.name else known[i.name]
                                      for i in node.inputs]))
        known.update((o.name, o) for o in outs)
    if tensor.name not in known:
        return None
    try:
        model = gs.export_onnx(gs.Graph(nodes=copies, inputs=inputs, outputs=[known[tensor.name]], opset=opset),
                               do_type_check=False)
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:  # noqa: BLE001 - an op variant the evaluator rejects: the value stays run-time
        return None

