"""`onnxprune distill` and `prune --distill`: outputs, determinism, one-line refusals (exit 2),
interrupted runs, a missing train extra, and recovery of the shipped digits CNN."""

import json
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest

from cli_helpers import assert_refused, run, snapshot
from distill_models import INPUT, images, labelled, pruned_student, tiny_classifier
from onnxprune.demo import demo_files
from test_reporting import _documented_keys

pytest.importorskip("torch")


@pytest.fixture
def files(tmp_path):
    teacher = tiny_classifier()
    onnx.save(teacher, tmp_path / "teacher.onnx")
    onnx.save(pruned_student(teacher), tmp_path / "student.onnx")
    np.savez(tmp_path / "data.npz", **labelled(teacher, n=128))
    return tmp_path


def _distill_args(d, *extra, out="out.onnx"):
    return ["distill", d / "student.onnx", "--teacher", d / "teacher.onnx", "--data", d / "data.npz",
            "-o", d / out, "--quiet", *extra]


def test_distill_writes_model_and_report_byte_identical_per_seed(files, capsys):
    code, stdout, err = run(_distill_args(files, "--epochs", "2", "--augment", "--seed", "5", "--labels", "label",
                                          "--report", files / "r.json"), capsys)
    assert code == 0, err
    assert "distill: 2 epoch(s)" in stdout and "accuracy on training data" in stdout
    report = json.loads((files / "r.json").read_text())
    assert report["format"] == "onnxprune-distill" and len(report["distill"]["epochs"]) == 2
    assert report["distill"]["losses"]["logits"].startswith("kl (T=2) + cross-entropy")
    code, _, err = run(_distill_args(files, "--epochs", "2", "--augment", "--seed", "5", "--labels", "label",
                                     out="again.onnx"), capsys)
    assert code == 0, err
    assert (files / "out.onnx").read_bytes() == (files / "again.onnx").read_bytes()


def _renamed(model, old, new):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in list(copy.graph.input) + list(copy.graph.output):
        if vi.name == old:
            vi.name = new
    for node in copy.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    return copy


def _bad_teacher(kind):
    teacher = tiny_classifier()
    if kind == "input":
        return _renamed(teacher, INPUT, "pixels")
    if kind == "output":
        return _renamed(teacher, "logits", "scores")
    teacher.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1  # rank 3
    return teacher


@pytest.mark.parametrize("kind, needle", [
    ("input", "student and teacher inputs differ: student has x, teacher has pixels"),
    ("output", "student and teacher outputs differ"),
    ("rank", "output logits: student has rank 2 float, teacher has rank 3 float"),
])
def test_student_and_teacher_must_match(files, kind, needle, capsys):
    onnx.save(_bad_teacher(kind), files / "teacher.onnx")
    assert_refused(_distill_args(files), needle, capsys, files, files / "out.onnx")


@pytest.mark.parametrize("data, extra, needle", [
    ({INPUT: images(n=64).reshape(64, 72)}, [], "data for input x has shape (32, 72); the model expects [?, 2, 6, 6]"),
    ({"z": images(n=64)}, [], "no data for model input(s) x"),
    ({INPUT: images(n=64).astype(np.float64)}, [], "data for input x is float64; the model expects float32"),
    ({INPUT: np.where(np.arange(64)[:, None, None, None] == 3, np.nan, images(n=64)).astype(np.float32)}, [],
     "distillation loss became nan"),
    ({INPUT: images(n=64)}, ["--match", "nope"], "--match nope: no node of the student computes"),
    ({INPUT: images(n=64)}, ["--loss", "huber"], "loss must be one of kl, mse, cosine, pooled, auto"),
    ({INPUT: images(n=64)}, ["--loss", "pooled"], "--loss pooled: output logits has rank 2"),
    ({INPUT: images(n=64)}, ["--match-weight", "-1"], "match weight must be >= 0"),
    ({INPUT: images(n=64)}, ["--loss", "nope=kl"], "loss given for unknown output(s) nope"),
    ({INPUT: images(n=64)}, ["--epochs", "0"], "epochs must be an integer >= 1"),
    ({INPUT: images(n=64)}, ["--token-swap", "1.5"], "token_swap must be a share in [0, 1)"),
    ({INPUT: images(n=64)}, ["--labels", "label"], "no labels array 'label' in the data"),
    ({INPUT: images(n=64)}, ["--freeze", "*emb*"], "--freeze '*emb*' names no trainable initializer"),
    ({INPUT: images(n=64)}, ["--padding-mask", "x"], "--padding-mask 'x': not a (batch, positions) input"),
])
def test_bad_data_and_options_are_refused(files, data, extra, needle, capsys):
    np.savez(files / "data.npz", **data)
    assert_refused(_distill_args(files, *extra), needle, capsys, files, files / "out.onnx")


def test_missing_data_and_overwriting_inputs_are_refused(files, capsys):
    args = _distill_args(files)
    without_data = args[:4] + args[6:]
    assert_refused(without_data, "distill needs --data", capsys, files)
    assert_refused(_distill_args(files, out="student.onnx"), "-o would overwrite an input file", capsys, files)
    assert_refused(["prune", files / "teacher.onnx", "-o", files / "p.onnx", "--distill"],
                   "distill needs data", capsys, files, files / "p.onnx")


def test_interrupted_run_writes_nothing(files, capsys):
    before = snapshot(files)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)  # SIGALRM raises KeyboardInterrupt
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        code, _, err = run(_distill_args(files, "--epochs", "100000"), capsys)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 2 and err.strip() == "onnxprune: interrupted"
    assert snapshot(files) == before  # no output, no temp file, inputs unchanged


def test_torch_free_import_and_missing_torch_names_the_train_extra(files):
    """One interpreter: `import onnxprune` loads no torch and `onnxprune.distill` resolves lazily;
    then, with torch made unimportable, `distill` and `prune --distill` exit 2 with one line."""
    commands = [[str(a) for a in _distill_args(files)],
                ["prune", str(files / "teacher.onnx"), "-o", str(files / "p.onnx"), "--data", str(files / "data.npz"),
                 "--distill"]]
    code = ("import sys, onnxprune\n"
            "assert 'torch' not in sys.modules and onnxprune.distill.__module__ == 'onnxprune.train.distill'\n"
            "sys.modules['torch'] = None\n"
            "from onnxprune.cli import main\n"
            f"codes = [main(args) for args in {commands!r}]\n"
            "sys.exit(0 if codes == [2, 2] else 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = "onnxprune: error: distill needs the train extra: pip install 'onnxprune[train]'"
    assert proc.stderr.splitlines() == [line, line]
    assert not (files / "out.onnx").exists() and not (files / "p.onnx").exists()


def test_digits_cnn_recovers_by_distillation(tmp_path, capsys):
    """The shipped CNN at ratio 0.5 without recovery is near chance (0.0956); a few seconds of
    distillation on its 256 calibration images bring it back above 0.95 on the 450 test images."""
    model, test, calib = demo_files()
    pruned, distilled, report = tmp_path / "p.onnx", tmp_path / "d.onnx", tmp_path / "r.json"
    code, _, err = run(["prune", model, "-o", pruned, "--ratio", "0.5", "--recover", "none", "--quiet"], capsys)
    assert code == 0, err
    code, stdout, err = run(["distill", pruned, "--teacher", model, "--data", calib, "-o", distilled, "--epochs", "8",
                             "--eval-data", test, "--labels", "label", "--report", report, "--quiet"], capsys)
    assert code == 0, err
    history = json.loads(report.read_text())["distill"]
    assert history["before"]["accuracy"] < 0.2
    assert history["after"]["accuracy"] > 0.95
    assert history["torch_vs_ort_max_rel"] <= 1e-4


def test_prune_with_distill_reports_the_distilled_model(tmp_path, capsys):
    model, test, calib = demo_files()
    out, report, page = tmp_path / "p.onnx", tmp_path / "r.json", tmp_path / "r.html"
    code, stdout, err = run(["prune", model, "-o", out, "--ratio", "0.5", "--recover", "none", "--data", calib,
                             "--eval-data", test, "--distill", "--distill-epochs", "6", "--report", report,
                             "--html", page, "--quiet"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data["distill"]) == _documented_keys("`distill`")
    assert set(data["distill"]["epochs"][0]) == {"epoch", "loss", "parts", "eval", "seconds"}
    assert data["models"]["pruned"]["accuracy"] > 0.95  # the written model is the distilled one
    assert data["distill"]["before"]["accuracy"] < 0.2 and data["distill"]["evaluated_on"] == "eval data"
    assert data["distill"]["after"]["accuracy"] == pytest.approx(data["models"]["pruned"]["accuracy"], abs=1e-6)
    assert "distill: " in stdout and "accuracy on eval data" in stdout
    html = page.read_text()
    assert 'id="loss-chart"' in html and 'id="distill"' in html
