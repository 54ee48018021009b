"""Pass-speed shortcuts in reading, checking and import give what the paths they replace gave.

- payload sizes read from field headers by the file reader = len(raw_data) of the parsed tensor,
  and a short payload is still refused when the reader's sizes are used;
- `set_input` (identity removal) = graphsurgeon's `node.inputs[i] = t` (equality removal);
- a static model's first inference reused as its concrete run = inferring it again;
- `NodeView.shape`'s fast path = the general rule for every kind of dim.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import ir, static_shapes
from onnxprune.api import prune
from onnxprune.errors import InputError
from onnxprune.ops.base import NodeView
from onnxprune.passes.canonical import set_input, split_shared_constants
from onnxprune.streaming import raw_data_length, read_model_file


def _mlp(hidden: int = 160, seed: int = 0) -> onnx.ModelProto:
    """x[2, 128] -> MatMul(W1 [128, hidden], 80 KiB: merged alone by the reader) -> Add -> Relu
    -> MatMul(W2) -> y[2, 8]; the small bias is merged in a run with the graph's other fields."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((128, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((hidden, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_raw_data_length_matches_the_parsed_tensor():
    tensor = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "t")
    tensor.doc_string = "a tensor"
    data = tensor.SerializeToString()
    assert raw_data_length(data) == len(tensor.raw_data) == 48
    # protobuf merges a repeated scalar field by keeping the last one: so must the header scan
    later = onnx.TensorProto(raw_data=b"\0" * 8)
    merged = onnx.TensorProto()
    merged.ParseFromString(data + later.SerializeToString())
    assert raw_data_length(data + later.SerializeToString()) == len(merged.raw_data) == 8
    assert raw_data_length(numpy_helper.from_array(np.array([1, 2], np.int64), "i").SerializeToString()) == 16
    assert raw_data_length(helper.make_tensor("f", TensorProto.FLOAT, [2], [1.0, 2.0]).SerializeToString()) is None
    assert raw_data_length(data[:-5]) is None  # a payload running past the end is not trusted


def test_reader_sizes_line_up_with_the_initializers(tmp_path):
    model = _mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sizes: list[int | None] = []
    loaded = ir.load_model(path, sizes)
    assert len(sizes) == len(loaded.graph.initializer) == 3
    big = {t.name: s for t, s in zip(loaded.graph.initializer, sizes) if s is not None}
    assert big == {"w1": 128 * 160 * 4}  # b1 and w2 are small: merged in runs, measured by the check
    assert read_model_file(path).SerializeToString() == loaded.SerializeToString()
    ir.check_model(loaded, full_check=True, raw_sizes=sizes)
    result = prune(str(path), ratio=0.5)
    x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
    assert _run(result.model, x).shape == (2, 8)
    assert len(result.model.graph.initializer[0].dims) == 2


def test_a_short_payload_is_refused_with_the_reader_sizes(tmp_path):
    model = _mlp()
    w1 = model.graph.initializer[0]
    w1.raw_data = w1.raw_data[:-4]
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    sizes: list[int | None] = []
    loaded = ir.load_model(path, sizes)
    assert sizes[0] == 128 * 160 * 4 - 4
    with pytest.raises(onnx.checker.ValidationError, match="raw_data size"):
        ir.check_model(loaded, raw_sizes=sizes)
    with pytest.raises(InputError, match="raw_data size"):
        prune(str(path), ratio=0.5)


def test_sizes_that_do_not_line_up_are_not_used():
    model = _mlp()
    w1 = model.graph.initializer[0]
    w1.raw_data = w1.raw_data[:-4]
    with pytest.raises(onnx.checker.ValidationError, match="raw_data size"):
        ir.check_model(model, raw_sizes=[128 * 160 * 4])  # one entry for three initializers


def _shared_bias_graph() -> gs.Graph:
    """Three Add nodes reading one bias constant, ahead of them a fourth reader that is equal
    to none of them."""
    x = gs.Variable("x", dtype=np.float32, shape=[2, 4])
    bias = gs.Constant("bias", np.arange(4, dtype=np.float32))
    outs = [gs.Variable(f"y{i}", dtype=np.float32, shape=[2, 4]) for i in range(4)]
    nodes = [gs.Node("Sub", "first", inputs=[x, bias], outputs=[outs[0]])]
    nodes += [gs.Node("Add", f"add{i}", inputs=[x, bias], outputs=[outs[i]]) for i in range(1, 4)]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outs, opset=17)


def test_set_input_matches_graphsurgeon_assignment():
    ours, theirs = _shared_bias_graph(), _shared_bias_graph()
    for graph, assign in ((ours, set_input), (theirs, None)):
        node = graph.nodes[2]
        new = gs.Constant("bias_copy", np.arange(4, dtype=np.float32))
        if assign is None:
            node.inputs[1] = new
        else:
            assign(node, 1, new)
    for a, b in zip(ours.nodes, theirs.nodes):
        assert [t.name for t in a.inputs] == [t.name for t in b.inputs]
    for graph in (ours, theirs):
        readers = {name: [n.name for n in t.outputs] for name, t in graph.tensors().items()}
        assert readers["bias"] == ["first", "add1", "add3"]
        assert readers["bias_copy"] == ["add2"]


def test_split_shared_constants_keeps_the_values():
    graph = _shared_bias_graph()
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    before = ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = before.run(None, {"x": x})
    split_shared_constants(graph)
    assert [n.inputs[1].name for n in graph.nodes] == ["bias", "bias__shared1", "bias__shared2", "bias__shared3"]
    assert all(len(n.inputs[1].outputs) == 1 and n.inputs[1].outputs[0] is n for n in graph.nodes)
    after = ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(after.run(None, {"x": x}), expected):
        np.testing.assert_array_equal(got, want)


def _static_reshape_model() -> onnx.ModelProto:
    """Static input; the Reshape target is computed from Shape at run time (the BERT pattern)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "zero"], ["b1"]),
             helper.make_node("Concat", ["b1", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "tail")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_static_concrete_run_reuses_the_first_inference():
    model = _static_reshape_model()
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    probe = static_shapes._PROBES[0]
    reused = static_shapes._concrete_shapes(model, probe, inferred)
    assert reused == static_shapes._concrete_shapes(model, probe)
    assert reused["r"] == (3, 2, 4)
    # a skeleton with value_info is inferred afresh: the given inference is not used
    with_info = onnx.ModelProto()
    with_info.CopyFrom(model)
    with_info.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [3, None, 4]))
    assert static_shapes._concrete_shapes(with_info, probe, onnx.ModelProto()) == reused
    shapes = ir.infer_shapes(model, resolve=True)
    assert shapes["r"][1] == (3, 2, 4)
    x = np.ones((3, 8), np.float32)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out[0].shape == shapes["y"][1]


@pytest.mark.parametrize("dims, expected", [
    ([2, 0, 5], (2, 0, 5)),
    ([-1, 3], (None, 3)),
    ([np.int64(4), np.int64(-2)], (np.int64(4), None)),  # kept as numpy ints, as before
    (["batch", None, 7], ("batch", None, 7)),
    ([True], (True,)),
])
def test_node_view_shape_fast_path_keeps_the_rule(dims, expected):
    x = gs.Variable("x", dtype=np.float32, shape=dims)
    y = gs.Variable("y", dtype=np.float32)
    node = gs.Node("Relu", "relu", inputs=[x], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y])
    view = NodeView(node, graph.tensors(), 17)
    got = view.shape("x")
    assert got == expected
    assert [type(d) for d in got] == [type(d) if d is not None else type(None) for d in expected]
    assert view.shape("y") is None and view.shape("missing") is None
