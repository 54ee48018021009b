"""Tiny real ONNX models for tests, built with onnx.helper (no mocks)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers; `model()` returns a checked ModelProto."""

    def __init__(self, seed: int = 0, opset: int = OPSET) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.opset = opset
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def input(self, shape, name: str = "x", dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype=TensorProto.FLOAT, shape=None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape, prefix: str = "w", scale: float = 0.5) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), prefix)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower() + "_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True, pad: int | None = None) -> str:
        w = self.weight([cout, cin // group, k, k])
        inputs = [x, w] + ([self.weight([cout], "b")] if bias else [])
        p = k // 2 if pad is None else pad
        return self.op("Conv", inputs, kernel_shape=[k, k], pads=[p] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        scale = self.const((self.rng.random(c) + 0.5).astype(np.float32), "gamma")
        bias = self.const(self.rng.standard_normal(c).astype(np.float32), "beta")
        mean = self.const(self.rng.standard_normal(c).astype(np.float32) * 0.1, "mean")
        var = self.const((self.rng.random(c) + 0.5).astype(np.float32), "var")
        return self.op("BatchNormalization", [x, scale, bias, mean, var])

    def gemm(self, x: str, k: int, n: int) -> str:
        return self.op("Gemm", [x, self.weight([n, k]), self.weight([n], "b")], transB=1)

    def model(self, check: bool = True, domains: dict[str, int] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            for out, inf in zip(model.graph.output, inferred.graph.output):
                out.CopyFrom(inf)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def small_cnn(seed: int = 0, residual: bool = True) -> onnx.ModelProto:
    """conv-bn-relu ×2 with a residual add, depthwise conv, concat, pool, flatten, gemm."""
    b = GraphBuilder(seed)
    x = b.input([1, 3, 8, 8])
    h = b.op("Relu", [b.bn(b.conv(x, 3, 8), 8)])
    r = b.op("Relu", [b.bn(b.conv(h, 8, 8), 8)])
    if residual:
        h = b.op("Add", [h, r])
    d = b.op("Relu", [b.conv(h, 8, 8, group=8)])
    cat = b.op("Concat", [h, d], axis=1)
    c2 = b.op("Relu", [b.conv(cat, 16, 12, k=1, pad=0)])
    p = b.op("MaxPool", [c2], kernel_shape=[2, 2], strides=[2, 2])
    f = b.op("Flatten", [p], axis=1)
    y = b.gemm(f, 12 * 16, 5)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 5])
    return b.model()


def zero_columns(model: onnx.ModelProto, names: "list[str]", cols) -> None:
    """Zero entries `cols` of the last axis of the named initializers, in place: plants dead output
    channels of a projection (its weight columns and its bias)."""
    inits = {t.name: t for t in model.graph.initializer}
    for name in names:
        value = numpy_helper.to_array(inits[name]).copy()
        value[..., cols] = 0
        inits[name].CopyFrom(numpy_helper.from_array(value, name))


def zero_kv_group(model: onnx.ModelProto, group: int, q_width: int, kv_width: int) -> None:
    """Plant one dead KV group of an attention block whose first three weight MatMuls are the Q, K
    and V projections, each followed by a bias Add: zero that group's `q_width` query columns and
    `kv_width` key and value columns, and their biases."""
    inits = {t.name for t in model.graph.initializer}
    projections = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits][:3]
    for width, node in zip((q_width, kv_width, kv_width), projections):
        add = next(n for n in model.graph.node if node.output[0] in n.input)
        zero_columns(model, [node.input[1], next(i for i in add.input if i in inits)],
                     np.arange(group * width, (group + 1) * width))


PAYLOADS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data")
"""The TensorProto fields that hold an initializer's values."""


def structure(model: onnx.ModelProto) -> bytes:
    """The serialized model with every initializer's values removed: what training must not change."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        for field in PAYLOADS:
            init.ClearField(field)
    return copy.SerializeToString()
