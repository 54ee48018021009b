"""Attention heads on tiny hand-built graphs: per-head units, GQA groups, dynamic shapes, lossless.

Every model is pruned and compared in ONNX Runtime with the consumer-masked reference (the
original with the removed heads' rows of the output projection zeroed), which a correct head
removal equals: a head only reaches the output through its rows of Wo.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from builders import GraphBuilder, zero_kv_group
from onnxprune.heads import group_kind
from onnxprune.verify import session
from reference import assert_matches_masked

S, HIDDEN, HEADS, DIM = 6, 16, 4, 4


def _project(b: GraphBuilder, x: str, heads: int, batch, shape=None) -> str:
    """x @ W + bias, split into heads and moved to [B, heads, S, D]."""
    y = b.op("Add", [b.op("MatMul", [x, b.weight([HIDDEN, heads * DIM])]), b.weight([heads * DIM], "b")])
    target = shape if shape is not None else b.const(np.array([batch, S, heads, DIM], np.int64))
    return b.op("Transpose", [b.op("Reshape", [y, target])], perm=[0, 2, 1, 3])


def attention(kv_heads: int = HEADS, softmax_axis: int = -1, dead_head: int | None = None,
              dynamic: bool = False) -> onnx.ModelProto:
    """One attention block (no residual): y = softmax(Q Kᵀ / √D) V · Wo. With `kv_heads` < HEADS the
    K/V heads are repeated (Unsqueeze → Expand → Reshape) as grouped-query attention does."""
    b = GraphBuilder(seed=3)
    x = b.input(["B", S, HIDDEN] if dynamic else [2, S, HIDDEN])
    shape = None
    if dynamic:  # [B, S, -1, D] computed at run time, as exporters with dynamic axes write it
        batch = b.op("Slice", [b.op("Shape", [x]), b.const(np.array([0], np.int64)), b.const(np.array([2], np.int64))])
        shape = b.op("Concat", [batch, b.const(np.array([-1, DIM], np.int64))], axis=0)
    q = _project(b, x, HEADS, 2, shape)
    k, v = _project(b, x, kv_heads, 2, shape), _project(b, x, kv_heads, 2, shape)
    if kv_heads < HEADS:
        rep = HEADS // kv_heads
        k, v = (b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, b.const(np.array([2], np.int64))]),
                                                  b.const(np.array([2, kv_heads, rep, S, DIM], np.int64))]),
                                  b.const(np.array([2, HEADS, S, DIM], np.int64))]) for t in (k, v))
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          b.const(np.array(DIM ** -0.5, np.float32))])
    context = b.op("MatMul", [b.op("Softmax", [scores], axis=softmax_axis), v])
    merged = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]),
                              b.const(np.array([0, S, HEADS * DIM], np.int64))])
    b.op("MatMul", [merged, b.weight([HEADS * DIM, HIDDEN])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    if dead_head is not None:
        zero_kv_group(model, dead_head, HEADS // kv_heads * DIM, DIM)  # one KV head and its query heads
    return model


def head_groups(model: onnx.ModelProto) -> list:
    analysis = onnxprune.analyze(model)
    return [g for g in analysis.prunable if group_kind(analysis, g) == "heads"]


def test_heads_are_units_of_head_dim_rows():
    model = attention()
    (group,) = head_groups(model)
    assert group.size == HEADS
    q_cols = next(m for m in group.members if m.role == "weight" and m.slot[1] == 1)
    assert np.array_equal(np.bincount(q_cols.unit), [DIM] * HEADS)  # D consecutive columns per head
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == HEADS // 2
    assert_matches_masked(model, result)


def test_head_ratio_is_separate_from_ratio():
    result = onnxprune.prune(attention(), ratio=0.0, head_ratio=0.25)
    assert [len(g.remove) for g in result.plan.groups if g.size == HEADS] == [1]


def test_grouped_query_attention_removes_whole_kv_groups():
    model = attention(kv_heads=2)
    (group,) = head_groups(model)
    assert group.size == 2
    result = onnxprune.prune(model, ratio=0.5)
    assert_matches_masked(model, result)
    expand = next(n for n in result.model.graph.node if n.op_type == "Expand")
    target = next(t for t in result.model.graph.initializer if t.name == expand.input[1])
    assert numpy_helper.to_array(target).tolist() == [2, 1, 2, S, DIM]


def test_run_time_reshape_target_keeps_dynamic_batch():
    model = attention(dynamic=True)
    assert [g.size for g in head_groups(model)] == [HEADS]
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, S, HIDDEN)).astype(np.float32)
        assert session(result.model).run(None, {"x": x})[0].shape == (batch, S, HIDDEN)


@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_lossless_removes_a_dead_head_exactly(kv_heads):
    model = attention(kv_heads=kv_heads, dead_head=1)
    result = onnxprune.prune(model, lossless=True)
    assert [g.remove for g in result.plan.groups if g.remove] == [[1]]
    x = np.random.default_rng(0).standard_normal((2, S, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(session(result.model).run(None, {"x": x})[0],
                               session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_softmax_across_heads_freezes_them():
    analysis = onnxprune.analyze(attention(softmax_axis=1))
    reasons = [r for g in analysis.groups for r in g.frozen]
    assert any("Softmax normalises over the channel axis" in r for r in reasons), reasons
    assert not [g for g in analysis.prunable if group_kind(analysis, g) == "heads"]


def test_shared_zero_bias_does_not_tie_layers():
    """Exporters share one zero bias between unrelated layers; each layer stays its own group."""
    b = GraphBuilder(seed=0)
    x = b.input([2, 8])
    bias = b.const(np.zeros(8, np.float32), "shared_bias")
    h = b.op("Relu", [b.op("Gemm", [x, b.weight([8, 8]), bias], transB=1)])
    h = b.op("Relu", [b.op("Gemm", [h, b.weight([8, 8]), bias], transB=1)])
    b.op("Gemm", [h, b.weight([3, 8]), b.weight([3], "b")], transB=1)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    assert len(onnxprune.analyze(model).prunable) == 2
    result = onnxprune.prune(model, ratio=0.0, lossless=True)  # nothing removed: the copy is joined again
    assert sum(1 for t in result.model.graph.initializer if np.array_equal(numpy_helper.to_array(t).shape, [8])) == 1


def transformer_block() -> onnx.ModelProto:
    """x → dense → LayerNorm → attention → residual add → LayerNorm → classifier: the hidden size
    (16) runs through both LayerNorms, the Q/K/V inputs and the output projection."""
    b = GraphBuilder(seed=5)
    x = b.input([2, S, 8])
    h = b.op("MatMul", [x, b.weight([8, HIDDEN])])
    ln = b.op("LayerNormalization", [h, b.weight([HIDDEN], "g"), b.weight([HIDDEN], "beta")], axis=-1)
    q, k, v = (_project(b, ln, HEADS, 2) for _ in range(3))
    probs = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    merged = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]),
                              b.const(np.array([0, S, HEADS * DIM], np.int64))])
    h = b.op("Add", [h, b.op("MatMul", [merged, b.weight([HEADS * DIM, HIDDEN])])])
    h = b.op("LayerNormalization", [h, b.weight([HIDDEN], "g"), b.weight([HIDDEN], "beta")], axis=-1)
    b.op("MatMul", [h, b.weight([HIDDEN, 3])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def _hidden_group(analysis):
    return next(g for g in analysis.groups if any(m.slot[0] == "matmul_out2" for m in g.members))


def test_hidden_size_is_frozen_unless_asked_for():
    model = transformer_block()
    hidden = _hidden_group(onnxprune.analyze(model))
    assert any("prune_hidden=True" in r for r in hidden.frozen), hidden.frozen
    assert not _hidden_group(onnxprune.analyze(model, prune_hidden=True)).frozen
    kept = onnxprune.prune(model, ratio=0.5)
    assert [g for g in kept.plan.groups if g.key == hidden.key] == []


def test_prune_hidden_shrinks_the_residual_stream():
    model = transformer_block()
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    norms = [n for n in result.model.graph.node if n.op_type == "LayerNormalization"]
    inits = {t.name: t for t in result.model.graph.initializer}
    assert all(list(inits[n.input[1]].dims) == [HIDDEN // 2] for n in norms)
    x = np.random.default_rng(0).standard_normal((2, S, 8)).astype(np.float32)
    assert session(result.model).run(None, {"x": x})[0].shape == (2, S, 3)


def test_cli_forwards_head_ratio_and_prune_hidden(tmp_path):
    from onnxprune.cli import main

    source, out, plan = tmp_path / "block.onnx", tmp_path / "out.onnx", tmp_path / "plan.json"
    onnx.save(transformer_block(), source)
    assert main(["prune", str(source), "-o", str(out), "--ratio", "0", "--head-ratio", "0.5",
                 "--prune-hidden", "--save-plan", str(plan)]) == 0
    removed = {g["size"]: len(g["remove"]) for g in json.loads(plan.read_text())["groups"]}
    assert removed == {HEADS: HEADS // 2, HIDDEN: 0}
