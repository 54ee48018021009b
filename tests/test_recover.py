"""Recovery without retraining: bias compensation (data-driven and data-free) and least squares."""

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder
from calib_models import conv_chain, dense_chain, first_node, plan_removing
from onnxprune.passes.recover import rectified_mean
from onnxprune.verify import session


def _data(model: onnx.ModelProto, n: int = 24, seed: int = 1) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    dims = [d.dim_value or n for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def _outputs(model, feeds):
    return session(model).run(None, feeds)[0]


def _assert_same(original, pruned, feeds, atol=1e-5):
    onnx.checker.check_model(pruned, full_check=True)
    a, b = _outputs(original, feeds), _outputs(pruned, feeds)
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol)


CASES = [
    ("conv", lambda: conv_chain(), "Conv"),
    ("grouped-consumer", lambda: conv_chain(consumer_group=2, constant=(0, 4)), "Conv"),
    ("depthwise-between", lambda: conv_chain(depthwise=True), "Conv"),
    ("gemm", lambda: dense_chain("Gemm"), "Gemm"),
    ("matmul", lambda: dense_chain("MatMul"), "MatMul"),
]


@pytest.mark.parametrize("name,build,producer_op", CASES, ids=[c[0] for c in CASES])
def test_bias_compensation_is_exact_for_constant_channels(name, build, producer_op):
    model = build()
    feeds = _data(model)
    removed = (0, 4) if name == "grouped-consumer" else ((0, 2) if producer_op != "Conv" else (0, 1))
    plan = plan_removing(model, first_node(model, producer_op), removed)
    plain = onnxprune.prune(model, plan=plan, recover="none").model
    recovered = onnxprune.prune(model, plan=plan, data=feeds, recover="bias").model
    assert not np.allclose(_outputs(plain, feeds), _outputs(model, feeds), atol=1e-3)  # removal does matter
    _assert_same(model, recovered, feeds)


def test_bias_is_the_default_recovery_when_data_is_given():
    model = dense_chain("Gemm")
    feeds = _data(model)
    plan = plan_removing(model, first_node(model, "Gemm"), (0, 2))
    _assert_same(model, onnxprune.prune(model, plan=plan, data=feeds).model, feeds)


def _bn_model(gamma_zero=(1, 3)) -> onnx.ModelProto:
    b = GraphBuilder(3)
    x = b.input(["N", 2, 5, 5])
    h = b.conv(x, 2, 6, k=1, pad=0)
    gamma = (b.rng.random(6) + 0.5).astype(np.float32)
    gamma[list(gamma_zero)] = 0
    beta = b.rng.standard_normal(6).astype(np.float32)
    beta[list(gamma_zero)] = [0.7, -0.4][: len(gamma_zero)] if len(gamma_zero) == 2 else 0.5
    stats = [b.const(gamma, "g"), b.const(beta, "be"), b.const(np.zeros(6, np.float32), "m"),
             b.const(np.ones(6, np.float32), "v")]
    h = b.op("Relu", [b.op("BatchNormalization", [h] + stats)])
    b.op("Conv", [h, b.weight([3, 6, 3, 3])], kernel_shape=[3, 3])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_data_free_bias_from_batchnorm_is_exact_for_constant_channels():
    model = _bn_model()
    feeds = _data(model)
    plan = plan_removing(model, first_node(model, "Conv"), (1, 3))
    result = onnxprune.prune(model, plan=plan, recover="bias")
    assert any("data-free" in n for n in result.report.notes)
    _assert_same(model, result.model, feeds)


def test_rectified_gaussian_mean_matches_sampling():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([-1.0, 0.0, 0.8]), np.array([0.5, 1.0, 2.0])
    sampled = np.maximum(rng.standard_normal((400_000, 3)) * sigma + mu, 0).mean(0)
    np.testing.assert_allclose(rectified_mean(mu, sigma), sampled, atol=6e-3)
    np.testing.assert_allclose(rectified_mean(np.array([0.3, -0.3]), np.zeros(2)), [0.3, 0.0])


def _linear_dependent(kind: str) -> onnx.ModelProto:
    """Producer channel 3 = 2·ch0 - ch1 and channel 5 = ch2 + 0.5 (conv: 0.5·ch6), no activation between."""
    b = GraphBuilder(5)
    rng = b.rng
    if kind == "conv":
        x = b.input(["N", 3, 6, 6])
        w = rng.standard_normal((8, 3, 1, 1)).astype(np.float32)
    elif kind == "gemm":
        x = b.input(["N", 6])
        w = rng.standard_normal((8, 6)).astype(np.float32)
    else:
        x = b.input(["N", 5, 6])
        w = rng.standard_normal((8, 6)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    w[3], bias[3] = 2 * w[0] - w[1], 2 * bias[0] - bias[1]
    if kind == "conv":  # a grouped consumer re-fits within each input group; zero padding would
        w[5], bias[5] = 0.5 * w[6], 0.5 * bias[6]  # break a constant offset at the borders
    else:
        w[5], bias[5] = w[2], bias[2] + 0.5
    if kind == "conv":
        h = b.op("Conv", [x, b.const(w, "w"), b.const(bias, "b")], kernel_shape=[1, 1])
        b.op("Conv", [h, b.weight([4, 4, 3, 3])], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    elif kind == "gemm":
        h = b.op("Gemm", [x, b.const(w, "w"), b.const(bias, "b")], transB=1)
        b.op("Gemm", [h, b.weight([5, 8]), b.weight([5])], transB=1, alpha=0.5)
    else:
        h = b.op("Add", [b.op("MatMul", [x, b.const(w.T.copy(), "w")]), b.const(bias, "b")])
        b.op("MatMul", [h, b.weight([8, 5])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_lstsq_recovers_channels_that_are_linear_combinations(kind):
    model = _linear_dependent(kind)
    feeds = _data(model, n=40)
    producer = first_node(model, {"conv": "Conv", "gemm": "Gemm", "matmul": "MatMul"}[kind])
    # conv: the grouped consumer prunes its groups alike, so channel 1 (= 2·ch0 - ch3) goes with 5
    removed = (1, 5) if kind == "conv" else (3, 5)
    plan = plan_removing(model, producer, removed)
    fitted = onnxprune.prune(model, plan=plan, data=feeds, recover="lstsq")
    assert any("least-squares" in n for n in fitted.report.notes)
    plain = onnxprune.prune(model, plan=plan, recover="none").model
    ref = _outputs(model, feeds)
    scale = float(np.abs(ref).max())
    assert np.abs(_outputs(plain, feeds) - ref).max() > 1e-2 * scale
    np.testing.assert_allclose(_outputs(fitted.model, feeds), ref, atol=1e-3 * scale)
    onnx.checker.check_model(fitted.model, full_check=True)


def test_lstsq_on_the_digits_demo_beats_no_recovery():
    from onnxprune.demo import accuracy, demo_files

    model, test, calib = demo_files()
    with np.load(test) as t:
        images, labels = t["image"][:200], t["label"][:200]
    plain = onnxprune.prune(model, target_macs=0.5, recover="none").model
    fitted = onnxprune.prune(model, target_macs=0.5, data=calib, recover="lstsq").model
    original = onnxprune.ir.load_model(model)
    base = accuracy(original, images, labels)
    assert accuracy(fitted, images, labels) >= base - 0.02
    assert accuracy(fitted, images, labels) > accuracy(plain, images, labels) + 0.1


def test_lstsq_without_data_is_a_clear_error():
    with pytest.raises(onnxprune.errors.InputError, match="lstsq"):
        onnxprune.prune(dense_chain("Gemm"), recover="lstsq")


def test_sequential_refit_is_exact_on_linear_combinations_and_needs_data():
    model = _linear_dependent("gemm")
    feeds = _data(model, n=40)
    plan = plan_removing(model, first_node(model, "Gemm"), (3, 5))
    fitted = onnxprune.prune(model, plan=plan, data=feeds, recover="lstsq-seq")
    assert any("sequential" in n for n in fitted.report.notes)
    ref = _outputs(model, feeds)
    np.testing.assert_allclose(_outputs(fitted.model, feeds), ref, atol=1e-3 * float(np.abs(ref).max()))
    onnx.checker.check_model(fitted.model, full_check=True)
    stats = onnxprune.passes.stats.collect(model, onnxprune.analyze(model), feeds, quiet=True)
    with pytest.raises(onnxprune.errors.InputError, match="give --data"):
        onnxprune.prune(model, plan=plan, stats=stats, recover="lstsq-seq")


def test_padded_conv_consumer_gets_the_position_averaged_bias():
    """A constant channel read by a zero-padded 3x3 Conv: border taps read zeros, so no single bias is
    exact, but the compensated output must be right on average over positions."""
    b = GraphBuilder(4)
    x = b.input(["N", 3, 5, 5])
    w = (b.rng.standard_normal((6, 3, 1, 1))).astype(np.float32)
    w[2] = 0
    h = b.op("Relu", [b.op("Conv", [x, b.const(w, "w"), b.const(np.full(6, 0.8, np.float32), "b")],
                           kernel_shape=[1, 1])])
    b.op("Conv", [h, b.weight([4, 6, 3, 3])], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    feeds = _data(model)
    plan = plan_removing(model, first_node(model, "Conv"), (2,))
    result = onnxprune.prune(model, plan=plan, data=feeds, recover="bias")
    assert any("approximate" in n for n in result.report.notes)
    diff = (_outputs(result.model, feeds) - _outputs(model, feeds)).astype(np.float64)
    np.testing.assert_allclose(diff.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    assert np.abs(diff).max() > 1e-3  # yet not exact at each position
