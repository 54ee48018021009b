"""The ORT shape probe of static_shapes: same shapes as a run of the full model, without its weights.

Dims that shape inference cannot follow (a Reshape target computed by Where) are read from a run in
ONNX Runtime. The probe model carries no large float payloads: those become graph inputs fed with
zeros (ORT would copy external initializers), while small or integer initializers (shape
constants) keep their values.
"""

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from onnxprune import ir, static_shapes


def _where_reshape_model() -> onnx.ModelProto:
    """x[B, S, 64] @ W[64, 48] -> Reshape to Where(Shape == Shape, [0, -1, 4], Shape): the target is
    opaque to data propagation, so the output dims need the executed probe."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, -1, 4], dtype=np.int64), "target"),
             numpy_helper.from_array(np.ones(48, dtype=np.float32), "bias"),  # small float: inline
             numpy_helper.from_array(np.zeros(300, dtype=np.int64), "unused_ints")]  # > 1 KiB, int
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y"]),
             helper.make_node("Shape", ["y"], ["shape"]),
             helper.make_node("Equal", ["shape", "shape"], ["same"]),
             helper.make_node("Where", ["same", "target", "shape"], ["new_shape"]),
             helper.make_node("Reshape", ["y", "new_shape"], ["reshaped"]),
             helper.make_node("Relu", ["reshaped"], ["out"])]
    graph = helper.make_graph(nodes, "where_reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _full_run_shapes(model: onnx.ModelProto, sizes: tuple[int, ...]) -> dict[str, tuple]:
    """Every node output's shape from a plain ORT run of the whole model, real weights included."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    static_shapes._pin_inputs(full, sizes)
    known = {o.name for o in full.graph.output}
    full.graph.output.extend(onnx.ValueInfoProto(name=o) for n in full.graph.node for o in n.output
                             if o not in known)
    runner = onnxruntime.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    x = full.graph.input[0].type.tensor_type.shape.dim
    outputs = runner.run(None, {"x": np.zeros([d.dim_value for d in x], np.float32)})
    return {o.name: tuple(v.shape) for o, v in zip(runner.get_outputs(), outputs)}


def test_probe_resolves_dims_that_inference_leaves_unknown():
    model = _where_reshape_model()
    plain = ir.infer_shapes(model)
    assert not all(isinstance(d, int) for d in plain["reshaped"][1][2:])  # inference alone: unknown
    shapes = ir.infer_shapes(model, resolve=True)
    assert shapes["reshaped"] == (TensorProto.FLOAT, ("B", "12*S", 4))
    assert shapes["out"] == (TensorProto.FLOAT, ("B", "12*S", 4))


def test_probe_sees_the_same_shapes_as_a_run_with_the_real_weights():
    model = _where_reshape_model()
    skeleton = onnx.ModelProto()
    for sizes in static_shapes._PROBES:
        assert static_shapes._executed_shapes(model, skeleton, sizes) == _full_run_shapes(model, sizes)


def test_probe_model_carries_no_large_payloads_and_gets_weights_as_zero_feeds(monkeypatch):
    model = _where_reshape_model()
    probe, stubs = static_shapes._probe_model(model)
    assert [t.name for t in stubs] == ["W"] and not stubs[0].raw_data and list(stubs[0].dims) == [64, 48]
    by_name = {t.name: t for t in probe.graph.initializer}
    assert "W" not in by_name and "W" in {vi.name for vi in probe.graph.input}
    for name in ("target", "bias", "unused_ints"):  # shape constants and small tensors keep values
        assert by_name[name] == next(t for t in model.graph.initializer if t.name == name)
    assert probe.ByteSize() < 64 * 48 * 4

    loaded, fed = [], {}
    real_session = onnxruntime.InferenceSession

    class SpySession(real_session):
        def __init__(self, data, *args, **kwargs):
            loaded.append(data)
            super().__init__(data, *args, **kwargs)

        def run(self, names, feeds, *args, **kwargs):
            fed.update(feeds)
            return super().run(names, feeds, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", SpySession)
    assert static_shapes._executed_shapes(model, onnx.ModelProto(), static_shapes._PROBES[0]) is not None
    assert len(loaded) == 1 and len(loaded[0]) < 64 * 48 * 4
    assert fed["W"].shape == (64, 48) and fed["W"].dtype == np.float32 and not fed["W"].any()
    assert model.graph.initializer[0].raw_data  # the caller's model is untouched
