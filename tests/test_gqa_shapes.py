"""Grouped-query attention whose K/V repeat is sized at run time, as the TorchScript exporter writes
Llama's `repeat_kv`: the Expand target is `expand_as`'s Where(Equal(t, -1 * ones), ones, t) over a
Concat of `Shape` reads, and the merge Reshape target is `kv_heads * n_rep` as a Mul of a read dim.

Tiny graphs built with onnx.helper, dynamic batch, run in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxprune
from builders import GraphBuilder, zero_kv_group
from onnxprune.heads import group_kind
from onnxprune.ops.shape_values import Dim, Known, shape_value
from onnxprune.verify import session
from reference import assert_matches_masked

S, HIDDEN, HEADS, KV, DIM = 5, 16, 4, 2, 4
REP = HEADS // KV


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _dim(b: GraphBuilder, t: str, axis: int) -> str:
    """Unsqueeze(Gather(Shape(t), axis)): one dim of t read at run time, as a 1-element vector."""
    read = b.op("Gather", [b.op("Shape", [t]), b.const(np.array(axis, np.int64))])
    return b.op("Unsqueeze", [read, b.const(_i64(0))])


def _expand_as_target(b: GraphBuilder, parts: list[str], fill: int = 1) -> str:
    """The TorchScript `expand_as` idiom: -1 entries of the Concat become `fill` (1 in real exports)."""
    t = b.op("Reshape", [b.op("Concat", parts, axis=0), b.const(_i64(-1))])
    def filled(value: int) -> str:
        return b.op("ConstantOfShape", [b.op("Shape", [t])],
                    value=helper.make_tensor("v", onnx.TensorProto.INT64, [1], [value]))
    ones, minus = filled(fill), b.op("Mul", [filled(1), b.const(_i64(-1))])
    return b.op("Where", [b.op("Equal", [t, minus]), ones, t])


def _repeat_kv(b: GraphBuilder, k: str, kv_entry: str | None = None, merge: str = "mul", tile: bool = False) -> str:
    """[B, KV, S, D] -> [B, KV*REP, S, D] with both targets computed from Shape(k) at run time
    (`merge="add"` spells KV*REP as KV + KV, which the shape evaluator does not follow)."""
    unsqueezed = b.op("Unsqueeze", [k, b.const(_i64(2))])
    if tile:  # copies by Tile instead of a broadcast
        expanded = b.op("Tile", [unsqueezed, b.const(_i64(1, 1, REP, 1, 1))])
    else:
        kv = kv_entry or _dim(b, k, 1)
        parts = [_dim(b, k, 0), kv, b.const(_i64(REP)), _dim(b, k, 2), _dim(b, k, 3)]
        expanded = b.op("Expand", [unsqueezed, _expand_as_target(b, parts, fill=KV if kv_entry else 1)])
    kv_dim = b.op("Gather", [b.op("Shape", [k]), b.const(np.array(1, np.int64))])
    total = b.op("Mul", [kv_dim, b.const(np.array(REP, np.int64))]) if merge == "mul" else b.op("Add", [kv_dim, kv_dim])
    heads = b.op("Unsqueeze", [total, b.const(_i64(0))])
    merge_target = b.op("Concat", [_dim(b, k, 0), heads, _dim(b, k, 2), _dim(b, k, 3)], axis=0)
    return b.op("Reshape", [expanded, merge_target])


def _project(b: GraphBuilder, x: str, heads: int, target: str) -> str:
    y = b.op("Add", [b.op("MatMul", [x, b.weight([HIDDEN, heads * DIM])]), b.weight([heads * DIM], "b")])
    return b.op("Transpose", [b.op("Reshape", [y, target])], perm=[0, 2, 1, 3])


def gqa(dead_kv: int | None = None, kv_from_constant: bool = False, merge: str = "mul",
        tile: bool = False) -> onnx.ModelProto:
    """y = softmax(Q Kᵀ/√D) V Wo with GQA, dynamic batch; `dead_kv` zeroes one KV group's Q/K/V."""
    b = GraphBuilder(seed=5)
    x = b.input(["B", S, HIDDEN])
    split = b.op("Concat", [_dim(b, x, 0), _dim(b, x, 1), b.const(_i64(-1, DIM))], axis=0)
    q, k, v = (_project(b, x, h, split) for h in (HEADS, KV, KV))
    if kv_from_constant:  # the KV entry of the Expand target is a fill constant, not a read dim
        k, v = (_repeat_kv(b, t, b.const(_i64(-1)), merge) for t in (k, v))
    else:
        k, v = (_repeat_kv(b, t, None, merge, tile) for t in (k, v))
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          b.const(np.array(DIM ** -0.5, np.float32))])
    context = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [context, b.op("Concat", [_dim(b, x, 0), _dim(b, x, 1), b.const(_i64(-1))], axis=0)])
    b.op("MatMul", [merged, b.weight([HEADS * DIM, HIDDEN])])
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=["B", S, HIDDEN])
    model = b.model()
    if dead_kv is not None:
        zero_kv_group(model, dead_kv, REP * DIM, DIM)  # one KV head and its REP query heads
    return model


def _heads(model: onnx.ModelProto) -> tuple[list, onnxprune.Analysis]:
    analysis = onnxprune.analyze(model)
    return [g for g in analysis.groups if group_kind(analysis, g) == "heads"], analysis


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, S, HIDDEN)).astype(np.float32)}


def _score_heads(model: onnx.ModelProto) -> int:
    """Heads of the attention scores in the model as it runs (ORT output of the score MatMul)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    matmul = next(n for n in probe.graph.node if n.op_type == "MatMul"
                  and not any(i.name == n.input[1] for i in probe.graph.initializer))
    probe.graph.output.append(helper.make_tensor_value_info(matmul.output[0], onnx.TensorProto.FLOAT, None))
    return session(probe).run(None, _feeds(2))[-1].shape[1]


def test_expand_as_idiom_and_scaled_dim_evaluate():
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gqa()))
    expand = next(n for n in graph.nodes if n.op == "Expand")
    reshape = next(n for n in graph.nodes if n.op == "Reshape" and n.inputs[0] is expand.outputs[0])
    k = expand.inputs[0].inputs[0].inputs[0].name  # Unsqueeze(k)
    target = shape_value(expand.inputs[1], 17)
    assert target[:2] + target[3:] == [Dim(k, 0), Dim(k, 1), Dim(k, 2), Dim(k, 3)]
    assert isinstance(target[2], Known) and target[2].value == REP and target[2].source is not None
    assert shape_value(reshape.inputs[1], 17)[1] == Dim(k, 1, factor=REP)


@pytest.mark.parametrize("tile", [False, True], ids=["expand", "tile"])
def test_run_time_repeat_prunes_whole_kv_groups(tile):
    model = gqa(tile=tile)
    heads, _ = _heads(model)
    assert [(g.size, g.prunable) for g in heads] == [(KV, True)]
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 1
    assert_matches_masked(model, result)
    assert (_score_heads(model), _score_heads(result.model)) == (HEADS, HEADS - REP)
    for batch in (1, 3):  # the batch axis stays dynamic
        assert session(result.model).run(None, _feeds(batch))[0].shape == (batch, S, HIDDEN)


@pytest.mark.parametrize("tile", [False, True], ids=["expand", "tile"])
def test_lossless_removes_the_dead_kv_group_exactly(tile):
    model = gqa(dead_kv=1, tile=tile)
    result = onnxprune.prune(model, lossless=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert [g.remove for g in result.plan.groups if g.remove] == [[1]]
    for batch in (1, 3):
        np.testing.assert_allclose(session(result.model).run(None, _feeds(batch))[0],
                                   session(model).run(None, _feeds(batch))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant, reason", [
    (dict(kv_from_constant=True), "computed constant onnxprune cannot rewrite"),
])
def test_run_time_targets_it_cannot_rewrite_freeze_the_heads(variant, reason):
    model = gqa(**variant)
    analysis = onnxprune.analyze(model)
    projections = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    attention = [g for g in analysis.groups if set(g.producers) & projections and g.size <= HEADS]
    assert attention and not any(g.prunable for g in attention)
    assert any(reason in r for g in attention for r in g.frozen), [g.frozen for g in attention]
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert _score_heads(result.model) == HEADS
    np.testing.assert_allclose(session(result.model).run(None, _feeds(2))[0].shape, (2, S, HIDDEN))


def test_tile_along_the_channel_axis_keeps_every_copy_of_a_kept_channel():
    """x W1 (8 features) tiled twice along the features → 16 → W2: feature k owns inputs k and k + 8."""
    b = GraphBuilder(seed=2)
    x = b.input(["B", S, HIDDEN])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight([HIDDEN, 8])])])
    b.op("MatMul", [b.op("Tile", [h, b.const(_i64(1, 1, 2))]), b.weight([16, HIDDEN])])
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=["B", S, HIDDEN])
    model = b.model()
    (group,) = onnxprune.analyze(model).prunable
    tiled = next(m for m in group.members if m.slot[1] == 0 and len(m.elem) == 16)  # rows of W2
    assert np.array_equal(tiled.unit[np.argsort(tiled.elem)], np.r_[np.arange(8), np.arange(8)])
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 4
    assert_matches_masked(model, result)


def test_tile_repeats_read_at_run_time_freeze_the_channels():
    b = GraphBuilder(seed=2)
    x = b.input(["B", S, HIDDEN])
    h = b.op("Relu", [b.op("MatMul", [x, b.weight([HIDDEN, 8])])])
    repeats = b.op("Concat", [b.const(_i64(1, 1)), _dim(b, x, 0)], axis=0)  # the batch size, at run time
    b.op("ReduceSum", [b.op("Tile", [h, repeats]), b.const(_i64(-1))], keepdims=1)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=["B", S, 1])
    reasons = [r for g in onnxprune.analyze(b.model()).groups for r in g.frozen]
    assert any("Tile repeats of the channel axis are computed at run time" in r for r in reasons), reasons


def test_merged_head_count_spelled_by_arithmetic_it_does_not_follow_is_pinned():
    """KV + KV is no arithmetic the shape evaluator follows, but its value is static: the import
    writes the merge target as a constant, which the rewrite changes with the kept heads."""
    model = gqa(merge="add")
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 1
    assert _score_heads(result.model) == HEADS - REP
    for batch in (1, 3):
        assert_matches_masked(model, result, batch=batch)


def test_run_time_width_read_from_another_layers_channels_is_pinned_without_merging():
    """Swin's attention output is reshaped back with the residual stream's width read at run time:
    the same count, but not the same channels (a MatMul lies between). Tying them would merge the
    residual stream into the attention group. The width is static, so the import writes it as a
    constant: the attention channels prune alone and the rewrite changes that constant."""
    b = GraphBuilder(seed=3)
    x = b.input(["B", S, HIDDEN])
    split = b.op("Reshape", [b.op("MatMul", [x, b.weight([HIDDEN, HIDDEN], "wa")]), b.const(_i64(0, 0, 2, 8))])
    width = b.op("Concat", [_dim(b, x, 0), _dim(b, x, 1), _dim(b, x, 2)], axis=0)
    merged = b.op("Reshape", [b.op("Relu", [split]), width])
    b.op("Add", [x, b.op("MatMul", [merged, b.weight([HIDDEN, HIDDEN], "wb")])])
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=["B", S, HIDDEN])
    model = b.model()
    analysis = onnxprune.analyze(model)
    by_slot = {m.slot: g for g in analysis.groups for m in g.members}
    inner, stream = by_slot[("wa1", 1)], by_slot[("x", 2)]
    assert inner is not stream and inner.prunable, inner.frozen
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == inner.size // 2
    for batch in (1, 3):
        assert_matches_masked(model, result, batch=batch)
