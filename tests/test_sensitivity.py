"""Sensitivity analysis (table, JSON, plot) and `--plan auto` on the shipped digits model."""

import json
import sys

import numpy as np
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.demo import accuracy, demo_files
from onnxprune.ir import load_model
from onnxprune.sensitivity import sensitivity
from onnxprune.verify import session


@pytest.fixture(scope="module")
def digits():
    return demo_files()


def test_sensitivity_command_writes_table_json_and_plot(digits, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, test, _ = digits
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["sensitivity", str(model), "--data", str(test), "--samples", "120", "--ratios", "0.3", "0.7",
                 "--json", str(js), "--plot", str(png), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "most sensitive first" in out and "acc@0.3" in out and "baseline accuracy" in out
    data = json.loads(js.read_text())
    groups = data["groups"]
    assert len(groups) == len(onnxprune.analyze(model).prunable) == 4
    assert data["samples"] == 120 and 0.9 < data["baseline_accuracy"] <= 1.0
    for g in groups:
        assert g["ratios"] == [0.3, 0.7] and len(g["error"]) == 2 and len(g["accuracy"]) == 2
        assert g["error"][1] >= g["error"][0] >= 0
    assert all(g["error"][1] > 0 for g in groups)
    mids = [g["error"][0] for g in groups]
    assert mids == sorted(mids, reverse=True)  # ranked, most sensitive first
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_note_without_matplotlib(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when not installed
    model, test, _ = digits
    png = tmp_path / "s.png"
    assert main(["sensitivity", str(model), "--data", str(test), "--samples", "32", "--ratios", "0.5",
                 "--plot", str(png), "--quiet"]) == 0
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not png.exists()


def test_measured_error_is_the_relative_output_error(digits):
    model, test, _ = digits
    result = sensitivity(model, test, ratios=(0.5,), samples=64, quiet=True)
    group = result.groups[0]
    removed = np.argsort(onnxprune.importance.score_groups(onnxprune.analyze(model), "l1")[0], kind="stable")[:16]
    plan = onnxprune.plan.Plan([onnxprune.plan.GroupPlan(group.key, group.channels, sorted(removed.tolist()))])
    pruned = onnxprune.prune(model, plan=plan, recover="none").model
    with np.load(test) as t:
        x = t["image"][:64]
    ref = session(load_model(model)).run(None, {"image": x})[0].astype(np.float64)
    out = session(pruned).run(None, {"image": x})[0].astype(np.float64)
    np.testing.assert_allclose(group.error[0], np.linalg.norm(out - ref) / np.linalg.norm(ref), rtol=1e-6)


def test_auto_plan_meets_the_target_and_beats_uniform_l1(digits):
    model, test, calib = digits
    with np.load(test) as t:
        images, labels = t["image"], t["label"]
    auto = onnxprune.prune(model, plan="auto", target_macs=0.5, data=calib, recover="none")
    uniform = onnxprune.prune(model, target_macs=0.5, recover="none")
    report = auto.report
    assert abs(report.after.macs / report.before.macs - 0.5) <= 0.02
    assert len({len(g.remove) / g.size for g in auto.plan.groups}) > 1  # non-uniform ratios
    assert accuracy(auto.model, images, labels) > accuracy(uniform.model, images, labels) + 0.1
