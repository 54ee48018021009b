"""Hidden-size pruning beyond LayerNorm (issue 4): RMSNorm (decomposed and the opset-23 op),
embedding lookups and tied embedding / LM-head weights, on tiny onnx.helper graphs run in ORT.

Each pruned model must pass the full checker and run with the original output shapes; where the
removal is lossy (a norm over the hidden axis) its outputs are compared with a NumPy model of the
same network restricted to the kept channels, and where it is exact (a dead embedding column with
no norm after it) with the original outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto, numpy_helper

import onnxprune
from onnxprune.heads import hidden_groups
from onnxprune.verify import session

S, H, V, DEAD = 5, 8, 12, 3


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _named(inits: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """The initializer GraphBuilder named `prefix<k>`."""
    (value,) = [a for name, a in inits.items() if name[len(prefix):].isdigit() and name.startswith(prefix)]
    return value


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return session(model).run(None, feeds)[0]


def _rms_norm(b: GraphBuilder, h: str, form: str, gamma: str) -> str:
    """x · rsqrt(mean(x²) + eps) · γ as torch exports it: Pow or x·x, Sqrt then Reciprocal (dynamo)
    or Div (TorchScript), the statistics in float32 between Casts ("cast")."""
    x = b.op("Cast", [h], to=TensorProto.FLOAT) if "cast" in form else h
    square = b.op("Mul", [x, x]) if "mul" in form else b.op("Pow", [x, b.const(np.array(2.0, np.float32))])
    if b.opset >= 18:
        mean = b.op("ReduceMean", [square, b.const(np.array([-1], np.int64))], keepdims=1)
    else:
        mean = b.op("ReduceMean", [square], axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [mean, b.const(np.array(1e-6, np.float32))])])
    if "div" in form:
        normed = b.op("Div", [x, std])
    else:
        normed = b.op("Mul", [x, b.op("Reciprocal", [std])])
    if "cast" in form:
        normed = b.op("Cast", [normed], to=TensorProto.FLOAT)
    return b.op("Mul", [normed, gamma])


def rms_model(form: str, opset: int = 17, dead: bool = False) -> onnx.ModelProto:
    """ids → embedding lookup [V, H] → RMSNorm → MatMul [H, 3] → y."""
    b = GraphBuilder(seed=3, opset=opset)
    ids = b.input([2, S], "ids", TensorProto.INT64)
    table = (b.rng.standard_normal((V, H))).astype(np.float32)
    if dead:
        table[:, DEAD] = 0.0
    e = b.op("Gather", [b.const(table, "table"), ids], axis=0)
    gamma = b.const((b.rng.random(H) + 0.5).astype(np.float32), "gamma")
    if form == "op":
        normed = b.op("RMSNormalization", [e, gamma], axis=-1, epsilon=1e-6)
    else:
        normed = _rms_norm(b, e, form, gamma)
    b.op("MatMul", [normed, b.weight([H, 3])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model(check=False)
    if opset >= 23:
        model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


FORMS = [pytest.param("pow", 17, id="pow-reciprocal"), pytest.param("mul-div", 17, id="mul-div"),
         pytest.param("pow-cast", 18, id="cast-opset18"), pytest.param("op", 23, id="RMSNormalization")]


def _ids(seed: int = 0) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, V, (2, S)).astype(np.int64)}


def _stream(analysis):
    groups = hidden_groups(analysis)
    assert len(groups) == 1, analysis.summary()
    return groups[0]


def assert_stream_frozen_unless_asked(model: onnx.ModelProto, lossy_reason: str) -> None:
    """The stream is frozen as the hidden size by default and prunes, lossy only, when asked."""
    frozen = _stream(onnxprune.analyze(model))
    assert any("prune_hidden=True" in r for r in frozen.frozen), frozen.frozen
    stream = _stream(onnxprune.analyze(model, prune_hidden=True))
    assert stream.prunable and stream.size == H, stream.frozen
    assert any(lossy_reason in r for r in stream.lossy_only), stream.lossy_only


def halve_stream(model: onnx.ModelProto):
    """Prune half of the stream; (result, kept units, initializers before, initializers after)."""
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    kept = np.setdiff1d(np.arange(H), entry.remove)
    assert len(kept) == H // 2
    return result, kept, _inits(model), _inits(result.model)


@pytest.mark.parametrize("form, opset", FORMS)
def test_rms_norm_stream_is_hidden_and_lossy(form, opset):
    assert_stream_frozen_unless_asked(rms_model(form, opset), "RMS")


@pytest.mark.parametrize("form, opset", FORMS)
def test_rms_norm_prunes_hidden_like_a_smaller_norm(form, opset):
    model = rms_model(form, opset)
    result, kept, before, after = halve_stream(model)
    gamma = next(name for name, a in before.items() if a.shape == (H,))
    assert after["table1"].shape == (V, H // 2) and after[gamma].shape == (H // 2,)
    weight = next(a for a in after.values() if a.shape == (H // 2, 3))
    # The pruned network is the same network over the kept channels: statistics over H/2 values.
    feeds = _ids()
    e = before["table1"][feeds["ids"]][..., kept].astype(np.float64)
    normed = e / np.sqrt(np.mean(e * e, axis=-1, keepdims=True) + 1e-6) * before[gamma][kept]
    np.testing.assert_allclose(weight, next(a for a in before.values() if a.shape == (H, 3))[kept])
    out = _run(result.model, feeds)
    assert out.shape == _run(model, feeds).shape
    np.testing.assert_allclose(out, normed @ weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form, opset", FORMS[:1] + FORMS[-1:])
def test_rms_norm_freezes_in_lossless_mode_even_for_a_dead_column(form, opset):
    model = rms_model(form, opset, dead=True)
    result = onnxprune.prune(model, lossless=True, prune_hidden=True)
    assert result.report.channels_removed == 0
    reasons = [r for g in result.report.analysis["groups_frozen"] for r in g["reasons"]]
    assert any("RMS" in r and "lossy mode only" in r for r in reasons), reasons
    np.testing.assert_array_equal(_run(result.model, _ids()), _run(model, _ids()))


def test_without_prune_hidden_the_stream_keeps_its_size():
    model = rms_model("pow")
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 0
    assert _inits(result.model)["table1"].shape == (V, H)
    np.testing.assert_array_equal(_run(result.model, _ids()), _run(model, _ids()))


def embedding_model(dead: bool = True) -> onnx.ModelProto:
    """Token + position lookups added into the stream, read by a MatMul + bias: no norm anywhere.
    Channel DEAD has zero embedding columns and zero reading weights when `dead`."""
    b = GraphBuilder(seed=4)
    ids = b.input([2, S], "ids", TensorProto.INT64)
    pos = b.input([2, S], "pos", TensorProto.INT64)
    tok, pe, w = (b.rng.standard_normal(shape).astype(np.float32) for shape in ((V, H), (S, H), (H, 3)))
    if dead:
        tok[:, DEAD] = pe[:, DEAD] = w[DEAD] = 0.0
    e = b.op("Add", [b.op("Gather", [b.const(tok, "tok"), ids]), b.op("Gather", [b.const(pe, "pos"), pos])])
    b.op("Add", [b.op("MatMul", [e, b.const(w, "w")]), b.weight([3], "b")])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def _lm_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, V, (2, S)).astype(np.int64), "pos": np.tile(np.arange(S), (2, 1)).astype(np.int64)}


def test_dead_embedding_column_is_removed_exactly():
    model = embedding_model()
    result = onnxprune.prune(model, lossless=True, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.channels_removed == 1
    after = _inits(result.model)
    assert [_named(after, p).shape for p in ("tok", "pos", "w")] == [(V, H - 1), (S, H - 1), (H - 1, 3)]
    for seed in range(3):
        np.testing.assert_array_equal(_run(result.model, _lm_feeds(seed)), _run(model, _lm_feeds(seed)))


def test_dead_embedding_column_stays_without_prune_hidden():
    model = embedding_model()
    for options in (dict(lossless=True), dict(ratio=0.5)):
        result = onnxprune.prune(model, **options)
        assert result.report.channels_removed == 0
        assert _named(_inits(result.model), "tok").shape == (V, H)


def test_embedding_columns_prune_with_their_lookups():
    model = embedding_model(dead=False)
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    kept = np.setdiff1d(np.arange(H), entry.remove)
    before, feeds = _inits(model), _lm_feeds()
    e = _named(before, "tok")[feeds["ids"]] + _named(before, "pos")[feeds["pos"]]
    expected = e[..., kept] @ _named(before, "w")[kept] + _named(before, "b")
    np.testing.assert_allclose(_run(result.model, feeds), expected, rtol=1e-5, atol=1e-5)


TIED_V = 1100
"""Vocabulary of the tied-weight graphs: the table (1100 × 64) is larger than the constants that
get one private copy per reader (`onnxprune.passes.canonical.SMALL_CONSTANT`), so it stays shared."""
TIED_H = 64


def tied_model(head: str, dead: float | None = 0.0) -> onnx.ModelProto:
    """ids → lookup in `emb` [V, H] → LM head on the same initializer → logits [..., V].
    head: "gemm" (ids [N], Gemm transB=1 reading the table as W[V, H]), "transpose" (ids [B, S],
    MatMul by Transpose(emb)), or "square" (a [H, H] table also used as a MatMul weight, whose
    rows are the hidden axis there: the two uses disagree). Column DEAD holds `dead` everywhere."""
    b = GraphBuilder(seed=6)
    ids = b.input([2, 7] if head == "transpose" else [7], "ids", TensorProto.INT64)
    rows = 257 if head == "square" else TIED_V
    cols = rows if head == "square" else TIED_H
    table = (b.rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    if dead is not None:
        table[:, DEAD] = dead
    emb = b.const(table, "emb")
    e = b.op("Gather", [emb, ids], axis=0)
    if head == "gemm":
        b.op("Gemm", [e, emb], transB=1)
    elif head == "transpose":
        b.op("MatMul", [e, b.op("Transpose", [emb], perm=[1, 0])])
    else:
        b.op("MatMul", [e, emb])
    b.nodes[-1].output[0] = "logits"
    b.output("logits")
    return b.model()


def _tied_feeds(vocab: int, seed: int = 0, shape=(7,)) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)}


def test_tied_table_shrinks_once_for_both_uses():
    model = tied_model("gemm")
    result = onnxprune.prune(model, lossless=True, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    tables = [a for a in _inits(result.model).values() if a.size > 1000]
    assert [t.shape for t in tables] == [(TIED_V, TIED_H - 1)]  # one initializer, still shared
    assert {n.input[0] for n in result.model.graph.node if n.op_type == "Gather"} == \
           {n.input[1] for n in result.model.graph.node if n.op_type == "Gemm"}
    for seed in range(3):
        feeds = _tied_feeds(TIED_V, seed)
        np.testing.assert_array_equal(_run(result.model, feeds), _run(model, feeds))


def test_tied_table_prunes_hidden_at_a_ratio():
    model = tied_model("gemm", dead=None)
    result = onnxprune.prune(model, ratio=0.25, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    kept = np.setdiff1d(np.arange(TIED_H), entry.remove)
    (table,) = [a for a in _inits(result.model).values() if a.size > 1000]
    np.testing.assert_array_equal(table, _inits(model)["emb1"][:, kept])
    feeds = _tied_feeds(TIED_V)
    np.testing.assert_allclose(_run(result.model, feeds), table[feeds["ids"]] @ table.T, rtol=1e-5, atol=1e-6)


def test_tied_table_whose_uses_disagree_is_frozen_with_a_reason():
    model = tied_model("square")
    analysis = onnxprune.analyze(model, prune_hidden=True)
    (group,) = [g for g in analysis.groups if any(m.slot == ("emb1", 1) for m in g.members)]
    assert any(m.slot == ("emb1", 0) for m in group.members)  # rows (MatMul) and columns (lookup) tied
    assert any("Gather" in r and "run time" in r for r in group.frozen), group.frozen
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    assert result.report.channels_removed == 0


def test_tied_table_through_a_transpose_node_shrinks_once():
    """MatMul(x, Transpose(emb)) with x [B, S, H]: the table is too large to be folded into a second
    transposed copy, so the MatMul reads its weight through the Transpose. A constant column (0.5
    for every token) is removed exactly: its share of the logits moves into a bias."""
    model = tied_model("transpose", dead=0.5)
    result = onnxprune.prune(model, lossless=True, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.channels_removed == 1
    tables = [a for a in _inits(result.model).values() if a.ndim == 2]
    assert [t.shape for t in tables] == [(TIED_V, TIED_H - 1)]
    assert sum(n.op_type == "Add" for n in result.model.graph.node) == 1  # the folded bias
    for seed in range(3):
        feeds = _tied_feeds(TIED_V, seed, (2, 7))
        np.testing.assert_allclose(_run(result.model, feeds), _run(model, feeds), rtol=1e-6, atol=1e-6)
    lossy = onnxprune.prune(tied_model("transpose", dead=None), ratio=0.25, prune_hidden=True)
    onnx.checker.check_model(lossy.model, full_check=True)
    (table,) = [a for a in _inits(lossy.model).values() if a.size > 1000]
    feeds = _tied_feeds(TIED_V, 0, (2, 7))
    np.testing.assert_allclose(_run(lossy.model, feeds), table[feeds["ids"]] @ table.T, rtol=1e-5, atol=1e-6)


def shape_read_model() -> onnx.ModelProto:
    """GPT-2's final `h.view(-1, S, e.size(-1))`: a Reshape of h whose target reads the hidden size
    from another tensor (the embedding output e) at run time; h is e plus a residual branch."""
    b = GraphBuilder(seed=8)
    ids = b.input([2, S], "ids", TensorProto.INT64)
    e = b.op("Gather", [b.weight([V, H], "table"), ids], axis=0)
    h = b.op("Add", [e, b.op("MatMul", [e, b.weight([H, H], "wh")])])
    size = b.op("Slice", [b.op("Shape", [e]), b.const(np.array([-1], np.int64)), b.const(np.array([99], np.int64))])
    target = b.op("Concat", [b.const(np.array([-1, S], np.int64)), size], axis=0)
    b.op("MatMul", [b.op("Reshape", [h, target]), b.weight([H, 3], "wy")])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_hidden_size_read_at_run_time_from_another_tensor_ties_both():
    model = shape_read_model()
    (stream,) = hidden_groups(onnxprune.analyze(model, prune_hidden=True))
    slots = {m.slot for m in stream.members}
    assert stream.prunable and {("table1", 1), ("wh4", 1)} <= slots, (stream.frozen, slots)
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    kept = np.setdiff1d(np.arange(H), entry.remove)
    before, feeds = _inits(model), _ids()
    e = before["table1"][feeds["ids"]][..., kept]
    expected = (e + e @ before["wh4"][np.ix_(kept, kept)]) @ _named(before, "wy")[kept]
    np.testing.assert_allclose(_run(result.model, feeds), expected, rtol=1e-5, atol=1e-5)


def test_wanda_scores_a_tied_head_through_its_transpose():
    """Wanda weighs each hidden unit by the LM head's weights, here the table behind Transpose: the
    16 columns scaled down 1000x are the ones a 25 % cut removes."""
    model = tied_model("transpose", dead=None)
    table = next(t for t in model.graph.initializer if t.name == "emb1")
    values = numpy_helper.to_array(table).copy()
    values[:, :16] *= 1e-3
    table.CopyFrom(numpy_helper.from_array(values, "emb1"))
    data = [_tied_feeds(TIED_V, seed, (2, 7)) for seed in range(3)]
    result = onnxprune.prune(model, ratio=0.25, prune_hidden=True, data=data, criterion="wanda", quiet=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    assert list(entry.remove) == list(range(16))
