"""Iterative schedules (`prune --steps N`, onnxprune.train.schedule): rounds, final size, report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.demo import demo_files
from onnxprune.errors import InputError
from onnxprune.train.schedule import kept_fractions

from builders import small_cnn


def test_kept_fractions_share_the_target_equally():
    assert kept_fractions(4, 0.7) == pytest.approx([0.825, 0.65, 0.475, 0.3])


def test_four_steps_land_on_the_one_shot_macs_target_and_record_rounds():
    model_path, test_path, calib_path = demo_files()
    one = onnxprune.prune(model_path, target_macs=0.3, criterion="activation", data=calib_path, quiet=True)
    four = onnxprune.prune(model_path, target_macs=0.3, criterion="activation", data=calib_path, quiet=True,
                           steps=4, eval_data=test_path)
    one_ratio = one.report.after.macs / one.report.before.macs
    four_ratio = four.report.after.macs / four.report.before.macs
    assert abs(four_ratio - one_ratio) <= 0.02 and four_ratio <= 0.3 + 1e-9
    rounds = four.report.rounds
    assert [r["step"] for r in rounds] == [1, 2, 3, 4]
    macs = [r["macs_ratio"] for r in rounds]
    assert macs == sorted(macs, reverse=True) and macs[0] < 0.9
    np.testing.assert_allclose(macs, kept_fractions(4, 0.7), atol=0.02)
    assert rounds[-1]["macs"] == four.report.after.macs
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["agreement"] is not None for r in rounds)
    assert four.report.before.macs == one.report.before.macs  # the report compares with the original
    onnx.checker.check_model(four.model, full_check=True)
    assert four.report.to_dict()["rounds"] == rounds


def test_ratio_steps_on_a_tiny_model_keep_about_the_one_shot_channels():
    model = small_cnn()
    one = onnxprune.prune(model, ratio=0.5, round_to=1)
    three = onnxprune.prune(model, ratio=0.5, steps=3, round_to=1)
    assert len(three.report.rounds) == 3
    # each round rounds its share down per group: groups of 4-8 channels may keep one more per round
    slack = 0.1 * one.report.before.params
    assert one.report.after.params <= three.report.after.params <= one.report.after.params + slack
    params = [r["params"] for r in three.report.rounds]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    assert all(r["cosine"] is None for r in three.report.rounds)  # no data: nothing to compare on


def test_steps_refuse_options_they_would_ignore():
    model = small_cnn()
    for options in (dict(lossless=True, ratio=0.0), dict(target_latency=0.5), dict(steps=0)):
        with pytest.raises(InputError):
            onnxprune.prune(model, **{"steps": 3, **options})


def test_cli_steps_write_rounds_into_the_json_report_and_table(tmp_path, capsys):
    model_path, _, calib_path = demo_files()
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code = main(["prune", str(model_path), "-o", str(out), "--target-macs", "0.5", "--steps", "2",
                 "--data", str(calib_path), "--criterion", "fisher", "--report", str(report), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round" in printed and "fisher scores computed" in printed
    rounds = json.loads(report.read_text())["rounds"]
    assert len(rounds) == 2 and rounds[-1]["macs_ratio"] <= 0.5 + 1e-9


def test_steps_pass_quantization_choices_to_the_final_hand_off():
    model_path, _, calib_path = demo_files()
    result = onnxprune.prune(model_path, ratio=0.5, steps=2, data=calib_path, quantize="static",
                             quant_format="qoperator", per_channel=False, quiet=True)
    assert result.report.quantization.to_dict()["quant_format"] == "qoperator"
    ops = {n.op_type for n in result.quantized.graph.node}
    assert "QLinearConv" in ops and "QuantizeLinear" in ops
