"""Fast by default: latency-friendly channel counts without flags, and a quantization hand-off whose
types and format are chosen for the machine (and can be overridden), recorded in the report."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from builders import small_cnn
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.latency import BLOCK, layout_block
from onnxprune.quantize import QuantOptions, choose_quantization, cpu_flags, instruction_set
from onnxprune.verify import random_inputs, session
from test_latency_plan import hand_table, two_convs

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"


def wide_convs(width: int = 40) -> onnx.ModelProto:
    """x -> conv(3->W) -> relu -> conv(W->W) -> relu -> conv(W->4): two Conv groups of W channels."""
    return two_convs(width, seed=5)


def kept_counts(result) -> list[int]:
    return [g.size - len(g.remove) for g in result.plan.groups]


# --- latency-friendly rounding -------------------------------------------------------------------

def test_default_rounding_keeps_multiples_of_the_layout_block():
    block = layout_block() or BLOCK
    result = onnxprune.prune(wide_convs(), ratio=0.55)
    kept = kept_counts(result)
    assert kept and all(k % block == 0 and k >= block for k in kept), kept
    assert any(f"multiples of {block}" in n for n in result.report.notes)
    feeds = random_inputs(result.model)
    assert session(result.model).run(None, feeds)[0].shape == (1, 4, 8, 8)


def test_round_to_1_keeps_exact_counts():
    result = onnxprune.prune(wide_convs(), ratio=0.55, round_to=1)
    assert kept_counts(result) == [18, 18]  # 40 - floor(22): not a multiple of 8 or 16
    assert not any("multiples of" in n for n in result.report.notes)


def test_groups_no_larger_than_the_block_keep_exact_counts():
    block = layout_block() or BLOCK
    result = onnxprune.prune(wide_convs(block), ratio=0.5)
    assert kept_counts(result) == [block // 2, block // 2]


def test_lossless_and_replayed_plans_keep_their_exact_counts(tmp_path):
    planned = onnxprune.prune(wide_convs(), ratio=0.55, round_to=1)
    path = tmp_path / "plan.json"
    planned.plan.save(path)
    assert kept_counts(onnxprune.prune(wide_convs(), plan=str(path))) == [18, 18]
    with pytest.raises(InputError, match="round_to"):
        onnxprune.prune(wide_convs(), plan=str(path), round_to=8)
    assert onnxprune.prune(wide_convs(), lossless=True).report.channels_removed == 0


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_round_to_auto_meets_macs_targets_within_two_points(tmp_path, target):
    model = wide_convs(128)  # fine enough: with two groups of 64, no pair of multiples of 8 lands near 0.7
    analysis = onnxprune.analyze(model)
    table = hand_table(analysis, {g.key: (8, 1.0) for g in analysis.prunable})
    table.save(tmp_path / "t.json")
    report = onnxprune.prune(model, target_macs=target, round_to="auto", latency_table=str(tmp_path / "t.json")).report
    assert target - 0.02 <= report.after.macs / report.before.macs <= target + 1e-9
    default = onnxprune.prune(model, target_macs=target).report
    assert target - 0.02 <= default.after.macs / default.before.macs <= target + 1e-9


def test_round_to_with_target_latency_is_refused():
    with pytest.raises(InputError, match="target_latency"):
        onnxprune.prune(wide_convs(), target_latency=0.5, round_to=8)


# --- quantization choices ------------------------------------------------------------------------

def test_cpu_flags_and_instruction_set_from_injected_cpuinfo():
    assert "avx2" in cpu_flags(AVX2)
    assert instruction_set(cpu_flags(AVX2), "x86_64") == "avx2"
    assert instruction_set(cpu_flags(VNNI), "x86_64") == "avx512_vnni"
    assert instruction_set(cpu_flags(ARM), "aarch64") == "arm64"
    assert instruction_set(set(), "x86_64") == "other"


def test_choice_follows_the_instruction_set():
    avx2 = choose_quantization("static", flags=cpu_flags(AVX2), machine="x86_64")
    assert (avx2.activation_type, avx2.weight_type, avx2.per_channel, avx2.reduce_range, avx2.preprocess,
            avx2.quant_format, avx2.calibration) == ("uint8", "int8", True, True, True, "qdq", "minmax")
    vnni = choose_quantization("static", flags=cpu_flags(VNNI), machine="x86_64")
    assert (vnni.activation_type, vnni.reduce_range) == ("uint8", False)
    arm = choose_quantization("static", flags=cpu_flags(ARM), machine="aarch64")
    assert (arm.activation_type, arm.weight_type) == ("int8", "int8")
    dynamic = choose_quantization("dynamic", flags=cpu_flags(VNNI), machine="x86_64")
    assert dynamic.calibration is None and "Conv" not in dynamic.op_types


def test_user_choices_override_the_machine_defaults():
    fixed = choose_quantization("static", QuantOptions("qoperator", "int8", "int8", False, "entropy"),
                                flags=cpu_flags(AVX2), machine="x86_64")
    assert (fixed.quant_format, fixed.activation_type, fixed.per_channel, fixed.calibration,
            fixed.reduce_range) == ("qoperator", "int8", False, "entropy", False)


@pytest.mark.parametrize("options, message", [
    ({"quantize": "dynamic", "activation_type": "int8"}, "activation_type int8"),
    ({"quantize": "dynamic", "quant_format": "qdq"}, "quant_format"),
    ({"quantize": "dynamic", "calibration": "entropy"}, "calibration"),
    ({"quantize": "static", "activation_type": "int8", "weight_type": "uint8"}, "S8U8"),
    ({"quant_format": "qdq"}, "quant_format applies to quantization"),
    ({"quantize": "static", "calibration": "median"}, "calibration must be one of"),
])
def test_bad_quantization_combinations_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        onnxprune.prune(small_cnn(), **options)


def test_cli_refuses_a_bad_combination_with_one_line_and_exit_2(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), model)
    code = main(["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--quantize", "dynamic",
                 "--activation-type", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "activation_type int8" in err
    assert not (tmp_path / "p.onnx").exists()


def _calibration(model, directory, n: int = 4) -> str:
    """Calibration samples as an .npz file (read in batches the model's fixed batch size allows)."""
    path = directory / "calib.npz"
    np.savez(path, x=np.concatenate([random_inputs(model, s)["x"] for s in range(n)]))
    return str(path)


def _zero_point_types(model: onnx.ModelProto, op: str) -> dict[str, int]:
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[0]: inits[n.input[2]].data_type for n in model.graph.node
            if n.op_type == op and len(n.input) > 2 and n.input[2] in inits}


def test_qdq_u8s8_per_channel_graph_types(tmp_path):
    model = small_cnn()
    result = onnxprune.prune(model, ratio=0.25, quantize="static", data=_calibration(model, tmp_path),
                             quant_format="qdq", activation_type="uint8", weight_type="int8", per_channel=True)
    graph = result.quantized
    ops = {n.op_type for n in graph.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "QLinearConv" not in ops
    quantize_zp = set(_zero_point_types(graph, "QuantizeLinear").values())
    assert quantize_zp == {onnx.TensorProto.UINT8}  # activations
    inits = {t.name: t for t in graph.graph.initializer}
    weight_dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq, "no int8 conv weight"
    for node in weight_dq:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = numpy_helper.to_array(inits[node.input[1]])
        assert axis == 0 and scale.size == inits[node.input[0]].dims[0]  # one scale per output channel
        assert inits[node.input[2]].data_type == onnx.TensorProto.INT8
    choice = result.report.to_dict()["quantization"]
    assert (choice["quant_format"], choice["activation_type"], choice["weight_type"], choice["per_channel"]) == \
        ("qdq", "uint8", "int8", True)
    onnx.checker.check_model(graph, full_check=True)


def test_qoperator_s8s8_per_tensor_graph_types(tmp_path):
    model = small_cnn()
    result = onnxprune.prune(model, ratio=0.25, quantize="static", data=_calibration(model, tmp_path),
                             quant_format="qoperator", activation_type="int8", per_channel=False)
    graph = result.quantized
    convs = [n for n in graph.graph.node if n.op_type == "QLinearConv"]
    assert convs and not any(n.op_type == "Conv" for n in graph.graph.node)
    inits = {t.name: t for t in graph.graph.initializer}
    for node in convs:  # x, x_scale, x_zp, w, w_scale, w_zp, ...
        assert inits[node.input[2]].data_type == onnx.TensorProto.INT8
        assert inits[node.input[3]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(inits[node.input[4]]).size == 1  # per-tensor weight scale
    feeds = random_inputs(model)
    assert session(graph).run(None, feeds)[0].shape == session(model).run(None, feeds)[0].shape


def test_the_report_records_the_choice_in_text_json_and_html(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), model)
    args = ["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--quantize", "static", "--data",
            _calibration(small_cnn(), tmp_path), "--no-per-channel", "--calibration", "percentile", "--bench",
            "--report", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "quantize: static" in out and "per-tensor" in out and "percentile calibration" in out
    assert "speedup" in out and "1.00x" in out
    report = json.loads((tmp_path / "r.json").read_text())["quantization"]
    assert report["per_channel"] is False and report["calibration"] == "percentile"
    assert [c["quant_format"] for c in report["candidates"]] == ["qdq", "qoperator"]  # timed with --bench
    assert report["quant_format"] in ("qdq", "qoperator")
    page = (tmp_path / "r.html").read_text()
    assert 'id="quantization"' in page and "percentile calibration" in page
