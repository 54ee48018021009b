"""Regression tests for the review's redundancy findings: one accuracy, one output comparison,
one atomic-write path, no process-wide state changed at run time, the CLI's quantized save."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import onnx
import onnxruntime
import pytest

from builders import small_cnn
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.ir import _UMASK, atomic_write_bytes, atomic_write_text
from onnxprune.verify import compare_outputs, random_inputs, session, top1_accuracy, top1_correct


def _leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_top1_accuracy_covers_every_layout_the_three_callers_used():
    logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    assert top1_accuracy(logits, np.array([0, 1, 2, 0])) == 0.75  # (N, C) with (N,)
    assert top1_accuracy(logits.reshape(2, 2, 4), np.array([[0, 1], [2, 3]])) == 1.0  # (N, T, C) with (N, T)
    assert top1_accuracy(logits.reshape(4, 4, 1, 1), np.array([0, 1, 2, 2])) == 0.75  # (N, C, 1, 1)
    # a list of batches: every sample counts once, not every batch
    assert top1_accuracy([logits[:1], logits[1:]], [np.array([1]), np.array([1, 2, 3])]) == 0.75
    assert top1_correct(logits, np.array([0, 1, 2, 3])) == 4
    with pytest.raises(InputError, match="8 labels do not match outputs of shape"):
        top1_accuracy(logits, np.zeros(8, dtype=np.int64))
    with pytest.raises(InputError, match="no labelled samples"):
        top1_accuracy([], [])


def test_quantize_accuracy_and_agreement_are_verify_s(tmp_path):
    from onnxprune.quantize import accuracy, agreement

    model = small_cnn()
    feeds = [random_inputs(model, seed) for seed in range(3)]
    outputs = [session(model).run(None, f)[0] for f in feeds]
    labels = np.array([int(o.argmax()) for o in outputs[:2]] + [(int(outputs[2].argmax()) + 1) % 5])
    np.savez(tmp_path / "eval.npz", x=np.concatenate([f["x"] for f in feeds]), label=labels)
    assert accuracy(model, str(tmp_path / "eval.npz"), "label") == pytest.approx(2 / 3)

    shifted = [o + np.float32(0.5) * (k == 1) for k, o in enumerate(outputs)]
    cmp = compare_outputs("y", np.concatenate(outputs), np.concatenate(shifted), 1e-4, 1e-3)
    assert agreement(outputs, shifted) == (cmp.max_abs_diff, cmp.cosine, cmp.top1_agreement)

    np.savez(tmp_path / "bad.npz", x=np.concatenate([f["x"] for f in feeds]), label=np.zeros((3, 2), np.int64))
    with pytest.raises(InputError, match="labels array 'label': 2 labels do not match"):
        accuracy(model, str(tmp_path / "bad.npz"), "label")


def test_atomic_write_bytes_gives_the_usual_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_UMASK
    assert _UMASK == os.umask(_UMASK)  # read once at import, still the process's umask
    atomic_write_text(str(target), "é\n")  # a str path too; text is UTF-8
    assert target.read_bytes() == "é\n".encode("utf-8")
    assert _leftovers(tmp_path) == []
    with pytest.raises(InputError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "out.bin", b"")


def test_atomic_write_bytes_removes_its_temp_file_when_the_rename_fails(tmp_path):
    (tmp_path / "taken").mkdir()  # a directory cannot be replaced by a file
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(InputError, match="cannot write"):
        atomic_write_bytes(tmp_path / "taken", b"data")
    assert _leftovers(tmp_path) == []


def test_statistics_and_plot_go_through_atomic_write_bytes(tmp_path):
    from onnxprune.passes.stats import GramStats, Statistics
    from onnxprune.sensitivity import GroupCurve, SensitivityResult

    stats = Statistics("abc", 4, {}, {"w": GramStats(np.eye(2), 4.0)})
    stats.save(tmp_path / "s.npz")
    loaded = Statistics.load(tmp_path / "s.npz")
    assert loaded.fingerprint == "abc" and np.array_equal(loaded.grams["w"].gram, np.eye(2))
    assert stat.S_IMODE((tmp_path / "s.npz").stat().st_mode) == 0o666 & ~_UMASK
    with pytest.raises(InputError, match="does not exist"):
        stats.save(tmp_path / "missing" / "s.npz")

    pytest.importorskip("matplotlib")
    result = SensitivityResult([GroupCurve("g", ["conv"], 8, [0.25, 0.5], [0.1, 0.3], [0.9, 0.8])],
                               "l1", "none", 4, baseline_accuracy=1.0)
    assert result.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path) == []


def test_quantization_silences_only_ort_advice_not_other_loggers(caplog):
    from onnxprune.quantize import quantize_model

    model = small_cnn()
    user = logging.getLogger("onnxprune-test-user")

    def batches():  # runs while ONNX Runtime quantizes: its warning must get through
        for seed in range(2):
            user.warning("calibration batch %d", seed)
            yield random_inputs(model, seed)

    filters, disabled = list(logging.root.filters), logging.root.manager.disable
    with caplog.at_level(logging.INFO):
        quantized = quantize_model(model, "static", batches())
    assert [r.getMessage() for r in caplog.records if r.name == user.name] == ["calibration batch 0",
                                                                                "calibration batch 1"]
    ort_dir = os.path.dirname(os.path.realpath(onnxruntime.__file__))
    assert not [r for r in caplog.records if os.path.realpath(r.pathname).startswith(ort_dir)
                and r.levelno <= logging.WARNING]
    assert logging.root.filters == filters and logging.root.manager.disable == disabled
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)


def test_cli_saves_the_quantized_model_with_external_data_when_asked(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(model))
    out, target = tmp_path / "p.onnx", tmp_path / "q.onnx"
    code = main(["prune", str(model), "-o", str(out), "--ratio", "0.25", "--quantize", "dynamic",
                 "--quantized-output", str(target), "--save-external-data", "weights.bin", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "weights.bin").exists() and (tmp_path / "q.onnx.data").exists()
    feeds = random_inputs(small_cnn())
    session(onnx.load(str(target))).run(None, feeds)  # loads its own data file
    session(onnx.load(str(out))).run(None, feeds)

    capsys.readouterr()
    code = main(["prune", str(model), "-o", str(out), "--quantize", "dynamic", "--quantized-output",
                 str(target), "--save-external-data", "q.onnx.data", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "data file would overwrite" in err and len(err.strip().splitlines()) == 1


def test_python_api_options_table_matches_the_prune_signature():
    import inspect
    import re
    from pathlib import Path

    import onnxprune

    text = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    table = text.split("## `onnxprune.prune(", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    documented: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        names, default = row.split("|")[1:3]
        for name in re.findall(r"`(\w+)`", names):
            documented[name] = default.strip().strip("`")
    params = {n: p for n, p in inspect.signature(onnxprune.prune).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(documented) == set(params)
    for name, p in params.items():
        assert documented[name] == (f'"{p.default}"' if isinstance(p.default, str) else repr(p.default)), name
    round_to = next(row for row in table.splitlines() if row.startswith("| `round_to`"))
    assert '`"auto"`' in round_to
