"""Param counts that compare like with like: a pruned model must not look bigger than it is.

Both cases came from comparing onnxprune with Torch-Pruning in one accounting (the pruned torch
model re-exported and counted by `onnxprune.metrics.count`): exporters share equal initializers and
write small values as `Constant` nodes, and onnxprune's output must be counted on the same footing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxprune
from builders import GraphBuilder
from onnxprune.metrics import count
from reference import assert_matches_masked


def three_convs_sharing_a_zero_bias() -> onnx.ModelProto:
    """Three Conv(3→8) read one zero bias, as an exporter deduplicates them. The first feeds a graph
    output (its 8 channels stay); the other two each feed a Conv(8→4) and lose channels."""
    b = GraphBuilder(seed=4)
    x = b.input([1, 3, 6, 6])
    bias = b.const(np.zeros(8, np.float32), "zero_bias")
    outs = []
    for k in range(3):
        h = b.op("Conv", [x, b.weight([8, 3, 3, 3]), bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        outs.append(h if k == 0 else b.conv(b.op("Relu", [h]), 8, 4, k=1, pad=0))
    for k, name in enumerate(outs):
        b.nodes[[n.output[0] for n in b.nodes].index(name)].output[0] = f"y{k}"
        b.output(f"y{k}")
    return b.model()


def test_copies_of_a_shared_constant_sliced_alike_are_shared_again():
    model = three_convs_sharing_a_zero_bias()
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 8
    assert_matches_masked(model, result)
    zero_biases = [t for t in result.model.graph.initializer
                   if t.name.startswith("zero_bias") and not numpy_helper.to_array(t).any()]
    assert sorted(tuple(t.dims) for t in zero_biases) == [(4,), (8,)]
    readers = [n for n in result.model.graph.node for i in n.input if i == zero_biases[0].name
               or i == zero_biases[1].name]
    assert len(readers) == 3
    # Counted once each, as the exporter of an equally pruned torch model would write them.
    assert result.report.after.params == sum(int(np.prod(t.dims)) for t in result.model.graph.initializer)


def clip_with_constant_nodes() -> onnx.ModelProto:
    """Conv → Clip(min, max given by Constant nodes, as the TorchScript exporter writes ReLU6) → Conv."""
    b = GraphBuilder(seed=6)
    x = b.input([1, 3, 6, 6])
    h = b.conv(x, 3, 8)
    lo, hi = b.name("lo"), b.name("hi")
    b.nodes += [helper.make_node("Constant", [], [lo], value=numpy_helper.from_array(np.array(0.0, np.float32))),
                helper.make_node("Constant", [], [hi], value=numpy_helper.from_array(np.array(6.0, np.float32)))]
    b.conv(b.op("Clip", [h, lo, hi]), 8, 4, k=1, pad=0)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_constant_nodes_count_like_initializers():
    model = clip_with_constant_nodes()
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert count(model).params == weights + 2
    # onnxprune stores the two values as initializers: an unpruned model keeps its count.
    unchanged = onnxprune.prune(model, lossless=True)
    assert unchanged.report.channels_removed == 0
    assert unchanged.report.after.params == unchanged.report.before.params
    pruned = onnxprune.prune(model, ratio=0.5)
    assert_matches_masked(model, pruned)
    assert pruned.report.after.params == count(pruned.model).params < count(model).params


def test_constant_attribute_forms_are_counted():
    nodes = [helper.make_node("Constant", [], ["a"], value_floats=[1.0, 2.0, 3.0]),
             helper.make_node("Constant", [], ["b"], value_int=4),
             helper.make_node("Add", ["a", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])])
    assert count(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).params == 4
