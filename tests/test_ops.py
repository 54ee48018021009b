"""One tiny graph per op rule: conv → [op under test] → weight consumer.

Each model is pruned at ratio 0.5 and must (a) actually remove channels, (b) pass the full checker
and (c) equal the consumer-masked reference in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder
from reference import assert_matches_masked

C = 8


def sandwich(middle, *, spatial: int = 6, tail: str = "conv", opset: int = 17) -> onnx.ModelProto:
    """x[1,3,s,s] → Conv(3→C) → middle(b, h) → Conv(C'→4) or Flatten+Gemm → y."""
    b = GraphBuilder(seed=1, opset=opset)
    x = b.input([1, 3, spatial, spatial])
    h = b.conv(x, 3, C)
    h, width = middle(b, h)
    if tail == "conv":
        y = b.conv(h, width, 4, k=1, pad=0)
    else:
        y = b.gemm(b.op("Flatten", [h], axis=1), width, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def prune_and_check(model: onnx.ModelProto, **kw) -> onnxprune.PruneResult:
    result = onnxprune.prune(model, ratio=0.5, **kw)
    assert result.report.channels_removed > 0, onnxprune.analyze(model).summary()
    assert_matches_masked(model, result)
    return result


UNARY = ["Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Elu", "Selu", "Softplus", "Gelu", "Erf",
         "Abs", "Neg", "Softsign", "Mish", "Celu", "Identity", "Dropout"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    opset = {"Gelu": 20, "Mish": 18}.get(op, 17)
    prune_and_check(sandwich(lambda b, h: (b.op(op, [h]), C), opset=opset))


def test_leaky_relu_and_clip_and_cast():
    def middle(b, h):
        h = b.op("LeakyRelu", [h], alpha=0.1)
        h = b.op("Clip", [h, b.const(np.array(-1.0, np.float32)), b.const(np.array(2.0, np.float32))])
        h = b.op("Cast", [h], to=onnx.TensorProto.DOUBLE)
        return b.op("Cast", [h], to=onnx.TensorProto.FLOAT), C
    prune_and_check(sandwich(middle))


def test_prelu_with_per_channel_slope():
    slope = np.linspace(0.1, 0.8, C, dtype=np.float32).reshape(C, 1, 1)
    result = prune_and_check(sandwich(lambda b, h: (b.op("PRelu", [h, b.const(slope)]), C)))
    prelu = next(n for n in result.model.graph.node if n.op_type == "PRelu")
    init = {t.name: t for t in result.model.graph.initializer}
    assert list(init[prelu.input[1]].dims) == [C // 2, 1, 1]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
@pytest.mark.parametrize("const_shape", [(C, 1, 1), (1, C, 1, 1), (1,)])
def test_binary_with_constant(op, const_shape):
    value = (np.random.default_rng(0).random(const_shape) + 0.5).astype(np.float32)
    prune_and_check(sandwich(lambda b, h: (b.op(op, [h, b.const(value)]), C)))


@pytest.mark.parametrize("op", ["Add", "Mul", "Max", "Sum", "Mean"])
def test_residual_coupling_between_two_branches(op):
    def middle(b, h):
        other = b.conv(b.op("Relu", [h]), C, C)
        return b.op(op, [h, other]), C
    result = prune_and_check(sandwich(middle))
    analysis = onnxprune.analyze(sandwich(middle))
    assert len(analysis.prunable) == 1  # both convs' outputs form one group


def test_broadcast_gate_from_pooled_branch():
    """Squeeze-excite shape: x * sigmoid(conv(pool(x))) couples the gate with x's channels."""
    def middle(b, h):
        s = b.op("GlobalAveragePool", [h])
        s = b.op("Sigmoid", [b.conv(b.op("Relu", [b.conv(s, C, 4, k=1, pad=0)]), 4, C, k=1, pad=0)])
        return b.op("Mul", [h, s]), C
    result = prune_and_check(sandwich(middle))
    assert len(onnxprune.analyze(sandwich(middle)).prunable) == 2  # main path and SE hidden


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("LpPool", {"kernel_shape": [2, 2]}),
    ("GlobalAveragePool", {}),
    ("GlobalMaxPool", {}),
])
def test_pooling(op, attrs):
    prune_and_check(sandwich(lambda b, h: (b.op(op, [h], **attrs), C)))


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum"])
def test_reduce_over_spatial_axes(op, keepdims):
    def middle(b, h):
        axes = b.const(np.array([2, 3], np.int64))
        inputs = [h, axes] if op == "ReduceSum" else [h]
        attrs = {} if op == "ReduceSum" else {"axes": [2, 3]}
        r = b.op(op, inputs, keepdims=keepdims, **attrs)
        return (r if keepdims else b.op("Unsqueeze", [b.op("Unsqueeze", [r, b.const(np.array([2], np.int64))]),
                                                      b.const(np.array([3], np.int64))])), C
    prune_and_check(sandwich(middle))


def test_reduce_over_channel_axis_freezes():
    model = sandwich(lambda b, h: (b.op("ReduceMean", [h], axes=[1], keepdims=1), 1))
    analysis = onnxprune.analyze(model)
    first = analysis.groups[0]
    assert first.frozen and "reduces over the channel axis" in " ".join(first.frozen)


def test_depthwise_conv_updates_group():
    result = prune_and_check(sandwich(lambda b, h: (b.conv(h, C, C, group=C), C)))
    dw = [n for n in result.model.graph.node if n.op_type == "Conv"][1]
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == C // 2


def test_depthwise_with_channel_multiplier():
    prune_and_check(sandwich(lambda b, h: (b.conv(h, C, 2 * C, group=C), 2 * C)))


def test_grouped_conv_prunes_uniformly_per_group():
    result = prune_and_check(sandwich(lambda b, h: (b.conv(b.conv(h, C, C, group=2), C, C, group=2), C)))
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert all(next((a.i for a in n.attribute if a.name == "group"), 1) in (1, 2) for n in convs)


def test_conv_transpose():
    def middle(b, h):
        w = b.weight([C, C, 2, 2])
        return b.op("ConvTranspose", [h, w, b.weight([C], "b")], kernel_shape=[2, 2], strides=[2, 2]), C
    prune_and_check(sandwich(middle))


def test_batchnorm_and_instancenorm():
    def middle(b, h):
        h = b.bn(h, C)
        scale = b.const(np.linspace(0.5, 1.5, C, dtype=np.float32))
        return b.op("InstanceNormalization", [h, scale, b.const(np.zeros(C, np.float32))]), C
    result = prune_and_check(sandwich(middle))
    sizes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    assert all(sizes[name] == [C // 2] for name in bn.input[1:])


def test_concat_on_channel_axis_maps_offsets():
    def middle(b, h):
        other = b.conv(h, C, 6)
        return b.op("Relu", [b.op("Concat", [h, other, h], axis=1)]), 2 * C + 6
    prune_and_check(sandwich(middle))


def test_split_updates_sizes():
    def middle(b, h):
        left, right = b.op("Split", [h, b.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
        return b.op("Concat", [b.op("Relu", [right]), left], axis=1), C
    result = prune_and_check(sandwich(middle))
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    sizes = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert sizes[split.input[1]].sum() < C


def test_slice_on_channel_axis():
    def middle(b, h):
        s = b.op("Slice", [h, b.const(np.array([2], np.int64)), b.const(np.array([7], np.int64)),
                           b.const(np.array([1], np.int64))])
        return s, 5
    prune_and_check(sandwich(middle))


@pytest.mark.parametrize("tail_op", ["Flatten", "Reshape"])
def test_flatten_and_reshape_into_gemm(tail_op):
    b = GraphBuilder(seed=2)
    x = b.input([2, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, C)])
    if tail_op == "Flatten":
        f = b.op("Flatten", [h], axis=1)
    else:
        f = b.op("Reshape", [h, b.const(np.array([2, C * 16], np.int64))])
    b.gemm(f, C * 16, 5)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    prune_and_check(model)


def test_nhwc_flatten_into_matmul():
    """Transpose to NHWC, then flatten: channel c owns features c, C+c, 2C+c, ..."""
    b = GraphBuilder(seed=3)
    x = b.input([1, 3, 4, 4])
    h = b.op("Transpose", [b.op("Relu", [b.conv(x, 3, C)])], perm=[0, 2, 3, 1])
    f = b.op("Reshape", [h, b.const(np.array([1, 16 * C], np.int64))])
    y = b.op("MatMul", [f, b.weight([16 * C, 5])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    prune_and_check(b.model())


def test_transpose_squeeze_unsqueeze_chain():
    def middle(b, h):
        t = b.op("Transpose", [h], perm=[0, 2, 3, 1])
        u = b.op("Unsqueeze", [t, b.const(np.array([0], np.int64))])
        s = b.op("Squeeze", [u, b.const(np.array([0], np.int64))])
        return b.op("Transpose", [s], perm=[0, 3, 1, 2]), C
    prune_and_check(sandwich(middle))


def test_resize_and_pad():
    def middle(b, h):
        scales = b.const(np.array([1, 1, 2, 2], np.float32))
        r = b.op("Resize", [h, "", scales], mode="nearest")
        return b.op("Pad", [r, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]), C
    prune_and_check(sandwich(middle))


def test_layernorm_over_spatial_axis_passes_channels():
    def middle(b, h):
        scale, bias = b.const(np.ones(6, np.float32)), b.const(np.zeros(6, np.float32))
        return b.op("LayerNormalization", [h, scale, bias], axis=-1), C
    prune_and_check(sandwich(middle))


def test_matmul_with_constant_weight_keeps_batch_axes():
    b = GraphBuilder(seed=4)
    x = b.input([2, 5, 6])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight([6, C])])])
    b.op("MatMul", [h, b.weight([C, 3])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    prune_and_check(b.model())


@pytest.mark.parametrize("middle_op,reason", [
    ("LRN", "no channel rule"),  # LRN has no rule: it mixes neighbouring channels
    ("CustomOp", "domain"),
])
def test_unknown_op_freezes_with_reason(middle_op, reason):
    b = GraphBuilder(seed=5)
    x = b.input([1, 3, 4, 4])
    h = b.conv(x, 3, C)
    if middle_op == "CustomOp":
        b.nodes.append(onnx.helper.make_node("Mystery", [h], ["m"], name="mystery", domain="com.example"))
        h = "m"
    else:
        h = b.op("LRN", [h], size=3)
    b.conv(h, C, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 4, 4])
    model = b.model(check=False, domains={"com.example": 1})
    analysis = onnxprune.analyze(model)
    frozen = [g for g in analysis.groups if g.frozen and g.size == C]
    assert frozen and any(reason in r for r in frozen[0].frozen)


def test_graph_output_channels_are_never_pruned():
    b = GraphBuilder(seed=6)
    x = b.input([1, 3, 4, 4])
    h = b.conv(x, 3, C)
    b.nodes[-1].output[0] = "feat"
    b.output("feat")
    b.conv("feat", C, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    result = onnxprune.prune(b.model(), ratio=0.5)
    assert result.report.channels_removed == 0
