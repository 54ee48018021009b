"""Hidden-size pruning through a LayerNorm written out as primitive ops (issue 4), as the torch
legacy exporter (opset < 17) and tf2onnx (Keras) emit it: mean = ReduceMean(x, last axis),
d = x - mean, var = mean(d²), d / sqrt(var + eps) · γ + β, with or without Casts.

Like LayerNormalization, the stream stays frozen unless prune_hidden=True, freezes again under
lossless=True, and when pruned its statistics average over the kept channels: the pruned model is
compared with a NumPy LayerNorm over those channels. A mean over the channel axis that is not
subtracted from its own input (a different tensor, a pooled feature) still freezes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto

import onnxprune
from onnxprune.verify import session
from test_hidden import DEAD, H, S, V, _ids, _inits, _named, assert_stream_frozen_unless_asked, halve_stream

EPS = 1e-5


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def _mean(b: GraphBuilder, x: str, op: str = "ReduceMean") -> str:
    """Mean over the last axis, kept as a size-1 dim: axes attribute before opset 18, input since;
    "GlobalAveragePool" is the rank-3 form tf2onnx writes for it."""
    if op == "GlobalAveragePool":
        return b.op("GlobalAveragePool", [x])
    if b.opset >= 18:
        return b.op("ReduceMean", [x, b.const(np.array([-1], np.int64))], keepdims=1)
    return b.op("ReduceMean", [x], axes=[-1], keepdims=1)


def _cast(b: GraphBuilder, x: str) -> str:
    return b.op("Cast", [x], to=TensorProto.FLOAT)


def _layer_norm(b: GraphBuilder, h: str, form: str, gamma: str, beta: str) -> str:
    """LayerNorm as primitive ops. "pow-div": torch legacy (Pow, Sqrt, Div); "mul-reciprocal":
    d·d and Mul by Reciprocal; "cast": statistics in float32 between Casts, the mean cast too and
    subtracted from a second Cast of the input; "tf2onnx": Keras' x·s + ((-mean)·s + β) with
    s = γ / sqrt(var + eps) and GlobalAveragePool means."""
    if form == "tf2onnx":
        mean = _mean(b, h, "GlobalAveragePool")
        d = b.op("Sub", [h, mean])
        var = _mean(b, b.op("Mul", [d, d]), "GlobalAveragePool")
        std = b.op("Sqrt", [b.op("Add", [var, b.const(np.array(EPS, np.float32))])])
        scale = b.op("Mul", [b.op("Reciprocal", [std]), gamma])
        shifted = b.op("Add", [b.op("Mul", [b.op("Neg", [mean]), scale]), beta])
        return b.op("Add", [b.op("Mul", [h, scale]), shifted])
    x = _cast(b, h) if form == "cast" else h
    mean = _mean(b, x)
    if form == "cast":
        mean, x = _cast(b, mean), _cast(b, h)
    d = b.op("Sub", [x, mean])
    square = b.op("Mul", [d, d]) if form == "mul-reciprocal" else b.op("Pow", [d, b.const(np.array(2.0, np.float32))])
    std = b.op("Sqrt", [b.op("Add", [_mean(b, square), b.const(np.array(EPS, np.float32))])])
    normed = b.op("Mul", [d, b.op("Reciprocal", [std])]) if form == "mul-reciprocal" else b.op("Div", [d, std])
    if form == "cast":
        normed = _cast(b, normed)
    return b.op("Add", [b.op("Mul", [normed, gamma]), beta])


def ln_model(form: str, opset: int, dead: bool = False) -> onnx.ModelProto:
    """ids → embedding lookup [V, H] → decomposed LayerNorm → MatMul [H, 3] → y."""
    b = GraphBuilder(seed=5, opset=opset)
    ids = b.input([2, S], "ids", TensorProto.INT64)
    table = (b.rng.standard_normal((V, H)) * 2 + 1).astype(np.float32)
    if dead:
        table[:, DEAD] = 0.0
    e = b.op("Gather", [b.const(table, "table"), ids], axis=0)
    gamma = b.const((b.rng.random(H) + 0.5).astype(np.float32), "gamma")
    beta = b.const(b.rng.standard_normal(H).astype(np.float32), "beta")
    b.op("MatMul", [_layer_norm(b, e, form, gamma, beta), b.weight([H, 3], "proj")])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model(check=False)
    onnx.checker.check_model(model, full_check=True)
    return model


FORMS = [pytest.param("pow-div", 13, id="torch-opset13"), pytest.param("pow-div", 18, id="torch-opset18"),
         pytest.param("mul-reciprocal", 13, id="mul-reciprocal"), pytest.param("cast", 13, id="cast-opset13"),
         pytest.param("cast", 18, id="cast-opset18"), pytest.param("tf2onnx", 13, id="tf2onnx-form")]


def _layer_norm_np(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = EPS) -> np.ndarray:
    x = x.astype(np.float64)
    d = x - x.mean(axis=-1, keepdims=True)
    return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps) * gamma + beta


def _frozen_reasons(result) -> list[str]:
    return [r for g in result.report.analysis["groups_frozen"] for r in g["reasons"]]


@pytest.mark.parametrize("form, opset", FORMS)
def test_decomposed_layer_norm_stream_is_frozen_unless_asked(form, opset):
    model = ln_model(form, opset)
    assert_stream_frozen_unless_asked(model, "LayerNorm written out")
    assert onnxprune.prune(model, ratio=0.5).report.channels_removed == 0


@pytest.mark.parametrize("form, opset", FORMS)
def test_decomposed_layer_norm_prunes_like_a_smaller_layer_norm(form, opset):
    model = ln_model(form, opset)
    result, kept, before, after = halve_stream(model)
    assert after["table1"].shape == (V, H // 2)
    assert _named(after, "gamma").shape == _named(after, "beta").shape == (H // 2,)
    np.testing.assert_array_equal(_named(after, "proj"), _named(before, "proj")[kept])
    # The pruned network is a LayerNorm over the kept channels: statistics over H/2 values.
    feeds = _ids()
    x = before["table1"][feeds["ids"]][..., kept]
    expected = _layer_norm_np(x, _named(before, "gamma")[kept], _named(before, "beta")[kept]) @ _named(after, "proj")
    (out,), (original,) = _run(result.model, feeds), _run(model, feeds)
    assert out.shape == original.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(out, original, atol=1e-3)  # lossy indeed: the statistics changed


@pytest.mark.parametrize("form, opset", [FORMS[0], FORMS[4], FORMS[5]])
def test_decomposed_layer_norm_freezes_in_lossless_mode_even_for_a_dead_column(form, opset):
    model = ln_model(form, opset, dead=True)
    result = onnxprune.prune(model, lossless=True, prune_hidden=True)
    assert result.report.channels_removed == 0
    reasons = _frozen_reasons(result)
    assert any("LayerNorm written out" in r and "lossy mode only" in r for r in reasons), reasons
    np.testing.assert_array_equal(_run(result.model, _ids())[0], _run(model, _ids())[0])


def misused_mean_model(kind: str) -> onnx.ModelProto:
    """A LayerNorm-like graph whose mean over the channel axis is not (only) a norm statistic:
    "other-tensor": subtracted from a different tensor (a second lookup) than the one averaged;
    "pooled": also written out as a pooled feature; "pooled-only": only a pooled feature."""
    b = GraphBuilder(seed=7, opset=13)
    ids = b.input([2, S], "ids", TensorProto.INT64)
    e = b.op("Gather", [b.const(b.rng.standard_normal((V, H)).astype(np.float32), "table"), ids], axis=0)
    mean = _mean(b, e)
    if kind == "other-tensor":
        other = b.op("Gather", [b.const(b.rng.standard_normal((V, H)).astype(np.float32), "other"), ids], axis=0)
        d = b.op("Sub", [other, mean])
    else:
        d = e if kind == "pooled-only" else b.op("Sub", [e, mean])
    std = b.op("Sqrt", [b.op("Add", [_mean(b, b.op("Mul", [d, d])), b.const(np.array(EPS, np.float32))])])
    b.op("MatMul", [b.op("Div", [d, std]), b.weight([H, 3], "proj")])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    if kind.startswith("pooled"):
        b.op("Mul", [mean, b.const(np.array(2.0, np.float32))])
        b.nodes[-1].output[0] = "pooled"
        b.output("pooled")
    model = b.model(check=False)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind", ["other-tensor", "pooled", "pooled-only"])
def test_a_channel_mean_that_is_not_a_layer_norm_statistic_still_freezes(kind):
    model = misused_mean_model(kind)
    analysis = onnxprune.analyze(model, prune_hidden=True)
    table = [g for g in analysis.groups if any(m.slot == ("table1", 1) for m in g.members)]
    assert table and all(not g.prunable for g in table), analysis.summary()
    reasons = [r for g in table for r in g.frozen]
    assert any("ReduceMean" in r and "reduces over the channel axis" in r for r in reasons), reasons
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert _inits(result.model)["table1"].shape == (V, H)
    for out, original in zip(_run(result.model, _ids()), _run(model, _ids())):
        assert out.shape == original.shape
        if kind != "other-tensor":  # there the second lookup's stream (an RMS-like norm) may prune
            np.testing.assert_array_equal(out, original)


@pytest.mark.zoo
def test_torch_legacy_export_of_layer_norm_at_opset_14_prunes_hidden(tmp_path):
    """nn.LayerNorm through the TorchScript exporter at opset 14 (no LayerNormalization op yet)."""
    torch = pytest.importorskip("torch")
    import contextlib
    import io
    import warnings

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.norm, self.head = torch.nn.Embedding(V, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.norm(self.emb(ids)))

    torch.manual_seed(0)
    module = Tiny().eval()
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.normal_()
    path = tmp_path / "ln14.onnx"
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, S, dtype=torch.long),), str(path), dynamo=False, opset_version=14,
                          input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "b", 1: "s"}})
    model = onnx.load(path)
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" not in ops and {"ReduceMean", "Sub", "Pow", "Sqrt", "Div"} <= ops
    assert onnxprune.prune(model, ratio=0.5).report.channels_removed == 0
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    kept = np.setdiff1d(np.arange(16), entry.remove)
    assert _inits(result.model)["emb.weight"].shape == (V, 8)
    for shape in ((2, S), (3, 7)):
        ids = np.random.default_rng(1).integers(0, V, shape).astype(np.int64)
        (out,), (original,) = _run(result.model, {"ids": ids}), _run(model, {"ids": ids})
        assert out.shape == original.shape
        p = {k: t.detach().numpy() for k, t in module.state_dict().items()}
        expected = (_layer_norm_np(p["emb.weight"][ids][..., kept], p["norm.weight"][kept], p["norm.bias"][kept])
                    @ p["head.weight"][:, kept].T + p["head.bias"])
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.keras
@pytest.mark.parametrize("path_kind", ["tf2onnx", "keras"])
def test_keras_layer_norm_exported_with_tf2onnx_prunes_hidden(tmp_path, path_kind):
    """Keras LayerNormalization after an Embedding, exported at opset 17 by tf2onnx (directly or
    through Keras' own export): GlobalAveragePool means and x·s + ((-mean)·s + β)."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    from keras_export import export

    keras.utils.set_random_seed(0)
    inputs = keras.Input((S,))
    embedding = keras.layers.Embedding(V, 16)
    norm = keras.layers.LayerNormalization(gamma_initializer="random_uniform", beta_initializer="random_normal")
    dense = keras.layers.Dense(3)
    net = keras.Model(inputs, dense(norm(embedding(inputs))))
    model = onnx.load(export(net, (S,), tmp_path / "ln.onnx", path_kind))
    assert "LayerNormalization" not in {n.op_type for n in model.graph.node}
    assert onnxprune.prune(model, ratio=0.5).report.channels_removed == 0
    result = onnxprune.prune(model, ratio=0.5, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    (entry,) = [g for g in result.plan.groups if g.remove]
    kept = np.setdiff1d(np.arange(16), entry.remove)
    assert [a.shape for a in _inits(result.model).values() if a.ndim == 2 and a.shape[0] == V] == [(V, 8)]
    table, gamma, beta = (np.asarray(w) for w in (embedding.embeddings, norm.gamma, norm.beta))
    kernel, bias = (np.asarray(w) for w in dense.weights)
    for batch in (2, 3):
        ids = np.random.default_rng(batch).integers(0, V, (batch, S)).astype(np.float32)
        feeds = {session(model).get_inputs()[0].name: ids}
        (out,), (original,) = _run(result.model, feeds), _run(model, feeds)
        assert out.shape == original.shape == (batch, S, 3)
        x = table[ids.astype(np.int64)][..., kept]
        expected = _layer_norm_np(x, gamma[kept], beta[kept], norm.epsilon) @ kernel[kept] + bias
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
