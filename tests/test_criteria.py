"""Criteria through one protocol: group -> one score per channel, checked against numpy."""

import textwrap

import numpy as np
import onnx
import pytest

import onnxprune
from calib_models import dense_chain
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.importance import score_groups
from onnxprune.passes.stats import collect


@pytest.fixture(scope="module")
def model():
    return dense_chain("Gemm", constant=())


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(3).standard_normal((32, 6)).astype(np.float32)}


def _hidden_group(analysis):
    return next(g for g in analysis.prunable if g.size == 8)


def _weights(model):
    return {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def test_taylor_is_the_first_order_term_of_every_parameter(model, tmp_path):
    analysis = onnxprune.analyze(model)
    w = _weights(model)
    rng = np.random.default_rng(0)
    grads = {name: rng.standard_normal(v.shape) for name, v in w.items()}
    np.savez(tmp_path / "g.npz", **grads)
    gemm1, gemm2 = [n for n in model.graph.node if n.op_type == "Gemm"]
    w1, b1, w2 = gemm1.input[1], gemm1.input[2], gemm2.input[1]
    expected = np.abs((w[w1] * grads[w1]).sum(0) + w[b1] * grads[b1] + (w[w2] * grads[w2]).sum(1))
    result = onnxprune.prune(model, criterion="taylor", gradients=tmp_path / "g.npz", ratio=0.25)
    got = score_groups(analysis, "taylor", gradients={k: v for k, v in grads.items()})[_hidden_group(analysis).id]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    removed = next(g.remove for g in result.plan.groups if g.size == 8)
    assert removed == sorted(np.argsort(expected, kind="stable")[:2].tolist())


def test_wanda_and_fpgm_equal_numpy(model, feeds):
    analysis = onnxprune.analyze(model)
    stats = collect(model, analysis, feeds, quiet=True)
    w = _weights(model)
    gemm1, gemm2 = [n for n in model.graph.node if n.op_type == "Gemm"]
    hidden = session_value(model, gemm2.input[0], feeds)
    rms = np.sqrt((hidden ** 2).mean(0))
    wanda = np.abs(w[gemm2.input[1]]).sum(1) * rms
    group = _hidden_group(analysis)
    np.testing.assert_allclose(score_groups(analysis, "wanda", stats=stats)[group.id], wanda / wanda.mean(), rtol=1e-9)
    filters = w[gemm1.input[1]].T  # one row per hidden channel
    dist = np.sqrt(((filters[:, None] - filters[None]) ** 2).sum(-1)).sum(1)
    np.testing.assert_allclose(score_groups(analysis, "fpgm")[group.id], dist / dist.mean(), rtol=1e-6)


def session_value(model, name, feeds):
    from onnxprune.passes.stats import expose_outputs
    from onnxprune.verify import session

    return session(expose_outputs(model, [name])).run([name], feeds)[0].astype(np.float64)


def test_data_criteria_without_data_are_a_clear_error(model):
    for name in ("activation", "apoz", "wanda"):
        with pytest.raises(InputError, match="needs calibration data"):
            onnxprune.prune(model, criterion=name)
    with pytest.raises(InputError, match="gradients"):
        onnxprune.prune(model, criterion="taylor")


def test_custom_criterion_callable_and_module_function(model, tmp_path, monkeypatch, capsys):
    def prefer_high_index(group, ctx):  # keeps the last channels, removes the first ones
        return np.arange(group.size, dtype=float)

    result = onnxprune.prune(model, criterion=prefer_high_index, ratio=0.5)
    assert next(g.remove for g in result.plan.groups if g.size == 8) == [0, 1, 2, 3]
    (tmp_path / "my_scores.py").write_text(textwrap.dedent("""
        import numpy as np

        def reverse(group, ctx):
            return -np.arange(group.size, dtype=float)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    path, out, plan = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "plan.json"
    onnx.save(model, path)
    assert main(["prune", str(path), "-o", str(out), "--criterion", "my_scores:reverse", "--ratio", "0.5",
                 "--save-plan", str(plan)]) == 0
    removed = next(g.remove for g in onnxprune.plan.Plan.load(plan).groups if g.size == 8)
    assert removed == [4, 5, 6, 7]


def test_every_named_criterion_prunes_a_model_that_checks(model, feeds, tmp_path):
    np.savez(tmp_path / "g.npz", **{k: np.ones_like(v) for k, v in _weights(model).items()})
    for name in onnxprune.importance.CRITERIA:  # fisher needs per-sample gradients: tests/test_gradients.py
        if name == "fisher":
            continue
        result = onnxprune.prune(model, criterion=name, data=feeds, gradients=tmp_path / "g.npz", recover="none")
        onnx.checker.check_model(result.model, full_check=True)
        assert result.report.channels_removed == 4, name
