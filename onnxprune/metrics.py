"""Model size figures: parameters, multiply-accumulates (MACs), bytes and op counts.

MACs count the weight layers (Conv, ConvTranspose, Gemm, MatMul, recurrent ops) from inferred
shapes, with symbolic dims taken as 1 (one sample); element-wise work is not counted, as in the
usual profilers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.ir import infer_shapes, nested_graphs
from onnxprune.streaming import serialized_size


@dataclass
class ModelStats:
    params: int
    macs: int
    bytes: int
    ops: dict[str, int]

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "bytes": self.bytes, "ops": dict(self.ops)}


def _numel(dims) -> int:
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in dims], dtype=np.int64))


def _constant_node_elements(graph: onnx.GraphProto) -> int:
    """Elements held by top-level `Constant` nodes.

    They count like initializers: exporters write the same value either way, and onnxprune turns
    Constant nodes into initializers, so counting only one form would make a rewritten model look
    bigger than its source (and two exports of one architecture differ).
    """
    total = 0
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                total += _numel(attr.t.dims)
            elif attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
                total += len(attr.floats) + len(attr.ints)
            elif attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT):
                total += 1
    return total


def _subgraph_params(graph: onnx.GraphProto) -> int:
    """Elements of the initializers and Constant nodes inside subgraphs (a Loop body's weights)."""
    return sum(sum(_numel(t.dims) for t in sub.initializer) + _constant_node_elements(sub)
               for sub in nested_graphs(graph))


def count(model: onnx.ModelProto) -> ModelStats:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    params = sum(_numel(d) for d in inits.values()) + _constant_node_elements(model.graph) + _subgraph_params(model.graph)
    shapes = infer_shapes(model)
    shape = lambda name: inits.get(name) or (shapes.get(name, (0, None))[1])  # noqa: E731
    macs = sum(_node_macs(node, shape) for node in model.graph.node)
    # serialized_size, not ByteSize: upb computes ByteSize by serialising the whole model
    return ModelStats(params, macs, serialized_size(model), Counter(n.op_type for n in model.graph.node))


def _node_macs(node: onnx.NodeProto, shape) -> int:
    op = node.op_type
    try:
        if op in ("Conv", "ConvTranspose"):
            # Each output (Conv) or input (ConvTranspose) element meets one weight slice w[0].
            spread = shape(node.output[0]) if op == "Conv" else shape(node.input[0])
            return _numel(spread) * _numel(shape(node.input[1])[1:])
        if op in ("Gemm", "MatMul"):
            a, y = shape(node.input[0]), shape(node.output[0])
            trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            return _numel(y) * (k if isinstance(k, int) else 1)
        if op in ("LSTM", "GRU", "RNN"):
            w, r, x = shape(node.input[1]), shape(node.input[2]), shape(node.input[0])
            return _numel(x[:2]) * (_numel(w) + _numel(r))
    except (TypeError, IndexError, AttributeError):
        return 0
    return 0
