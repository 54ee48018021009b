"""Prune then quantize with ONNX Runtime's quantizer: valid models and honest side-by-side figures."""

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.demo import accuracy as demo_accuracy
from onnxprune.demo import demo_files
from onnxprune.verify import session


@pytest.fixture(scope="module")
def digits():
    model, test, calib = demo_files()
    with np.load(test) as npz:
        images, labels = npz["image"], npz["label"]
    return onnx.load(str(model)), test, calib, images, labels


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_model_is_valid_smaller_and_close(digits, mode):
    model, test, calib, images, labels = digits
    result = onnxprune.prune(model, ratio=0.25, quantize=mode, data=str(calib), eval_data=str(test))
    quantized = result.quantized
    onnx.checker.check_model(quantized, full_check=True)
    ops = {n.op_type for n in quantized.graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}, ops
    out_p = session(result.model).run(None, {"image": images})[0]
    out_q = session(quantized).run(None, {"image": images})[0]
    assert out_q.shape == out_p.shape
    assert np.mean(out_q.argmax(1) == out_p.argmax(1)) > 0.9  # int8 keeps the pruned model's decisions
    figs = result.report.models
    assert list(figs) == ["original", "pruned", "quantized"]
    assert figs["quantized"].bytes < figs["pruned"].bytes < figs["original"].bytes
    assert figs["quantized"].bytes == quantized.ByteSize()
    assert figs["original"].max_abs_diff == 0.0 and figs["pruned"].max_abs_diff > 0.0


def test_accuracy_figures_are_the_models_real_accuracy(digits):
    model, test, calib, images, labels = digits
    result = onnxprune.prune(model, ratio=0.25, quantize="dynamic", eval_data=str(test))
    figs = result.report.models
    assert figs["original"].accuracy == pytest.approx(demo_accuracy(model, images, labels))
    assert figs["pruned"].accuracy == pytest.approx(demo_accuracy(result.model, images, labels))
    assert figs["quantized"].accuracy == pytest.approx(demo_accuracy(result.quantized, images, labels))
    assert figs["original"].accuracy > 0.95


def test_eval_data_without_quantize_compares_two_models(digits):
    model, test, *_ = digits
    result = onnxprune.prune(model, ratio=0.25, eval_data=str(test), bench=True)
    assert result.quantized is None and list(result.report.models) == ["original", "pruned"]
    assert result.report.latency is not None and result.report.models["pruned"].latency_ms["median"] > 0


def _token_tagger(vocab: int = 50, width: int = 16, hidden: int = 32, tags: int = 5) -> onnx.ModelProto:
    """ids [B, S] -> embedding -> MatMul/Relu/MatMul -> per-token scores [B, S, tags]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("table", (vocab, width)), ("w1", (width, hidden)), ("w2", (hidden, tags)))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", tags])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_eval_batches_of_different_lengths_are_compared_per_position():
    """Token batches padded to different lengths (a length-bucketed eval set) are compared as rows
    of the last axis: no crash, every position counted once."""
    from onnxprune.quantize import agreement

    model = _token_tagger()
    rng = np.random.default_rng(1)
    batches = [{"ids": rng.integers(0, 50, size=(4, length)).astype(np.int64),
                "label": rng.integers(0, 5, size=(4, length))} for length in (5, 9, 7)]
    result = onnxprune.prune(model, ratio=0.5, data=batches, eval_data=batches, quiet=True)
    figures = result.report.models["pruned"]
    assert 0 < figures.cosine < 1 and 0 <= figures.top1_agreement <= 1 and 0 <= figures.accuracy <= 1
    same = [session(model).run(None, {"ids": b["ids"]})[0] for b in batches]
    assert agreement(same, same) == (0.0, pytest.approx(1.0), 1.0)
    shifted = [x.copy() for x in same]
    shifted[1][0, 0] = -shifted[1][0, 0]  # one position of the middle batch changes its arg-max
    max_diff, _, top1 = agreement(same, shifted)
    assert max_diff > 0 and top1 == pytest.approx(1 - 1 / (4 * (5 + 9 + 7)))


def test_static_needs_calibration_data(digits):
    with pytest.raises(onnxprune.InputError, match="calibration"):
        onnxprune.prune(digits[0], ratio=0.25, quantize="static")


def test_bad_quantize_mode_and_missing_labels_are_input_errors(digits, tmp_path):
    model, test, *_ = digits
    with pytest.raises(onnxprune.InputError, match="quantize must be"):
        onnxprune.prune(model, ratio=0.25, quantize="int4")
    with pytest.raises(onnxprune.InputError, match="labels"):
        onnxprune.prune(model, ratio=0.25, eval_data=str(test), labels="nope")


def test_cli_writes_both_models_and_three_column_table(digits, tmp_path, capsys):
    model_path, test, calib = demo_files()
    out = tmp_path / "p.onnx"
    code = main(["prune", str(model_path), "-o", str(out), "--ratio", "0.25", "--quantize", "static",
                 "--data", str(calib), "--eval-data", str(test), "--bench"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    quantized = tmp_path / "p.int8.onnx"
    onnx.checker.check_model(onnx.load(quantized), full_check=True)
    header = stdout.splitlines()[0].split()
    assert header == ["original", "pruned", "pruned+int8"]
    for row in ("size (bytes)", "latency (ms)", "accuracy", "max abs diff"):
        assert any(line.startswith(row) for line in stdout.splitlines()), row
    code = main(["prune", str(model_path), "-o", str(tmp_path / "q.onnx"), "--quantize", "dynamic",
                 "--quantized-output", str(tmp_path / "custom.onnx")])
    assert code == 0 and (tmp_path / "custom.onnx").exists()


def test_quantized_output_may_not_overwrite_input_or_pruned_model(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(demo_files()[0].read_bytes())
    before = model.read_bytes()
    out = tmp_path / "p.onnx"
    for target in (model, out):
        code = main(["prune", str(model), "-o", str(out), "--quantize", "dynamic", "--quantized-output", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and "would overwrite" in err and len(err.strip().splitlines()) == 1
    assert model.read_bytes() == before and not out.exists()


def test_agreement_counts_every_sample_of_every_batch_once():
    from onnxprune.quantize import agreement

    reference = [np.eye(4)[:2], np.eye(4)[2:]]
    other = [np.eye(4)[:2], np.eye(4)[[3, 2]]]  # the second batch's two samples swap classes
    max_abs, cosine, top1 = agreement(reference, other)
    assert top1 == 0.5 and max_abs == 1.0 and cosine == pytest.approx(0.5)
    with pytest.raises(onnxprune.InputError, match="shapes differ"):
        agreement(reference, [np.eye(3)])
