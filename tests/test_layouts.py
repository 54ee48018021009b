"""Channel-last (NHWC) layouts as TensorFlow/Keras exporters write them, in tiny graphs.

Each graph is x[N,3,6,6] → Conv(3→C) → [layout pattern under test] → weight consumer. Pruned at
ratio 0.5, it must remove channels, pass the full checker and equal the consumer-masked
reference in ONNX Runtime; the patterns are written out op by op, independent of any exporter.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder
from reference import assert_matches_masked

C, S = 8, 6
NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def build(middle, batch="N") -> onnx.ModelProto:
    """x → Conv(3→C) → middle(b, h) → y (middle ends in its own weight consumer)."""
    b = GraphBuilder(seed=3)
    x = b.input([batch, 3, S, S])
    y = middle(b, b.conv(x, 3, C))
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def prune_and_check(model: onnx.ModelProto, groups: int = 1) -> onnxprune.PruneResult:
    analysis = onnxprune.analyze(model)
    assert len(analysis.prunable) >= groups, analysis.summary()
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed > 0
    assert result.report.after.params < result.report.before.params
    assert_matches_masked(model, result)
    return result


def dense(b: GraphBuilder, h: str, k: int, n: int, bias: bool = True) -> str:
    """Keras Dense as exported: MatMul with a [k, n] weight, then Add of a [n] bias."""
    y = b.op("MatMul", [h, b.weight([k, n])])
    return b.op("Add", [y, b.weight([n], "b")]) if bias else y


def channel_last_bn(b: GraphBuilder, h: str, c: int) -> str:
    """BatchNormalization folded into Mul/Add on the last axis (rank-1 constants broadcast)."""
    h = b.op("Mul", [h, b.const((b.rng.random(c) + 0.5).astype(np.float32), "scale")])
    return b.op("Add", [h, b.weight([c], "shift")])


def runtime_flatten(b: GraphBuilder, h: str, features: int, dtype=np.int32) -> str:
    """tf2onnx's Flatten: target [batch, features] built from Shape at run time (with int32 casts)."""
    shape = b.op("Shape", [h])
    shape = b.op("Gather", [shape, b.const(np.array(NHWC, np.int64))], axis=0)
    shape = b.op("Cast", [shape], to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    one = b.const(np.array([0], np.int64))
    batch = b.op("Slice", [shape, one, b.const(np.array([1], np.int64)), one])
    target = b.op("Concat", [batch, b.const(np.array([features], dtype))], axis=0)
    return b.op("Reshape", [h, b.op("Cast", [target], to=onnx.TensorProto.INT64)])


def test_transpose_pair_left_by_the_exporter():
    prune_and_check(build(lambda b, h: b.conv(b.op("Transpose", [b.op("Transpose", [h], perm=NHWC)], perm=NCHW), C, 4)))


def test_transpose_with_an_unusual_perm_and_its_inverse():
    perm = [2, 0, 3, 1]
    inverse = list(np.argsort(perm))
    prune_and_check(build(lambda b, h: b.conv(b.op("Transpose", [b.op("Transpose", [h], perm=perm)], perm=inverse), C, 4)))


def test_channel_last_constants_broadcast_by_rank():
    def middle(b, h):
        h = b.op("Relu", [channel_last_bn(b, b.op("Transpose", [h], perm=NHWC), C)])
        return b.conv(b.op("Transpose", [h], perm=NCHW), C, 4)
    prune_and_check(build(middle))


def test_nhwc_flatten_owns_a_comb_of_features():
    def middle(b, h):
        return dense(b, b.op("Flatten", [b.op("Transpose", [h], perm=NHWC)], axis=1), S * S * C, 5)
    prune_and_check(build(middle, batch=1))
    analysis = onnxprune.analyze(build(middle, batch=1))
    flat = next(m for g in analysis.prunable for m in g.members if m.role == "weight" and m.slot[1] == 0
                and len(m.elem) == S * S * C)
    assert np.array_equal(flat.unit[:2 * C], np.r_[np.arange(C), np.arange(C)])  # features c, C+c, ...


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_flatten_target_computed_at_run_time(dtype):
    model = build(lambda b, h: dense(b, runtime_flatten(b, b.op("Transpose", [h], perm=NHWC), S * S * C, dtype), S * S * C, 5))
    result = prune_and_check(model)
    constants = [onnx.numpy_helper.to_array(init) for init in result.model.graph.initializer]
    features = [v for v in constants if v.dtype == dtype and v.shape == (1,) and v[0] > 1]
    assert [int(v[0]) for v in features] == [S * S * (C // 2)]  # the Concat's constant was rewritten


def _channel_count_into_reshape(b, h, channel_last: bool):
    """Reshape [N, C, S, S] to a run-time target that reads C: [N, C, -1], or [N, -1, C]."""
    shape = b.op("Shape", [h])
    bounds = [(b.const(np.array([a], np.int64)), b.const(np.array([a + 1], np.int64))) for a in (0, 1)]
    dim = [b.op("Slice", [shape, lo, hi]) for lo, hi in bounds]
    rest = b.const(np.array([-1], np.int64))
    target = b.op("Concat", [dim[0], rest, dim[1]] if channel_last else [dim[0], dim[1], rest], axis=0)
    return b.op("Reshape", [h, target])


def test_channel_count_sizing_its_own_axis_in_a_reshape_target_prunes():
    def middle(b, h):
        pooled = b.op("ReduceMean", [_channel_count_into_reshape(b, h, False)], axes=[2], keepdims=0)
        return dense(b, pooled, C, 3)
    prune_and_check(build(middle))


def test_channel_count_reaching_a_reshape_freezes_with_a_reason():
    def middle(b, h):  # the read count sizes an axis that mixes channels with pixels
        return dense(b, _channel_count_into_reshape(b, h, True), C, 3)
    reasons = [r for g in onnxprune.analyze(build(middle)).summary()["groups_frozen"] for r in g["reasons"]]
    assert any("Reshape" in r and "regroups the channel axis" in r for r in reasons), reasons


def test_dense_as_matmul_plus_add_after_global_pooling_and_squeeze():
    def middle(b, h):
        pooled = b.op("GlobalAveragePool", [h])
        squeezed = b.op("Squeeze", [pooled, b.const(np.array([2, 3], np.int64))])
        return dense(b, b.op("Relu", [dense(b, squeezed, C, 6)]), 6, 3)
    prune_and_check(build(middle), groups=2)


def test_reduce_mean_without_keepdims_over_nhwc_spatial_axes():
    def middle(b, h):
        nhwc = b.op("Transpose", [h], perm=NHWC)
        pooled = b.op("ReduceMean", [nhwc], axes=[1, 2], keepdims=0)
        return dense(b, pooled, C, 3)
    prune_and_check(build(middle))


def test_global_pool_behind_transposes():
    def middle(b, h):
        back = b.op("Transpose", [b.op("Transpose", [h], perm=NHWC)], perm=NCHW)
        pooled = b.op("GlobalAveragePool", [back])
        flat = b.op("Reshape", [pooled, b.const(np.array([-1, C], np.int64))])
        return dense(b, flat, C, 3)
    prune_and_check(build(middle))


def test_squeeze_excite_built_from_reshape_and_mul_in_nhwc():
    def middle(b, h):
        nhwc = b.op("Relu", [b.op("Transpose", [h], perm=NHWC)])
        pooled = b.op("ReduceMean", [nhwc], axes=[1, 2], keepdims=0)
        gate = b.op("Sigmoid", [dense(b, b.op("Relu", [dense(b, pooled, C, 4)]), 4, C)])
        gate = b.op("Reshape", [gate, b.const(np.array([-1, 1, 1, C], np.int64))])
        scaled = b.op("Mul", [nhwc, gate])
        return b.conv(b.op("Transpose", [scaled], perm=NCHW), C, 4, k=1, pad=0)
    prune_and_check(build(middle), groups=2)


def test_depthwise_and_separable_as_exported():
    def middle(b, h):
        h = b.op("Relu", [b.conv(h, C, C, group=C, bias=False)])  # DepthwiseConv2D
        h = b.conv(b.conv(h, C, C, group=C, bias=False), C, 6, k=1, pad=0)  # SeparableConv2D
        return b.conv(b.op("Relu", [h]), 6, 4)
    prune_and_check(build(middle), groups=2)
