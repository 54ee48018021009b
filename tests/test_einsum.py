"""Einsum: equation parsing, dense `x·W` contractions, attention products, and what freezes.

Every model is built with onnx.helper, pruned, checked with the full checker and run in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from builders import GraphBuilder
from onnxprune.ops.einsum import einsum_labels
from onnxprune.verify import session
from reference import assert_matches_masked
from test_attention import HEADS, attention, head_groups

HIDDEN = 8


def test_parse_explicit_implicit_and_ellipsis():
    assert einsum_labels("B G H I D, B G H J D -> B G H I J", [5, 5], 5) == (
        [list("BGHID"), list("BGHJD")], list("BGHIJ"))
    assert einsum_labels("ij,jk", [2, 2], None) == ([["i", "j"], ["j", "k"]], ["i", "k"])
    # '...' aligns from the right, as broadcasting does: a rank-4 and a rank-3 operand share '...0'.
    inputs, output = einsum_labels("...ij,...jk->...ik", [4, 3], 4)
    assert inputs == [["...1", "...0", "i", "j"], ["...0", "j", "k"]]
    assert output == ["...1", "...0", "i", "k"]


@pytest.mark.parametrize("equation, ranks, out_rank, words", [
    ("ij,jk->ik", [2, 2, 2], 2, "does not match its 3 inputs"),
    ("i1,jk->ik", [2, 2], 2, "not letters"),
    ("...i...,ij->j", [3, 2], 1, "not letters"),
    ("ijk,jk->ik", [2, 2], 2, "does not match a rank-2"),
    ("ii,ij->j", [2, 2], 1, "repeats a label"),
    ("ij,jk->iz", [2, 2], 2, "malformed"),
    ("ij,jk->ii", [2, 2], 2, "malformed"),
])
def test_parse_rejects_what_it_does_not_understand(equation, ranks, out_rank, words):
    reason = einsum_labels(equation, ranks, out_rank)
    assert isinstance(reason, str) and words in reason, reason


def dense_mlp(equation: str = "bij,jk->bik", dead: bool = False, second: str | None = None) -> onnx.ModelProto:
    """x[2,3,4] → Einsum(W1[4,8]) + b1 → Relu → Einsum(W2[8,5]) → y. With `dead`, hidden channel 2
    is the constant relu(0.7) and channel 5 the constant 0 (zero weight column and bias)."""
    b = GraphBuilder(seed=5)
    x = b.input([2, 3, 4])
    w1 = (b.rng.standard_normal((4, HIDDEN)) * 0.5).astype(np.float32)
    b1 = b.rng.standard_normal(HIDDEN).astype(np.float32)
    if dead:
        w1[:, [2, 5]] = 0
        b1[[2, 5]] = [0.7, -1.0]
    h = b.op("Relu", [b.op("Add", [b.op("Einsum", [x, b.const(w1, "w")], equation=equation), b.const(b1, "b")])])
    b.op("Einsum", [h, b.weight([HIDDEN, 5])], equation=second or equation)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("equation", ["bij,jk->bik", "...j,jk->...k", "b i j , j k -> b i k"])
def test_dense_contraction_prunes_weight_columns_and_rows(equation):
    model = dense_mlp(equation)
    analysis = onnxprune.analyze(model)
    assert [g.size for g in analysis.prunable] == [HIDDEN], analysis.summary()
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == HIDDEN // 2
    shapes = sorted(a.shape for a in _inits(result.model).values())
    assert shapes == [(4,), (4, 4), (4, 5)]
    assert_matches_masked(model, result)


def test_lossless_folds_a_constant_contracted_channel_into_a_bias():
    model = dense_mlp(dead=True)
    result = onnxprune.prune(model, lossless=True)
    assert [g.remove for g in result.plan.groups if g.remove] == [[2, 5]]
    assert any(n.op_type == "Add" and "bias" in n.name for n in result.model.graph.node)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(session(result.model).run(None, {"x": x})[0],
                               session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_lossless_keeps_a_constant_channel_that_is_also_summed_over_another_axis():
    """'bij,jk->bk' sums x over i too: a constant input would count 3 times, not once, so it is no
    dense layer with a bias to fold into; lossless mode must leave the outputs exact."""
    model = dense_mlp(dead=True, second="bij,jk->bk")
    result = onnxprune.prune(model, lossless=True)
    assert all(2 not in g.remove for g in result.plan.groups)
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(session(result.model).run(None, {"x": x})[0],
                               session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    lossy = onnxprune.prune(model, ratio=0.5)
    assert lossy.report.channels_removed == HIDDEN // 2
    onnx.checker.check_model(lossy.model, full_check=True)


def _einsum_attention(score_eq: str, context_eq: str) -> onnx.ModelProto:
    """test_attention's block with both activation MatMuls replaced by Einsum (Kᵀ folded into the
    equation, as MaxViT writes it)."""
    model = attention()
    nodes = list(model.graph.node)
    by_output = {o: n for n in nodes for o in n.output}
    score, context = [n for n in nodes if n.op_type == "MatMul" and n.input[0] in by_output
                      and n.input[1] in by_output]
    k_transpose = by_output[score.input[1]]
    replaced = {score.name: helper.make_node("Einsum", [score.input[0], k_transpose.input[0]], list(score.output),
                                             name=score.name, equation=score_eq),
                context.name: helper.make_node("Einsum", list(context.input), list(context.output),
                                               name=context.name, equation=context_eq)}
    del model.graph.node[:]
    model.graph.node.extend(replaced.get(n.name, n) for n in nodes if n is not k_transpose)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("score_eq, context_eq", [
    ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
    ("B H I D, B H J D -> B H I J", "B H I J, B H J D -> B H I D"),
    ("...qd,...kd->...qk", "...qk,...kd->...qd"),
])
def test_batched_attention_einsum_prunes_heads_like_matmul(score_eq, context_eq):
    model = _einsum_attention(score_eq, context_eq)
    x = np.random.default_rng(1).standard_normal((2, 6, 16)).astype(np.float32)
    np.testing.assert_allclose(session(model).run(None, {"x": x})[0], session(attention()).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    (group,) = head_groups(model)
    assert group.size == HEADS
    result = onnxprune.prune(model, ratio=0.5)
    reference = onnxprune.prune(attention(), ratio=0.5)
    assert result.report.after.params == reference.report.after.params
    assert_matches_masked(model, result)
    np.testing.assert_allclose(session(result.model).run(None, {"x": x})[0],
                               session(reference.model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def scores(dead: bool = False) -> onnx.ModelProto:
    """Two projections of x contracted with each other over their HIDDEN features:
    y[b, i, k] = Σ_j (x W1)[b, i, j] (x W2)[b, k, j]. With `dead`, column 3 of W1 is zero."""
    b = GraphBuilder(seed=7)
    x = b.input([2, 3, 4])
    w1 = (b.rng.standard_normal((4, HIDDEN)) * 0.5).astype(np.float32)
    if dead:
        w1[:, 3] = 0
    h1 = b.op("Einsum", [x, b.const(w1, "w")], equation="bij,jk->bik")
    h2 = b.op("Einsum", [x, b.weight([4, HIDDEN])], equation="bij,jk->bik")
    b.op("Einsum", [h1, h2], equation="bij,bkj->bik")
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_contracted_label_between_activations_drops_the_same_terms():
    model = scores()
    result = onnxprune.prune(model, ratio=0.5)
    (group,) = [g for g in result.plan.groups if g.remove]
    onnx.checker.check_model(result.model, full_check=True)
    # Removing element j on both sides equals zeroing W1's column j: the j-th term of every sum.
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    w1 = masked.graph.initializer[0]
    value = numpy_helper.to_array(w1).copy()
    value[:, group.remove] = 0
    w1.CopyFrom(numpy_helper.from_array(value, w1.name))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(session(result.model).run(None, {"x": x})[0],
                               session(masked).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_contracted_label_between_activations_is_lossy_only():
    model = scores(dead=True)
    (group,) = onnxprune.analyze(model).prunable
    assert any("Einsum sums over this label" in r for r in group.lossy_only), group.lossy_only
    assert onnxprune.prune(model, lossless=True).report.channels_removed == 0


def test_diagonal_freezes_with_a_reason_and_the_model_still_runs():
    b = GraphBuilder(seed=2)
    x = b.input([2, HIDDEN, 4])
    h = b.op("Einsum", [x, b.weight([4, HIDDEN])], equation="bij,jk->bik")
    b.op("Einsum", [b.op("Relu", [h])], equation="bjj->bj")
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    analysis = onnxprune.analyze(model)
    reasons = [r for g in analysis.groups for r in g.frozen]
    assert any("repeats a label within one term" in r for r in reasons), reasons
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    x_val = np.random.default_rng(0).standard_normal((2, HIDDEN, 4)).astype(np.float32)
    np.testing.assert_array_equal(session(result.model).run(None, {"x": x_val})[0],
                                  session(model).run(None, {"x": x_val})[0])
