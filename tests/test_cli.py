"""The command line: every exit code, one-line errors, atomic outputs, plans and reports."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from builders import small_cnn
from cli_helpers import run


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(), path)
    return path


def test_prune_writes_model_report_and_plan(model_path, tmp_path, capsys):
    out, report, plan = tmp_path / "p.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    code, stdout, _ = run(["prune", model_path, "-o", out, "--bench", "--report", report,
                           "--save-plan", plan], capsys)
    assert code == 0, stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "groups_total", "groups_pruned",
                "groups_frozen"):
        assert key in data
    assert data["params_after"] < data["params_before"]
    assert json.loads(plan.read_text())["format"] == "onnxprune-plan"
    assert data["latency_ms"]["before"]["median"] > 0 and data["latency_ms"]["after"]["median"] > 0
    assert all("reasons" in g for g in data["groups_frozen"])
    assert "params" in stdout and "MACs" in stdout


def test_plan_replay_gives_identical_model(model_path, tmp_path, capsys):
    a, b, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    assert run(["prune", model_path, "-o", a, "--criterion", "random", "--seed", "3", "--save-plan", plan], capsys)[0] == 0
    assert run(["prune", model_path, "-o", b, "--plan", plan], capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_lossless_verify_passes(model_path, tmp_path, capsys):
    code, out, _ = run(["prune", model_path, "-o", tmp_path / "l.onnx", "--lossless", "--verify"], capsys)
    assert code == 0 and "PASSED" in out


def test_failed_verification_exits_1_and_writes_nothing(model_path, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    code, _, err = run(["prune", model_path, "-o", out, "--ratio", "0.75", "--verify", "--atol", "1e-9",
                        "--rtol", "0"], capsys)
    assert code == 1
    assert not out.exists()
    assert len(err.strip().splitlines()) == 1


def test_failed_verification_still_writes_the_report(model_path, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, _, _ = run(["prune", model_path, "-o", tmp_path / "p.onnx", "--verify", "--report", report], capsys)
    assert code == 1
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] is False and data["verify"]["max_abs_diff"] > 0


def test_verify_command(model_path, tmp_path, capsys):
    assert run(["verify", model_path, model_path], capsys)[0] == 0
    pruned = tmp_path / "p.onnx"
    run(["prune", model_path, "-o", pruned, "--ratio", "0.75"], capsys)
    code, out, err = run(["verify", model_path, pruned, "--atol", "1e-9", "--rtol", "0"], capsys)
    assert code == 1 and "would pass with atol" in out


def test_verify_with_npz_data(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32))
    assert run(["verify", model_path, model_path, "--data", data], capsys)[0] == 0
    np.savez(data, wrong=np.zeros(3))
    code, _, err = run(["verify", model_path, model_path, "--data", data], capsys)
    assert code == 2 and "no data for model input" in err


@pytest.mark.parametrize("args,needle", [
    (["prune", "missing.onnx", "-o", "x.onnx"], "no such file"),
    (["prune", "{model}", "-o", "{model}"], "overwrite the input"),
    (["prune", "{model}", "-o", "{tmp}/no/dir/out.onnx"], "does not exist"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--ratio", "1.5"], "ratio"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--criterion", "nope"], "unknown criterion"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--plan", "{tmp}/missing.json"], "cannot read plan"),
    (["prune", "{model}"], "usage"),
    (["frobnicate"], "usage"),
    (["analyze", "{tmp}"], "is a directory"),
    (["analyze", "{tmp}/garbage.onnx"], "not a readable ONNX model"),
])
def test_bad_input_exits_2_with_one_line(args, needle, model_path, tmp_path, capsys):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07not a model at all" * 10)
    args = [a.format(model=model_path, tmp=tmp_path) for a in args]
    before = model_path.read_bytes()
    code, _, err = run(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert model_path.read_bytes() == before


def test_analyze_prints_groups_and_json(model_path, tmp_path, capsys):
    js = tmp_path / "a.json"
    code, out, _ = run(["analyze", model_path, "--json", js], capsys)
    assert code == 0 and "prunable" in out
    data = json.loads(js.read_text())
    assert data["groups_total"] == len(data["groups"]) and data["groups_prunable"] >= 1


def test_exclude_protects_a_layer(model_path, tmp_path, capsys):
    code, out, _ = run(["analyze", model_path, "--exclude", "Conv*"], capsys)
    assert code == 0 and "excluded by user" in out


def test_console_script_demo_runs():
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "MACs" in proc.stdout
