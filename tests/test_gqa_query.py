"""`gqa="query"`: grouped-query attention pruned by query position within each KV group.

The unit is position j of every KV group (query head k*REP + j for every KV head k): K/V
projections stay whole, every group keeps the same number of query heads, and the repeat count
shrinks (the Expand/Tile entry and the merge Reshape target, constant or computed at run time).
Tiny graphs built with onnx.helper (builders shared with test_gqa_shapes.py), run in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from builders import GraphBuilder
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.heads import group_kind
from onnxprune.verify import session
from reference import assert_matches_masked
from test_gqa_shapes import DIM, HEADS, HIDDEN, KV, REP, S, _feeds, _i64, _project, _score_heads, gqa

VARIANTS = {"run-time expand": dict(), "tile": dict(tile=True), "constant": dict(constant=True),
            "merge read as KV + KV": dict(merge="add")}
"""`merge="add"` spells the merged head count as an arithmetic the shape evaluator does not follow;
its value is static, so the import pins it to a constant (passes/batch_shapes.py) and it prunes."""


def _repeat_constant(b: GraphBuilder, k: str) -> str:
    """[B, KV, S, D] -> [B, KV*REP, S, D] with constant Expand and merge Reshape targets (dynamo's form)."""
    expanded = b.op("Expand", [b.op("Unsqueeze", [k, b.const(_i64(2))]), b.const(_i64(1, KV, REP, S, DIM))])
    return b.op("Reshape", [expanded, b.const(_i64(0, KV * REP, S, DIM))])


def gqa_constant() -> onnx.ModelProto:
    """The model of `test_gqa_shapes.gqa` with every target a constant, dynamic batch."""
    b = GraphBuilder(seed=5)
    x = b.input(["B", S, HIDDEN])
    q, k, v = (_project(b, x, h, b.const(_i64(0, S, -1, DIM))) for h in (HEADS, KV, KV))
    k, v = _repeat_constant(b, k), _repeat_constant(b, v)
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          b.const(np.array(DIM ** -0.5, np.float32))])
    context = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [context, b.const(_i64(0, S, -1))])
    b.op("MatMul", [merged, b.weight([HEADS * DIM, HIDDEN])])
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=["B", S, HIDDEN])
    return b.model()


def _model(variant: dict) -> onnx.ModelProto:
    return gqa_constant() if variant.get("constant") else gqa(**variant)


def _weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """Q, K, V projection weights and the output projection, in graph order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _query_heads(model: onnx.ModelProto) -> list:
    analysis = onnxprune.analyze(model, gqa="query")
    return [g for g in analysis.groups if group_kind(analysis, g) == "heads"], analysis


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_unit_is_a_query_position_and_kv_heads_freeze(variant):
    heads, analysis = _query_heads(_model(variant))
    prunable = [g for g in heads if g.prunable]  # the KV heads are head groups too, frozen
    assert [g.size for g in prunable] == [REP] and len(heads) > 1
    query = next(m for m in prunable[0].members if m.role == "weight" and len(m.elem) == HEADS * DIM)
    assert np.array_equal(query.unit[np.argsort(query.elem)], np.repeat(np.arange(HEADS) % REP, DIM))
    reasons = [r for g in analysis.groups for r in g.frozen]
    assert any("gqa='query' keeps KV heads whole" in r for r in reasons), reasons


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_query_mode_removes_the_same_position_in_every_group(variant):
    model = _model(variant)
    result = onnxprune.prune(model, ratio=0.5, gqa="query")
    (removed,) = [g.remove for g in result.plan.groups if g.remove]
    assert len(removed) == 1
    assert_matches_masked(model, result, gqa="query")
    q, k, v, wo = _weights(model)
    q2, k2, v2, wo2 = _weights(result.model)
    kept = [h for h in range(HEADS) if h % REP != removed[0]]  # position j of every KV group goes
    columns = np.concatenate([np.arange(h * DIM, (h + 1) * DIM) for h in kept])
    np.testing.assert_array_equal(q2, q[:, columns])
    np.testing.assert_array_equal(wo2, wo[columns])
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)
    assert (_score_heads(model), _score_heads(result.model)) == (HEADS, HEADS - KV)
    for batch in (1, 3):
        assert session(result.model).run(None, _feeds(batch))[0].shape == (batch, S, HIDDEN)


def test_query_mode_output_equals_the_narrower_model_in_numpy():
    """Independent reference: attention with REP - 1 query heads per KV head, written in NumPy."""
    model = gqa()
    result = onnxprune.prune(model, ratio=0.5, gqa="query")
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    mats = [n for n in result.model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    biases = [inits[next(i for i in n.input if i in inits)] for n in result.model.graph.node
              if n.op_type == "Add" and any(i in inits for i in n.input)]
    q_w, k_w, v_w, wo = (inits[n.input[1]] for n in mats)
    x = _feeds(2)["x"]
    heads = q_w.shape[1] // DIM
    split = lambda t, n: t.reshape(2, S, n, DIM).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(x @ q_w + biases[0], heads), split(x @ k_w + biases[1], KV), split(x @ v_w + biases[2], KV)
    rep = heads // KV
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) * DIM ** -0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v).transpose(0, 2, 1, 3).reshape(2, S, heads * DIM) @ wo
    assert heads == KV * (REP - 1)
    np.testing.assert_allclose(session(result.model).run(None, _feeds(2))[0], expected, rtol=1e-4, atol=1e-5)


def test_kv_mode_stays_the_default():
    result = onnxprune.prune(gqa(), ratio=0.5)
    assert _score_heads(result.model) == HEADS - REP


def test_lossless_in_query_mode_is_exact():
    """A dead KV group (its Q, K, V zero) cannot be a query position: lossless keeps the outputs."""
    model = gqa(dead_kv=1)
    result = onnxprune.prune(model, lossless=True, gqa="query")
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (1, 3):
        np.testing.assert_allclose(session(result.model).run(None, _feeds(batch))[0],
                                   session(model).run(None, _feeds(batch))[0], rtol=1e-5, atol=1e-6)


def test_gqa_option_is_checked_and_reaches_the_cli(tmp_path, capsys):
    with pytest.raises(InputError, match="gqa must be one of"):
        onnxprune.prune(gqa(), gqa="heads")
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(gqa(), path)
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--gqa", "query"]) == 0
    pruned = onnx.load(out)
    assert _score_heads(pruned) == HEADS - KV
    assert [w.shape for w in _weights(pruned)[1:3]] == [w.shape for w in _weights(gqa())[1:3]]


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def llama(request, tmp_path_factory):
    """The tiny Llama of test_zoo_gqa.py (4 query heads on 2 KV heads per layer), both exporters."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformer_models import export_transformer

    return export_transformer("llama", request.param, tmp_path_factory.mktemp("gqaq") / f"{request.param}.onnx")[0]


@pytest.mark.zoo
def test_llama_query_mode_halves_query_heads_per_kv_group(llama):
    from test_zoo_gqa import DIM as LDIM, HEADS as LHEADS, KV as LKV, LAYERS, _run, _running_heads, _widths
    from transformer_models import HIDDEN as LHIDDEN, example_inputs

    result = onnxprune.prune(llama, ratio=0.5, gqa="query")
    onnx.checker.check_model(result.model, full_check=True)
    assert _running_heads(result.model) == [LHEADS // 2] * 2 * LAYERS  # LKV groups of REP/2 query heads
    before, after = _widths(llama), _widths(result.model)
    kv_layers = [n for n, w in before.items() if w == LKV * LDIM]
    q_layers = [n for n, w in before.items() if w == LHEADS * LDIM and after.get(n) == LHEADS // 2 * LDIM]
    assert len(kv_layers) == 2 * LAYERS and all(after[n] == LKV * LDIM for n in kv_layers)
    assert len(q_layers) == LAYERS and all(after[n] == LHEADS // 2 * LDIM for n in q_layers)
    for batch, seq in ((1, 5), (3, 11)):
        feeds = example_inputs("llama", batch, seq, seed=batch)
        assert [o.shape for o in _run(result.model, feeds)] == [(batch, seq, LHIDDEN)]
