"""Lossless mode: provably constant channels go, outputs stay (ORT, rel err <= 1e-5)."""

import numpy as np
import onnx
from onnx import numpy_helper

import onnxprune
from builders import GraphBuilder
from onnxprune.verify import random_inputs, session

C = 8


def _set(model, name, fn):
    init = next(t for t in model.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(init).copy()
    fn(arr)
    init.CopyFrom(numpy_helper.from_array(arr, name))


def _assert_same(model, pruned, tol=1e-5):
    onnx.checker.check_model(pruned, full_check=True)
    for seed in (0, 1):
        feeds = random_inputs(model, seed=seed, batch=2)
        for a, b in zip(session(model).run(None, feeds), session(pruned).run(None, feeds)):
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


def _two_convs(k2: int, pad2: int, bn: bool = False):
    b = GraphBuilder(seed=7)
    x = b.input([1, 3, 6, 6])
    h = b.conv(x, 3, C)
    if bn:
        h = b.bn(h, C)
    h = b.op("Relu", [h])
    b.conv(h, C, 4, k=k2, pad=pad2)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_zero_weights_and_bias_are_removed_exactly():
    model = _two_convs(3, 1)
    conv = model.graph.node[0]
    _set(model, conv.input[1], lambda w: w.__setitem__([1, 5], 0))
    _set(model, conv.input[2], lambda b: b.__setitem__([1, 5], 0))
    result = onnxprune.prune(model, lossless=True, verify=True)
    assert result.report.channels_removed == 2
    _assert_same(model, result.model)


def test_constant_nonzero_channel_folds_into_unpadded_consumer():
    model = _two_convs(1, 0)
    conv = model.graph.node[0]
    _set(model, conv.input[1], lambda w: w.__setitem__([2], 0))
    _set(model, conv.input[2], lambda b: b.__setitem__([2], 0.7))  # relu(0.7) = 0.7 everywhere
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 1
    _assert_same(model, result.model)


def test_constant_nonzero_channel_kept_before_padded_consumer():
    """Zero padding makes a constant channel non-constant at the borders: not provably removable."""
    model = _two_convs(3, 1)
    conv = model.graph.node[0]
    _set(model, conv.input[1], lambda w: w.__setitem__([2], 0))
    _set(model, conv.input[2], lambda b: b.__setitem__([2], 0.7))
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 0


def test_batchnorm_gamma_zero_is_removed_exactly():
    model = _two_convs(1, 0, bn=True)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    _set(model, bn.input[1], lambda g: g.__setitem__([0, 3, 4], 0))
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 3
    _assert_same(model, result.model)


def test_flatten_gemm_and_matmul_consumers_get_bias():
    b = GraphBuilder(seed=8)
    x = b.input([2, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, C)])
    f = b.op("Flatten", [h], axis=1)
    g = b.op("Relu", [b.gemm(f, C * 16, 6)])
    b.op("MatMul", [g, b.weight([6, 3])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    conv, gemm = model.graph.node[0], next(n for n in model.graph.node if n.op_type == "Gemm")
    _set(model, conv.input[1], lambda w: w.__setitem__([3], 0))
    _set(model, conv.input[2], lambda v: v.__setitem__([3], 1.5))
    _set(model, gemm.input[1], lambda w: w.__setitem__([2], 0))
    _set(model, gemm.input[2], lambda v: v.__setitem__([2], 0.25))
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 2
    _assert_same(model, result.model)


def test_residual_channel_is_dead_only_when_both_branches_are():
    b = GraphBuilder(seed=9)
    x = b.input([1, 3, 5, 5])
    a = b.conv(x, 3, C)
    r = b.conv(b.op("Relu", [a]), C, C)
    s = b.op("Relu", [b.op("Add", [a, r])])
    b.conv(s, C, 4, k=1, pad=0)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    c1, c2 = [n for n in model.graph.node if n.op_type == "Conv"][:2]
    for node in (c1,):
        _set(model, node.input[1], lambda w: w.__setitem__([1, 6], 0))
        _set(model, node.input[2], lambda v: v.__setitem__([1, 6], 0))
    assert onnxprune.prune(model, lossless=True).report.channels_removed == 0  # r still feeds them
    _set(model, c2.input[1], lambda w: w.__setitem__([1], 0))
    _set(model, c2.input[2], lambda v: v.__setitem__([1], 0))
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 1
    _assert_same(model, result.model)
