"""Constant folding of layout and shape subgraphs, before the dependency analysis.

Exporters compute some weights and shape constants at run time from initializers: the PyTorch
dynamo exporter reorders LSTM/GRU gate blocks with Slice/Concat on the weights, the legacy exporter
builds zero initial states and Reshape targets from Shape/Gather/Concat chains. Rules only read
constants, so such tensors would freeze the channels they touch. Folding them first makes them
initializers the rules can read and slice.

Only data-movement ops (and integer shape arithmetic) are folded, each evaluated node by node with
ONNX's reference evaluator at the model's opset, so the folded values are bit-exact. `Shape` is
never folded, even when static: a run-time Shape follows the pruned tensors by itself, a folded one
would bake the old channel count into a constant. Outputs that would grow beyond
`MAX_GROWN_ELEMENTS` (Expand, ConstantOfShape) are left to run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

from onnxprune.ir import export_structure, infer_shapes, opset_version, to_graph
from onnxprune.passes import batch_shapes
from onnxprune.passes.rewire import replace_uses
from onnxprune.static_shapes import ProbeRuns

LAYOUT_OPS = {"Gather", "Slice", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Identity",
              "Flatten", "Split"}
GROWING_OPS = {"Expand", "ConstantOfShape"}
INTEGER_OPS = {"Add", "Sub", "Mul", "Div", "Mod"}
MAX_GROWN_ELEMENTS = 1 << 20
MAX_SHARED_ELEMENTS = 1 << 16
"""A constant that stays in the model (another op reads it) is folded only up to this size, so no
large weight is stored twice."""


@dataclass
class FoldResult:
    graph: gs.Graph
    folded: int
    """Nodes replaced by constants."""


def fold_constants(graph: gs.Graph, opset: int) -> FoldResult:
    """Replace foldable nodes whose inputs are all constant by initializers (in place)."""
    folded = 0
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if node.domain not in ("", "ai.onnx", None) or any(t.name in outputs for t in node.outputs):
            continue
        values = _evaluate(node, opset)
        if values is None:
            continue
        for out, value in zip(list(node.outputs), values):
            replace_uses(out, gs.Constant(out.name, np.asarray(value)))
        node.outputs.clear()
        folded += 1
    if folded:
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    return FoldResult(graph, folded)


def _evaluate(node: gs.Node, opset: int) -> list[np.ndarray] | None:
    """The node's output values, or None when it is not foldable."""
    inputs = [t for t in node.inputs if t.name]
    if not inputs and node.op != "ConstantOfShape":
        return None
    if not all(isinstance(t, gs.Constant) for t in inputs):
        return None
    if any(_numel(t) > MAX_SHARED_ELEMENTS and _read_elsewhere(t) for t in inputs):
        return None  # folding would store a second copy of a large weight (tied embeddings)
    try:
        arrays = [np.asarray(t.values) for t in inputs]
    except ValueError:  # a damaged initializer: left for the checks that report it
        return None
    if node.op in INTEGER_OPS:
        if not all(np.issubdtype(a.dtype, np.integer) for a in arrays):
            return None
    elif node.op in GROWING_OPS:
        if _grown_size(node, arrays) > MAX_GROWN_ELEMENTS:
            return None
    elif node.op not in LAYOUT_OPS:
        return None
    return _run_single(node, opset)


def _read_elsewhere(const: gs.Constant) -> bool:
    """Whether a node that will not be folded also reads the constant (so it stays in the model).
    Gate blocks sliced out of one weight by several Slices fold; a weight also used by a MatMul
    does not."""
    return any(node.op not in LAYOUT_OPS | GROWING_OPS | INTEGER_OPS
               or not all(isinstance(t, gs.Constant) for t in node.inputs if t.name) for node in const.outputs)


def _numel(const: gs.Constant) -> int:
    return int(np.prod(const.shape, dtype=np.int64)) if const.shape is not None else 0


def _grown_size(node: gs.Node, arrays: list[np.ndarray]) -> int:
    """Element count of an Expand / ConstantOfShape output, computed before allocating it."""
    target = arrays[-1].reshape(-1) if node.op == "ConstantOfShape" else arrays[1].reshape(-1)
    if node.op == "Expand":
        try:
            target = np.broadcast_shapes(arrays[0].shape, tuple(int(d) for d in target))
        except ValueError:
            return MAX_GROWN_ELEMENTS + 1
    return int(np.prod(np.asarray(target, dtype=np.int64)))


def _run_single(node: gs.Node, opset: int) -> list[np.ndarray] | None:
    """Evaluate one node with ONNX's reference implementation at the graph's opset."""
    single = gs.Graph(nodes=[node], outputs=list(node.outputs), opset=opset)
    try:
        model = gs.export_onnx(single, do_type_check=False)
        values = ReferenceEvaluator(model).run(None, {})
    except Exception:  # an op variant the reference evaluator rejects stays unfolded
        return None
    return [np.asarray(v) for v in values]


def folded_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model in graphsurgeon with its constant layout/shape subgraphs folded: what the
    dependency analysis reads. The shape probe's executed runs are shared by both inferences."""
    probes = ProbeRuns()
    result = fold_constants(to_graph(model, probes), opset_version(model))
    if result.folded:
        _refresh_shapes(result.graph, model, probes)
        batch_shapes.rewrite(result.graph, opset_version(model))
    return result.graph


def _refresh_shapes(graph: gs.Graph, model: onnx.ModelProto, probes: ProbeRuns | None = None) -> None:
    """Infer shapes again where folding made them knowable (a Slice whose bounds were computed from
    `Shape`, as in torch's `chunk`): rules downstream need the static channel counts."""
    proto = export_structure(graph)  # shapes need no weights: do not copy them
    del proto.graph.value_info[:]
    proto.ir_version = model.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(model.opset_import)
    shapes = infer_shapes(proto, resolve=True, probes=probes)
    for name, tensor in graph.tensors().items():
        if not isinstance(tensor, gs.Variable) or name not in shapes or tensor in graph.inputs:
            continue
        dims = shapes[name][1]
        if tensor.shape is None or (len(tensor.shape) == len(dims) and any(
                not isinstance(d, (int, np.integer)) and isinstance(n, int) for d, n in zip(tensor.shape, dims))):
            tensor.shape = list(dims)
