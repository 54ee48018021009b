"""MACs / parameter targets by global ranking, per-group caps, and the cost model behind them."""

import json

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, small_cnn
from onnxprune.cli import main
from onnxprune.cost import CostModel
from onnxprune.demo import demo_files
from onnxprune.errors import InputError


def _mlp() -> onnx.ModelProto:
    b = GraphBuilder(2)
    h = b.input(["N", 16])
    for k, n in ((16, 48), (48, 64)):
        h = b.op("Relu", [b.gemm(h, k, n)])
    b.gemm(h, 64, 10)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


@pytest.mark.parametrize("target", [0.8, 0.5, 0.3])
def test_target_macs_lands_within_two_points(target):
    for model in (_mlp(), demo_files()[0]):  # channels fine enough for a 2% step
        report = onnxprune.prune(model, target_macs=target).report
        assert abs(report.after.macs / report.before.macs - target) <= 0.02


def test_target_params_and_both_targets():
    model = demo_files()[0]
    report = onnxprune.prune(model, target_params=0.4).report
    assert abs(report.after.params / report.before.params - 0.4) <= 0.02
    report = onnxprune.prune(model, target_params=0.6, target_macs=0.4).report
    assert report.after.params / report.before.params <= 0.6 + 1e-9
    assert report.after.macs / report.before.macs <= 0.4 + 1e-9


def test_cost_model_predicts_the_rewritten_model():
    model = small_cnn()
    result = onnxprune.prune(model, ratio=0.4, scope="global")
    analysis = onnxprune.analyze(model)
    macs, params = CostModel(analysis).evaluate(result.plan.resolve(analysis))
    np.testing.assert_allclose(macs, result.report.after.macs / result.report.before.macs, rtol=1e-9)
    assert abs(params - result.report.after.params / result.report.before.params) < 0.01


def test_max_ratio_caps_every_group():
    result = onnxprune.prune(demo_files()[0], target_macs=0.3, max_ratio=0.6)
    for group in result.plan.groups:
        assert len(group.remove) <= 0.6 * group.size
    with pytest.raises(InputError, match="cannot be met"):
        onnxprune.prune(demo_files()[0], target_macs=0.05, max_ratio=0.5)
    with pytest.raises(InputError, match="fraction to keep"):
        onnxprune.prune(demo_files()[0], target_macs=1.5)


def test_target_flags_from_the_command_line(tmp_path, capsys):
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(demo_files()[0]), "-o", str(out), "--target-macs", "0.5", "--max-ratio", "0.8",
                 "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert abs(data["macs_after"] / data["macs_before"] - 0.5) <= 0.02
    onnx.checker.check_model(onnx.load(out), full_check=True)
