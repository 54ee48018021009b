"""The hard CNN patterns real exports contain, each as a tiny onnx.helper graph.

Lossless-equivalent prunes are compared with the consumer-masked reference; the lossy LayerNorm
case (its statistics change) is compared with the same graph built directly at the kept width.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder
from reference import assert_matches_masked
from onnxprune.verify import random_inputs, session


def _finish(b: GraphBuilder, y: str, name: str = "y") -> str:
    """Rename the last node's output `y` to the graph output `name`."""
    assert b.nodes[-1].output[0] == y
    b.nodes[-1].output[0] = name
    b.output(name)
    return name


def _prune(model: onnx.ModelProto, **kw) -> onnxprune.PruneResult:
    result = onnxprune.prune(model, ratio=0.5, **kw)
    assert result.report.channels_removed > 0, onnxprune.analyze(model).summary()
    return result


def _i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _shuffle(b: GraphBuilder, x: str, groups: int, c: int, hw: int) -> str:
    """ShuffleNet's channel shuffle: [N,C,H,W] -> [N,g,C/g,H,W] -> swap -> [N,C,H,W]."""
    h = b.op("Reshape", [x, b.const(_i64(1, groups, c // groups, hw, hw))])
    h = b.op("Transpose", [h], perm=[0, 2, 1, 3, 4])
    return b.op("Reshape", [h, b.const(_i64(1, c, hw, hw))])


def _shufflenet_unit(split: str) -> onnx.ModelProto:
    """Two branches -> concat -> shuffle -> split in halves (Split, constant Slice, or torch's
    `chunk`, whose bounds are computed from Shape at run time) -> conv on one half -> concat ->
    shuffle -> conv."""
    b = GraphBuilder(seed=3)
    x = b.input([1, 3, 6, 6])
    left = b.op("Relu", [b.conv(x, 3, 4)])
    right = b.op("Relu", [b.conv(x, 3, 4)])
    s = _shuffle(b, b.op("Concat", [left, right], axis=1), 2, 8, 6)
    if split == "split":
        x1, x2 = b.op("Split", [s, b.const(_i64(4, 4))], n_out=2, axis=1)
    elif split == "slice":
        x1 = b.op("Slice", [s, b.const(_i64(0)), b.const(_i64(4)), b.const(_i64(1))])
        x2 = b.op("Slice", [s, b.const(_i64(4)), b.const(_i64(8)), b.const(_i64(1))])
    else:  # chunk(2, dim=1) as the TorchScript exporter writes it
        channels = b.op("Gather", [b.op("Shape", [s]), b.const(_i64(1))], axis=0)
        half = b.op("Div", [b.op("Add", [channels, b.const(_i64(1))]), b.const(_i64(2))])
        end = b.op("Mul", [half, b.const(_i64(2))])
        x1 = b.op("Slice", [s, b.const(_i64(0)), half, b.const(_i64(1))])
        x2 = b.op("Slice", [s, half, end, b.const(_i64(1))])
    x2 = b.op("Relu", [b.conv(b.conv(x2, 4, 4, k=1, pad=0), 4, 4, group=4)])
    s2 = _shuffle(b, b.op("Concat", [x1, x2], axis=1), 2, 8, 6)
    _finish(b, b.conv(s2, 8, 5, k=1, pad=0))
    return b.model()


@pytest.mark.parametrize("split", ["split", "slice", "chunk"])
def test_channel_shuffle_prunes_consistently(split):
    model = _shufflenet_unit(split)
    analysis = onnxprune.analyze(model)
    shuffled = [g for g in analysis.groups if any(m.slot[0].startswith("transpose") for m in g.members)]
    assert shuffled and all(g.prunable for g in shuffled), analysis.summary()
    result = _prune(model)
    assert_matches_masked(model, result)
    reshapes = [n for n in result.model.graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == 4


def _squeeze_excite(fc: bool, gate: str) -> onnx.ModelProto:
    """MobileNetV3/EfficientNet SE: pool -> reduce -> act -> expand -> (hard) sigmoid -> x * gate."""
    b = GraphBuilder(seed=4)
    x = b.input([1, 3, 6, 6])
    h = b.op("Relu", [b.bn(b.conv(x, 3, 8), 8)])
    s = b.op("GlobalAveragePool", [h])
    if fc:  # torchvision's older SE modules: flatten -> Linear -> Linear -> view
        s = b.op("Flatten", [s], axis=1)
        s = b.gemm(b.op("Relu", [b.gemm(s, 8, 4)]), 4, 8)
    else:
        s = b.conv(b.op("Relu", [b.conv(s, 8, 4, k=1, pad=0)]), 4, 8, k=1, pad=0)
    s = b.op("Sigmoid", [s]) if gate == "sigmoid" else b.op("HardSigmoid", [s], alpha=1 / 6, beta=0.5)
    if fc:
        s = b.op("Reshape", [s, b.const(_i64(1, 8, 1, 1))])
    h = b.op("Mul", [h, s])
    _finish(b, b.conv(h, 8, 5, k=1, pad=0))
    return b.model()


@pytest.mark.parametrize("fc", [False, True], ids=["conv", "fc"])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_squeeze_excite(fc, gate):
    model = _squeeze_excite(fc, gate)
    analysis = onnxprune.analyze(model)
    sizes = sorted(g.size for g in analysis.prunable)
    assert sizes == [4, 8], analysis.summary()  # SE hidden width apart from the gated channels
    gated = next(g for g in analysis.prunable if g.size == 8)
    ops = {n.op for n in analysis.graph.nodes if any(t.name in {m.slot[0] for m in gated.members}
                                                       for t in n.outputs)}
    assert {"Mul", "Conv"} <= ops
    result = _prune(model)
    assert result.report.groups_pruned == 2
    assert_matches_masked(model, result)


@pytest.mark.parametrize("groups,width", [(4, 16), (2, 8), (8, 16)])
def test_grouped_conv_keeps_group_valid(groups, width):
    """ResNeXt/RegNet: conv 1x1 -> grouped 3x3 -> conv 1x1 with a residual add."""
    b = GraphBuilder(seed=5)
    x = b.input([1, 3, 6, 6])
    stem = b.op("Relu", [b.conv(x, 3, 8)])
    h = b.op("Relu", [b.conv(stem, 8, width, k=1, pad=0)])
    h = b.op("Relu", [b.conv(h, width, width, group=groups)])
    h = b.op("Add", [b.conv(h, width, 8, k=1, pad=0), stem])
    _finish(b, b.conv(b.op("Relu", [h]), 8, 5, k=1, pad=0))
    model = b.model()
    result = _prune(model)
    assert_matches_masked(model, result)
    grouped = [n for n in result.model.graph.node if n.op_type == "Conv"][2]
    inits = {t.name: t for t in result.model.graph.initializer}
    group = next(a.i for a in grouped.attribute if a.name == "group")
    w = inits[grouped.input[1]].dims
    assert group == groups and w[0] % groups == 0 and w[0] < width


def test_concat_of_concat_and_channel_slicing():
    """DenseNet: each layer concatenates onto the running features; Inception: a slice of a concat."""
    b = GraphBuilder(seed=6)
    x = b.input([1, 3, 6, 6])
    feats = b.op("Relu", [b.bn(b.conv(x, 3, 4), 4)])
    width = 4
    for _ in range(3):
        new = b.conv(b.op("Relu", [b.bn(feats, width)]), width, 4)
        feats = b.op("Concat", [feats, new], axis=1)
        width += 4
    part = b.op("Slice", [feats, b.const(_i64(2)), b.const(_i64(10)), b.const(_i64(1))])
    a = b.conv(b.op("Relu", [b.bn(feats, width)]), width, 3, k=1, pad=0)
    c = b.conv(part, 8, 3, k=1, pad=0)
    _finish(b, b.op("Add", [a, c]))
    model = b.model()
    analysis = onnxprune.analyze(model)
    frozen = [g for g in analysis.groups if g.frozen]
    assert len(frozen) == 1 and len(analysis.prunable) >= 4, analysis.summary()  # only the output
    result = _prune(model)
    assert_matches_masked(model, result)


def _convnext_block(b: GraphBuilder, x: str, c: int, weights: dict, keep: np.ndarray | None) -> str:
    """dwconv -> permute -> LayerNorm(C) -> Linear 4C -> GELU -> Linear C -> layer scale -> permute
    -> residual. `weights` holds full-width arrays; `keep` slices the channel axis everywhere."""
    k = np.arange(c) if keep is None else keep
    n = len(k)
    h = b.op("Conv", [x, b.const(weights["dw"][k]), b.const(weights["dwb"][k])], kernel_shape=[3, 3],
             pads=[1, 1, 1, 1], group=n)
    h = b.op("Transpose", [h], perm=[0, 2, 3, 1])
    h = b.op("LayerNormalization", [h, b.const(weights["g"][k]), b.const(weights["beta"][k])], axis=-1, epsilon=1e-6)
    h = b.op("Add", [b.op("MatMul", [h, b.const(weights["w1"][k])]), b.const(weights["b1"])])
    h = b.op("Gelu", [h])
    h = b.op("Add", [b.op("MatMul", [h, b.const(weights["w2"][:, k])]), b.const(weights["b2"][k])])
    h = b.op("Mul", [h, b.const(weights["scale"][k])])
    h = b.op("Transpose", [h], perm=[0, 3, 1, 2])
    return b.op("Add", [x, h])


def _convnext(keep: np.ndarray | None = None, c: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    weights = {"stem": f(c, 3, 2, 2), "stemb": f(c), "dw": f(c, 1, 3, 3), "dwb": f(c), "g": f(c) + 1,
               "beta": f(c), "w1": f(c, 4 * c), "b1": f(4 * c), "w2": f(4 * c, c), "b2": f(c), "scale": f(c),
               "head": f(5, c, 1, 1), "headb": f(5)}
    k = np.arange(c) if keep is None else keep
    b = GraphBuilder(seed=7, opset=20)
    x = b.input([1, 3, 8, 8])
    h = b.op("Conv", [x, b.const(weights["stem"][k]), b.const(weights["stemb"][k])], kernel_shape=[2, 2],
             strides=[2, 2])
    h = _convnext_block(b, h, c, weights, keep)
    _finish(b, b.op("Conv", [h, b.const(weights["head"][:, k]), b.const(weights["headb"])], kernel_shape=[1, 1]))
    return b.model()


def test_layernorm_behind_permutes_prunes_only_in_lossy_mode():
    model = _convnext()
    stream = [g for g in onnxprune.analyze(model).groups if g.size == 8]
    assert len(stream) == 1 and stream[0].prunable
    # Lossy: the LayerNorm now normalises over the kept channels; build that model directly.
    hidden = next(n.name for n in model.graph.node if n.op_type == "MatMul")  # keep the MLP width whole
    result = onnxprune.prune(model, ratio=0.5, exclude=[hidden])
    kept = np.setdiff1d(np.arange(8), result.plan.resolve(onnxprune.analyze(model))[stream[0].id])
    assert len(kept) == 4
    expected = _convnext(kept)
    feeds = random_inputs(model, seed=0)
    np.testing.assert_allclose(session(result.model).run(None, feeds)[0], session(expected).run(None, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_layernorm_channels_are_frozen_in_lossless_mode_with_reason():
    model = _convnext()
    init = {t.name: t for t in model.graph.initializer}
    stem = model.graph.node[0]
    for name, rows in ((stem.input[1], [1, 6]), (stem.input[2], [1, 6])):
        arr = onnx.numpy_helper.to_array(init[name]).copy()
        arr[rows] = 0
        init[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
    result = onnxprune.prune(model, lossless=True)
    frozen = [g for g in result.report.analysis["groups_frozen"] if g["channels"] == 8]
    assert frozen and any("statistics" in r for r in frozen[0]["reasons"]), result.report.analysis
    outs = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    assert onnx.numpy_helper.to_array(
        next(t for t in result.model.graph.initializer if t.name == outs[0].input[1])).shape == (8,)


def test_transformer_mlp_hidden_width_prunes():
    """ViT/Swin MLP: LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> residual; the hidden width is
    its own group; the residual stream (into the graph output) stays."""
    b = GraphBuilder(seed=8, opset=20)
    x = b.input([1, 5, 8])
    h = b.op("LayerNormalization", [x, b.const(np.ones(8, np.float32)), b.const(np.zeros(8, np.float32))],
             axis=-1)
    h = b.op("Add", [b.op("MatMul", [h, b.weight([8, 32])]), b.weight([32])])
    h = b.op("Gelu", [h])
    h = b.op("Add", [b.op("MatMul", [h, b.weight([32, 8])]), b.weight([8])])
    _finish(b, b.op("Add", [x, h]))
    model = b.model()
    result = _prune(model)
    assert result.report.groups_pruned == 1
    assert_matches_masked(model, result)


def test_segmentation_heads_resize_and_two_outputs():
    """FCN/DeepLab: backbone -> head -> Resize to the input size, plus an aux head: two outputs."""
    b = GraphBuilder(seed=9)
    x = b.input([1, 3, 8, 8])
    feat = b.op("Relu", [b.bn(b.conv(x, 3, 8), 8)])
    feat = b.op("MaxPool", [feat], kernel_shape=[2, 2], strides=[2, 2])
    deep = b.op("Relu", [b.bn(b.conv(feat, 8, 8), 8)])
    head = b.conv(b.op("Relu", [b.bn(b.conv(deep, 8, 6), 6)]), 6, 3, k=1, pad=0)
    aux = b.conv(b.op("Relu", [b.conv(feat, 8, 4)]), 4, 3, k=1, pad=0)
    scales = b.const(np.array([1, 1, 2, 2], np.float32))
    b.op("Resize", [head, b.const(np.zeros(0, np.float32)), scales], mode="linear")
    b.nodes[-1].output[0] = "out"
    b.op("Resize", [aux, "", "", b.const(_i64(1, 3, 8, 8))], mode="nearest")
    b.nodes[-1].output[0] = "aux"
    b.output("out", shape=[1, 3, 8, 8])
    b.output("aux", shape=[1, 3, 8, 8])
    model = b.model()
    result = _prune(model)
    assert result.report.groups_pruned == 4  # stem, deep, head hidden, aux hidden
    assert_matches_masked(model, result)
    names = [o.name for o in result.model.graph.output]
    assert names == ["out", "aux"]


def test_gather_class_token_and_flat_index_gather():
    """ViT's `x[:, 0]` gathers on the token axis (channels pass); the dynamo exporter's `as_strided`
    gathers a flattened channel axis by constant indices, rewritten to the kept positions."""
    b = GraphBuilder(seed=10)
    x = b.input([1, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 8)])
    tokens = b.op("Transpose", [b.op("Reshape", [h, b.const(_i64(1, 8, 16))])], perm=[0, 2, 1])
    hidden = b.op("Relu", [b.op("MatMul", [tokens, b.weight([8, 6])])])
    cls = b.op("Gather", [hidden, b.const(np.array(0, np.int64))], axis=1)  # [1, 6]
    pooled = b.op("Reshape", [b.op("GlobalAveragePool", [h]), b.const(_i64(-1))])  # [8]
    order = np.array([3, 1, 0, 2, 7, 6, 4, 5], np.int64)
    picked = b.op("Reshape", [b.op("Gather", [pooled, b.const(order)], axis=0), b.const(_i64(1, 8))])
    joined = b.op("Concat", [cls, picked], axis=1)
    _finish(b, b.gemm(joined, 14, 3))
    model = b.model()
    analysis = onnxprune.analyze(model)
    assert sorted(g.size for g in analysis.prunable) == [6, 8], analysis.summary()
    result = _prune(model)
    assert result.report.groups_pruned == 2
    assert_matches_masked(model, result)
