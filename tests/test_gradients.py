"""taylor and fisher computed by the tool: channel scores against finite differences, the planted
channel they must find, and the prune/CLI paths (onnxprune.train.gradients)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.errors import InputError

torch = pytest.importorskip("torch")

from onnxprune.train.gradients import gradient_scores  # noqa: E402

HIDDEN = 4


def mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, output: str = "logits") -> onnx.ModelProto:
    """x[B,3] -> Gemm -> Relu -> Gemm -> output[B,C]; the hidden units form the one prunable group."""
    named = ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in named]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], [output], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", w2.shape[0]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def random_mlp(seed: int = 0, classes: int = 3, output: str = "logits"):
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((HIDDEN, 3)), rng.standard_normal(HIDDEN) * 0.5,
               rng.standard_normal((classes, HIDDEN)), rng.standard_normal(classes) * 0.1)
    weights = tuple(w.astype(np.float32).astype(np.float64) for w in weights)
    return mlp(*weights, output=output), weights


def forward(weights, x, scale_unit: int | None = None, s: float = 1.0) -> np.ndarray:
    """float64 reference; every weight of hidden unit `scale_unit` multiplied by `s` (the channel mask
    derivative at s = 1 is Σ w·∂L/∂w over the channel's coupled weights)."""
    w1, b1, w2, b2 = (w.copy() for w in weights)
    if scale_unit is not None:
        w1[scale_unit] *= s
        b1[scale_unit] *= s
        w2[:, scale_unit] *= s
    return np.maximum(x @ w1.T + b1, 0) @ w2.T + b2


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(labels)), labels]


def mask_derivatives(weights, x, labels, eps: float = 1e-6) -> np.ndarray:
    """[samples, units] central finite differences of each sample's cross-entropy."""
    return np.stack([(cross_entropy(forward(weights, x, u, 1 + eps), labels)
                      - cross_entropy(forward(weights, x, u, 1 - eps), labels)) / (2 * eps)
                     for u in range(HIDDEN)], axis=1)


def scores(model, data, kind, **options) -> np.ndarray:
    analysis = onnxprune.analyze(model)
    (group,) = analysis.prunable
    return gradient_scores(model, analysis, data, kind=kind, quiet=True, **options).scores[group.key]


@pytest.fixture
def tiny():
    model, weights = random_mlp()
    x = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 3, 10)
    return model, weights, x, labels


def test_scores_equal_finite_differences_with_labels(tiny):
    model, weights, x, labels = tiny
    d = mask_derivatives(weights, x.astype(np.float64), labels)
    data = {"x": x, "label": labels}
    np.testing.assert_allclose(scores(model, data, "taylor"), np.abs(d.mean(0)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores(model, data, "fisher"), (d ** 2).mean(0), rtol=1e-4, atol=1e-7)


def test_a_saturated_softmax_output_is_scored_through_its_input(tiny):
    """A Keras-style probabilities output: the cross-entropy of the softmax input is exact where the
    softmax saturates (the clamped log of 0 would give those samples no gradient)."""
    _, weights, x, labels = tiny
    weights = (weights[0], weights[1], weights[2] * 30, weights[3])  # logits far apart: saturated
    model = mlp(*weights, output="z")
    model.graph.node.append(helper.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=-1))
    model.graph.output[0].name = "probs"
    logits = forward(weights, x.astype(np.float64))
    assert (cross_entropy(logits, labels) > 28).any()  # probabilities below float32's reach
    d = mask_derivatives(weights, x.astype(np.float64), labels)
    data = {"x": x, "label": labels}
    np.testing.assert_allclose(scores(model, data, "fisher"), (d ** 2).mean(0), rtol=1e-4, atol=1e-7)


def test_taylor_without_labels_uses_the_predicted_class(tiny):
    model, weights, x, _ = tiny
    predicted = forward(weights, x.astype(np.float64)).argmax(1)
    d = mask_derivatives(weights, x.astype(np.float64), predicted)
    np.testing.assert_allclose(scores(model, {"x": x}, "taylor"), np.abs(d.mean(0)), rtol=1e-4, atol=1e-7)


def test_fisher_without_labels_samples_classes_and_is_seeded(tiny):
    model, weights, x, _ = tiny
    a, b = scores(model, {"x": x}, "fisher", seed=3), scores(model, {"x": x}, "fisher", seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.count_nonzero(a) >= 3  # unit 0 is never active on these inputs
    # averaged over many sampled labels, the Monte-Carlo Fisher approaches the exact one:
    # Σ_y p(y) (∂ log p(y)/∂m)² per sample, here from finite differences for every class
    xs = x.astype(np.float64)
    logits = forward(weights, xs)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    exact = sum(p[:, [y]] * mask_derivatives(weights, xs, np.full(len(x), y)) ** 2 for y in range(3)).mean(0)
    many = np.mean([scores(model, {"x": np.tile(x, (10, 1))}, "fisher", seed=s) for s in range(4)], axis=0)
    np.testing.assert_allclose(many, exact, rtol=0.3)  # Monte-Carlo: 400 draws per sample


def test_embedding_outputs_get_a_signal_that_is_not_zero():
    model, weights = random_mlp(classes=5, output="embedding")
    x = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    xs, eps = x.astype(np.float64), 1e-6
    change = [(forward(weights, xs, u, 1 + eps) - forward(weights, xs, u, 1 - eps)) / (2 * eps) for u in range(HIDDEN)]
    # fisher: per sample, the output projected on seeded N(0, 1) noise (drawn in sample order), whose
    # expected squared mask derivative is the squared first-order change of the output itself
    generator = torch.Generator().manual_seed(7)
    noise = np.concatenate([torch.randn((1, 5), generator=generator, dtype=torch.float64).numpy() for _ in x])
    expected = np.array([((noise * c).sum(1) ** 2).mean() for c in change])
    assert np.count_nonzero(expected) >= 3
    np.testing.assert_allclose(scores(model, {"x": x}, "fisher", seed=7), expected, rtol=1e-4, atol=1e-9)
    # taylor: output energy ½||y||², per sample, averaged
    energy = [(forward(weights, xs) * c).sum() / len(x) for c in change]
    np.testing.assert_allclose(scores(model, {"x": x}, "taylor"), np.abs(energy), rtol=1e-4)


def planted():
    """Unit 0 has the largest weights into it but almost none out of it: its removal changes the
    output least, which magnitude criteria miss."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((HIDDEN, 3)) * 0.5
    w1[0] *= 8.0
    b1 = np.abs(rng.standard_normal(HIDDEN)) * 0.5
    w2 = rng.standard_normal((3, HIDDEN))
    w2[:, 0] *= 0.02
    b2 = np.zeros(3)
    weights = tuple(w.astype(np.float32).astype(np.float64) for w in (w1, b1, w2, b2))
    return mlp(*weights), weights


@pytest.mark.parametrize("kind", ["taylor", "fisher"])
def test_gradient_criteria_remove_the_channel_whose_removal_hurts_least(kind):
    model, weights = planted()
    x = np.random.default_rng(6).standard_normal((64, 3)).astype(np.float32)
    labels = forward(weights, x.astype(np.float64)).argmax(1)
    base = cross_entropy(forward(weights, x), labels).mean()
    hurt = [cross_entropy(forward(weights, x, u, 0.0), labels).mean() - base for u in range(HIDDEN)]
    assert int(np.argmin(hurt)) == 0
    data = {"x": x, "label": labels}
    for criterion, expected in ((kind, 0), ("l1", None)):
        result = onnxprune.prune(model, ratio=0.25, criterion=criterion, data=data, recover="none")
        (group,) = result.plan.groups
        if expected is None:
            assert group.remove != [0]  # magnitude is fooled: the test can tell criteria apart
        else:
            assert group.remove == [expected]
            onnx.checker.check_model(result.model, full_check=True)
            assert any(kind in note for note in result.report.notes)


def test_fisher_refuses_a_gradients_file(tiny, tmp_path):
    model, _, x, _ = tiny
    np.savez(tmp_path / "g.npz", w1=np.ones((HIDDEN, 3)))
    with pytest.raises(InputError, match="per-sample"):
        onnxprune.prune(model, criterion="fisher", data={"x": x}, gradients=tmp_path / "g.npz")


def test_fisher_without_data_names_what_to_give(tiny):
    with pytest.raises(InputError, match="--data"):
        onnxprune.prune(tiny[0], criterion="fisher")


def test_taylor_with_a_gradients_file_still_reads_the_file(tiny, tmp_path):
    model, weights, x, _ = tiny
    grads = {"w1": np.zeros((HIDDEN, 3)), "b1": np.zeros(HIDDEN), "w2": np.zeros((3, HIDDEN))}
    grads["b1"][2] = -1.0  # only unit 2 has a gradient: every other unit scores 0 and goes first
    np.savez(tmp_path / "g.npz", **grads)
    result = onnxprune.prune(model, ratio=0.75, criterion="taylor", data={"x": x}, gradients=tmp_path / "g.npz",
                             recover="none")
    assert result.plan.groups[0].remove == [0, 1, 3]


def test_without_torch_one_line_names_the_train_extra(tiny, tmp_path):
    model, _, x, _ = tiny
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x)
    code = ("import sys; sys.modules['torch'] = None; from onnxprune.cli import main; "
            f"sys.exit(main(['prune', {str(tmp_path / 'm.onnx')!r}, '-o', {str(tmp_path / 'o.onnx')!r}, "
            f"'--criterion', 'fisher', '--data', {str(tmp_path / 'd.npz')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "onnxprune[train]" in run.stderr, run.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_api_taylor_on_the_digits_cnn_uses_its_labels():
    from onnxprune.demo import demo_files

    model_path, _, calib_path = demo_files()
    result = onnxprune.prune(model_path, criterion="taylor", data=calib_path, target_macs=0.5, recover="none",
                             quiet=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.after.macs <= 0.5 * result.report.before.macs
    notes = result.report.notes
    assert any("taylor scores computed from 256 samples" in n and "true labels 'label'" in n for n in notes)


@pytest.mark.parametrize("kind", ["taylor", "fisher"])
def test_gradient_criteria_score_both_directions_of_a_bidirectional_layer(kind):
    """Paired (direction, unit) slots: the scores cover each direction's own units."""
    from onnxprune.verify import random_inputs, session
    from test_recurrent import recurrent_model

    model = recurrent_model("GRU", "bidirectional")
    data = random_inputs(model, 0)
    result = onnxprune.prune(model, criterion=kind, data=data, ratio=0.5, recover="none", round_to=1, quiet=True)
    onnx.checker.check_model(result.model, full_check=True)
    gru = next(n for n in result.model.graph.node if n.op_type == "GRU")
    before = next(n for n in model.graph.node if n.op_type == "GRU")
    size = lambda node: next(a.i for a in node.attribute if a.name == "hidden_size")  # noqa: E731
    assert size(gru) == size(before) // 2
    shapes = [o.shape for o in session(result.model).run(None, data)]
    assert shapes == [o.shape for o in session(model).run(None, data)]
