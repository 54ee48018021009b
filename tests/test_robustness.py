"""Hostile and broken inputs through the CLI: exit 2, one line naming the file/node and the problem,
no traceback, no output file, input bytes unchanged. Plus unusual-but-valid models (subgraphs,
functions, custom domains, fp16/bf16, dynamic dims) that must be frozen with a reason or pruned
correctly, and atomic, reproducible outputs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import GraphBuilder, small_cnn
from onnxprune.errors import InputError
from cli_helpers import assert_refused, run, snapshot
from reference import assert_matches_masked


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def conv_relu_conv(b: GraphBuilder, middle: str = "Relu", shape=(1, 3, 8, 8), **middle_attrs) -> GraphBuilder:
    x = b.input(list(shape))
    h = b.op(middle, [b.conv(x, shape[1], 8)], **middle_attrs)
    y = b.conv(h, 8, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, shape[2], shape[3]])
    return b


# --- unreadable files --------------------------------------------------------------------------

def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = small_cnn().SerializeToString()
    rng = np.random.default_rng(0)
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "random.onnx").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (tmp / "model.json").write_text('{"graph": {"node": []}, "ir_version": 8}\n')
    (tmp / "notes.txt").write_text("this is a text file, not a model\n" * 20)
    (tmp / "adir.onnx").mkdir()
    os.mkfifo(tmp / "fifo.onnx")
    return {
        "missing": (tmp / "missing.onnx", "no such file"),
        "empty": (tmp / "empty.onnx", "empty file"),
        "directory": (tmp / "adir.onnx", "is a directory"),
        "random": (tmp / "random.onnx", "random.onnx"),
        "truncated": (tmp / "truncated.onnx", "truncated.onnx"),
        "json": (tmp / "model.json", "model.json"),
        "text": (tmp / "notes.txt", "notes.txt"),
        "fifo": (tmp / "fifo.onnx", "not a regular file"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "random", "truncated", "json", "text", "fifo"])
@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_unreadable_file_is_refused(case, command, tmp_path, capsys):
    path, needle = _bad_files(tmp_path)[case]
    out = tmp_path / "out.onnx"
    args = ["prune", path, "-o", out] if command == "prune" else ["analyze", path]
    assert_refused(args, needle, capsys, tmp_path, out)


def _dangling() -> onnx.ModelProto:
    model = small_cnn()
    model.graph.node[2].input[0] = "nowhere"
    return model


def _cycle() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input([1, 4])
    b.nodes.append(helper.make_node("Add", [x, "b"], ["a"], name="first"))
    b.nodes.append(helper.make_node("Relu", ["a"], ["b"], name="second"))
    b.nodes.append(helper.make_node("Relu", ["a"], ["y"], name="third"))
    b.output("y", shape=[1, 4])
    return b.model(check=False)


def _not_ssa() -> onnx.ModelProto:
    model = small_cnn()
    model.graph.node[2].output[0] = model.graph.node[0].output[0]
    return model


def _duplicate_initializer() -> onnx.ModelProto:
    model = small_cnn()
    model.graph.initializer.append(model.graph.initializer[0])
    return model


@pytest.mark.parametrize("make,needle", [
    (_dangling, "nowhere"), (_cycle, "invalid model"), (_not_ssa, "invalid model"),
    (_duplicate_initializer, "invalid model"),
])
def test_invalid_graph_is_refused(make, needle, tmp_path, capsys):
    path = save(make(), tmp_path / "bad.onnx")
    out = tmp_path / "out.onnx"
    assert str(path) in assert_refused(["prune", path, "-o", out], needle, capsys, tmp_path, out)
    assert str(path) in assert_refused(["analyze", path], needle, capsys, tmp_path)


def test_name_that_is_not_utf8_is_refused(tmp_path, capsys):
    model = small_cnn()
    name = model.graph.node[2].name.encode()  # e.g. b"Relu12"
    data = model.SerializeToString()
    assert data.count(name) == 1
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(name, name[:3] + b"\x91" + name[4:]))
    assert_refused(["prune", path, "-o", tmp_path / "o.onnx"], "is not valid UTF-8", capsys, tmp_path)


def test_payload_shorter_than_its_dims_is_refused(tmp_path, capsys):
    model = small_cnn()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:40]
    path = save(model, tmp_path / "short.onnx")
    assert_refused(["prune", path, "-o", tmp_path / "o.onnx"], "(40 bytes)", capsys, tmp_path)


# --- external data ------------------------------------------------------------------------------

def _external_model(tmp: Path, name: str = "m.onnx", location: str = "w.bin") -> Path:
    """small_cnn with every initializer above 64 bytes in one external file."""
    model = small_cnn()
    path = tmp / name
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=64)
    return path


def _edit_external(path: Path, key: str, value: str, tensor: int = 0) -> None:
    """Set one external_data entry of the `tensor`-th external initializer, rewriting the model file."""
    model = onnx.load(path, load_external_data=False)
    ext = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL][tensor]
    for entry in ext.external_data:
        if entry.key == key:
            entry.value = value
            break
    else:
        entry = ext.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())


def test_external_data_model_prunes_like_the_inline_model(tmp_path, capsys):
    path = _external_model(tmp_path)
    out = tmp_path / "o.onnx"
    code, _, err = run(["prune", path, "-o", out], capsys)
    assert code == 0, err
    inline = onnxprune.prune(small_cnn())
    written = onnx.load(out).SerializeToString(deterministic=True)
    assert written == inline.model.SerializeToString(deterministic=True)
    assert_matches_masked(small_cnn(), onnxprune.prune(str(path)))


def test_in_memory_model_with_external_references_is_refused(tmp_path):
    model = onnx.load(_external_model(tmp_path), load_external_data=False)
    with pytest.raises(InputError, match="refers to external data"):
        onnxprune.analyze(model)


def _ext_missing(tmp, path):
    (tmp / "w.bin").unlink()
    return "not found"


def _ext_dotdot(tmp, path):
    (tmp.parent / "w.bin").write_bytes((tmp / "w.bin").read_bytes())
    _edit_external(path, "location", "../w.bin")
    return "not a plain relative path"


def _ext_symlink(tmp, path):
    (tmp / "w.bin").rename(tmp / "real.bin")
    (tmp / "w.bin").symlink_to(tmp / "real.bin")
    return "symbolic link"


def _ext_symlinked_dir(tmp, path):
    outside = tmp.parent / f"{tmp.name}_outside"
    outside.mkdir()
    (tmp / "w.bin").rename(outside / "w.bin")
    (tmp / "sub").symlink_to(outside, target_is_directory=True)
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "sub/w.bin"
    path.write_bytes(model.SerializeToString())
    return "symbolic link"


def _ext_hardlink(tmp, path):
    os.link(tmp / "w.bin", tmp / "alias.bin")
    return "hard links"


def _ext_directory(tmp, path):
    (tmp / "adir").mkdir()
    _edit_external(path, "location", "adir")
    return "not a regular file"


def _ext_negative_dims(tmp, path):
    model = onnx.load(path, load_external_data=False)
    tensor = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL][0]
    tensor.dims[0] = -tensor.dims[0]
    path.write_bytes(model.SerializeToString())
    return "negative dimension"


def _set(key: str, value, needle: str):
    """A mutator setting one external_data entry (`value` may be computed from the model's folder)."""
    def mutate(tmp, path):
        _edit_external(path, key, value(tmp) if callable(value) else value)
        return needle
    return mutate


EXTERNAL_CASES = {
    "missing": _ext_missing, "dotdot": _ext_dotdot,
    "dotdot_inner": _set("location", "sub/../../w.bin", "not a plain relative path"),
    "absolute": _set("location", lambda tmp: str(tmp / "w.bin"), "not a plain relative path"),
    "symlink": _ext_symlink,
    "symlinked_dir": _ext_symlinked_dir,
    "hardlink": _ext_hardlink,
    "offset_beyond": _set("offset", lambda tmp: str((tmp / "w.bin").stat().st_size + 16), "beyond the end"),
    "length_beyond": _set("length", str(10**12), "beyond the end"),
    "length_mismatch": _set("length", "8", "does not match the tensor size"),
    "offset_not_integer": _set("offset", "12abc", "not a non-negative integer"),
    "negative_offset": _set("offset", "-4", "not a non-negative integer"),
    "nul": _set("location", "w.bin\0.txt", "not a plain relative path"),
    "directory": _ext_directory,
    "negative_dims": _ext_negative_dims,
    "unknown_key": _set("location_override", "/etc/passwd", "unknown key"),
}


@pytest.mark.parametrize("mutate", EXTERNAL_CASES.values(), ids=EXTERNAL_CASES.keys())
def test_hostile_external_data_is_refused_before_reading(mutate, tmp_path, capsys, monkeypatch):
    work = tmp_path / "model"
    work.mkdir()
    path = _external_model(work)
    needle = mutate(work, path)
    opened: list[str] = []
    real_open = os.open

    def spy_open(file, *args, **kwargs):  # records every file the run opens at the OS level
        opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    out = work / "out.onnx"
    err = assert_refused(["prune", path, "-o", out], needle, capsys, work, out)
    assert str(path) in err
    assert not any(p.endswith(".bin") for p in opened), opened


def test_external_data_checked_for_all_tensors_before_any_read(tmp_path, monkeypatch, capsys):
    path = _external_model(tmp_path)
    _edit_external(path, "length", "8", tensor=-1)  # only the last tensor is bad
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda f, *a, **k: (opened.append(os.fspath(f)), real_open(f, *a, **k))[1])
    assert_refused(["analyze", path], "does not match", capsys, tmp_path)
    assert not any(p.endswith("w.bin") for p in opened)


def test_external_data_inside_a_subgraph_is_checked(tmp_path, capsys):
    """An If branch holding an external constant must not escape the checks."""
    then_const = numpy_helper.from_array(np.ones(64, np.float32), "tc")
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=then_const)], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [64])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        np.zeros(64, np.float32), "ec"))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [64])])
    b = GraphBuilder()
    cond = b.input([], "cond", TensorProto.BOOL)
    b.nodes.append(helper.make_node("If", [cond], ["y"], name="branch", then_branch=then, else_branch=other))
    b.output("y", shape=[64])
    model = b.model()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 256)
    attr = model.graph.node[0].attribute[0].g.node[0].attribute[0].t
    attr.ClearField("raw_data")
    attr.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "256")):
        e = attr.external_data.add()
        e.key, e.value = k, v
    sub = tmp_path / "m"
    sub.mkdir()
    path = save(model, sub / "m.onnx")
    assert_refused(["analyze", path], "not a plain relative path", capsys, sub)


def test_output_data_file_may_not_overwrite_the_inputs_data(tmp_path, capsys):
    path = _external_model(tmp_path)
    out = tmp_path / "o.onnx"
    assert_refused(["prune", path, "-o", out, "--save-external-data", "w.bin"], "input", capsys, tmp_path, out)


# --- models that are valid but unusual: frozen with a reason, or pruned correctly ---------------

def _frozen_reasons(model: onnx.ModelProto) -> str:
    return " | ".join(r for g in onnxprune.analyze(model).groups for r in g.frozen)


def _prune_checked(model: onnx.ModelProto, **kwargs):
    result = onnxprune.prune(model, **kwargs)
    assert_matches_masked(model, result)
    return result


@pytest.mark.parametrize("opset,needle", [(5, "opset 5"), (40, "opset 40")])
def test_unsupported_opset_freezes_everything(opset, needle, tmp_path, capsys):
    b = GraphBuilder(opset=opset)
    model = conv_relu_conv(b).model(check=False)
    analysis = onnxprune.analyze(model)
    assert analysis.groups and not analysis.prunable
    assert needle in _frozen_reasons(model)
    path = save(model, tmp_path / "m.onnx")
    code, out, _ = run(["analyze", path], capsys)
    assert code == 0 and needle in out


def test_custom_domain_op_freezes_its_channels():
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8)])
    h = b.conv(h, 8, 6)
    b.nodes.append(helper.make_node("Gelu", [h], ["g"], name="custom_gelu", domain="com.microsoft"))
    b.conv("g", 6, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 8, 8])
    model = b.model(domains={"com.microsoft": 1})
    assert "custom_gelu" in _frozen_reasons(model) and "com.microsoft" in _frozen_reasons(model)
    result = _prune_checked(model)
    assert result.report.channels_removed > 0  # the first group is still prunable


def test_model_local_function_freezes_its_channels():
    body = [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Neg", ["r"], ["b"])]
    func = helper.make_function("local", "ReluNeg", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8)])
    h = b.conv(h, 8, 6)
    b.nodes.append(helper.make_node("ReluNeg", [h], ["f"], name="call", domain="local"))
    b.conv("f", 6, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 8, 8])
    model = b.model(check=False, domains={"local": 1})
    model.functions.append(func)
    onnx.checker.check_model(model, full_check=True)
    assert "ReluNeg" in _frozen_reasons(model)
    result = _prune_checked(model)
    assert result.report.channels_removed > 0
    assert [f.name for f in result.model.functions] == ["ReluNeg"]


def _if_reading(outer: str) -> onnx.NodeProto:
    then = helper.make_graph([helper.make_node("Relu", [outer], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", [outer], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    return helper.make_node("If", ["cond"], ["branch_out"], name="branch", then_branch=then, else_branch=other)


def test_if_subgraph_reading_a_prunable_tensor_freezes_it():
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    b.input([], "cond", TensorProto.BOOL)
    h = b.op("Relu", [b.conv(x, 3, 8)])
    inner = b.conv(h, 8, 6)
    b.nodes.append(_if_reading(inner))
    b.conv("branch_out", 6, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 8, 8])
    model = b.model()
    reasons = _frozen_reasons(model)
    assert "subgraph" in reasons and "branch" in reasons
    result = onnxprune.prune(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.channels_removed > 0
    from onnxprune.verify import random_inputs, session
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert session(result.model).run(None, feeds)[0].shape == session(model).run(None, feeds)[0].shape


def test_if_subgraph_reading_a_weight_freezes_it():
    """A branch reads the conv weight itself: slicing it would change the branch's result."""
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    b.input([], "cond", TensorProto.BOOL)
    h = b.op("Relu", [b.conv(x, 3, 8)])
    weight = b.nodes[0].input[1]
    b.nodes.append(_if_reading(weight))
    b.conv(h, 8, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 8, 8])
    b.output("branch_out")
    model = b.model()
    assert weight in _frozen_reasons(model)
    assert not onnxprune.analyze(model).prunable


def test_loop_and_scan_bodies_with_unknown_shapes_freeze():
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["s_in", h], ["s_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    trip = b.const(np.array(2, np.int64), "trip")
    cond = b.const(np.array(True), "cond")
    b.nodes.append(helper.make_node("Loop", [trip, cond, h], ["looped"], name="loop", body=body))
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["acc", "row"], ["acc_out"]), helper.make_node("Identity", ["acc_out"], ["row_out"])],
        "scan_body",
        [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [8, 8]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [8, 8])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [8, 8]),
         helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [8, 8])])
    squeezed = b.op("Squeeze", ["looped", b.const(np.array([0], np.int64))])
    init = b.const(np.zeros((8, 8), np.float32), "acc0")
    b.nodes.append(helper.make_node("Scan", [init, squeezed], ["scanned", "rows"], name="scan", body=scan_body,
                                    num_scan_inputs=1))
    b.output("scanned", shape=[8, 8])
    b.output("rows")
    model = b.model()
    reasons = _frozen_reasons(model)
    # The bodies are walked (ops/control_flow.py); a state whose shape the body leaves undeclared
    # cannot be followed, and the group freezes naming it.
    assert "size of axis 1 of s_in is unknown" in reasons
    assert not onnxprune.analyze(model).prunable
    result = onnxprune.prune(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.channels_removed == 0


def test_sparse_initializer_is_refused(tmp_path, capsys):
    model = small_cnn()
    w = model.graph.initializer[0]
    flat = numpy_helper.to_array(w).reshape(-1)
    idx = np.flatnonzero(flat)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], w.name),
                                       numpy_helper.from_array(idx.astype(np.int64), w.name + "_idx"), list(w.dims))
    del model.graph.initializer[0]
    model.graph.sparse_initializer.append(sparse)
    onnx.checker.check_model(model)
    path = save(model, tmp_path / "sparse.onnx")
    assert_refused(["prune", path, "-o", tmp_path / "o.onnx"], "sparse initializer", capsys, tmp_path)
    with pytest.raises(InputError, match="sparse"):
        onnxprune.analyze(model)


def test_initializer_listed_as_graph_input_is_frozen():
    model = small_cnn()
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    onnx.checker.check_model(model, full_check=True)
    assert f"{weight.name} is a graph input" in _frozen_reasons(model)
    result = _prune_checked(model)
    names = [i.name for i in result.model.graph.input]
    assert weight.name in names
    sliced = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert sliced[weight.name] == list(weight.dims)


def test_weight_shared_by_two_convs_prunes_consistently():
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    w = b.weight([8, 3, 3, 3])
    a = b.op("Relu", [b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    c = b.op("Relu", [b.op("Conv", [b.op("Neg", [x]), w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    y1 = b.conv(a, 8, 4)
    b.nodes[-1].output[0] = "y1"
    y2 = b.conv(c, 8, 4)
    b.nodes[-1].output[0] = "y2"
    b.output("y1", shape=[1, 4, 8, 8])
    b.output("y2", shape=[1, 4, 8, 8])
    model = b.model()
    result = _prune_checked(model)
    assert result.report.channels_removed > 0
    dims = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert dims[w][0] < 8


def test_weight_shared_across_incompatible_axes_is_never_corrupted():
    """One constant is a Conv weight and also added to an activation on another axis."""
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    w = b.const(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "shared")
    h = b.op("Relu", [b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    corner = b.op("Slice", [x, b.const(np.array([0, 0], np.int64)), b.const(np.array([3, 3], np.int64)),
                            b.const(np.array([2, 3], np.int64))])
    side = b.op("Add", [corner, w])  # [1,3,3,3] + [8,3,3,3]: the weight's rows become a graph output
    y = b.conv(h, 8, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 8, 8])
    b.output(side, shape=[8, 3, 3, 3])
    model = b.model()
    assert "graph input or output" in _frozen_reasons(model)
    result = onnxprune.prune(model)
    assert_matches_masked(model, result)
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    kept = {t.name: t for t in result.model.graph.initializer}[add.input[1]]
    original = {t.name: t for t in model.graph.initializer}[w]
    assert numpy_helper.to_array(kept).tobytes() == numpy_helper.to_array(original).tobytes()


# --- dtypes -----------------------------------------------------------------------------------

def _cast_model(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """The same model with every float tensor stored as `elem` (fp16 or bf16)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            new = (helper.make_tensor(init.name, elem, arr.shape, arr.reshape(-1).tolist()) if elem == TensorProto.BFLOAT16
                   else numpy_helper.from_array(arr.astype(np.float16), init.name))
            init.CopyFrom(new)
    for vi in list(out.graph.input) + list(out.graph.output):
        vi.type.tensor_type.elem_type = elem
    del out.graph.value_info[:]
    if elem == TensorProto.BFLOAT16:  # Conv and MaxPool accept bf16 from opset 22
        out.opset_import[0].version = 22
    return out


def _kept_slices_match(original: onnx.ModelProto, pruned: onnx.ModelProto, analysis, units):
    """Every sliced initializer keeps exactly the original bytes of its kept elements."""
    from onnxprune.passes.rewrite import removed_elements

    removed = removed_elements(analysis, units)
    before = {t.name: t for t in original.graph.initializer}
    after = {t.name: t for t in pruned.graph.initializer}
    checked = 0
    for name, tensor in after.items():
        if name not in before:
            continue
        assert tensor.data_type == before[name].data_type
        old = numpy_helper.to_array(before[name])
        for (slot_name, axis), gone in removed.items():
            if slot_name == name:
                old = np.delete(old, gone, axis=axis)
        new = numpy_helper.to_array(tensor)
        assert new.dtype == old.dtype and new.shape == old.shape
        assert new.tobytes() == old.tobytes()
        checked += int(list(tensor.dims) != list(before[name].dims))
    assert checked > 0


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["fp16", "bf16"])
def test_half_precision_weights_are_sliced_bit_exactly(elem):
    model = _cast_model(small_cnn(), elem)
    onnx.checker.check_model(model, full_check=True)
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    analysis = onnxprune.analyze(model)
    _kept_slices_match(model, result.model, analysis, result.plan.resolve(analysis))
    if elem == TensorProto.FLOAT16:  # ONNX Runtime's CPU provider has fp16 kernels, not bf16 ones
        assert_matches_masked(model, result, rtol=2e-2, atol=2e-2)


def _qdq_model() -> onnx.ModelProto:
    """int8 weights behind DequantizeLinear, activations through Quantize/DequantizeLinear pairs."""
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    rng = np.random.default_rng(0)
    wq = b.const(rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "wq")
    ws = b.const((rng.random(8) * 0.01 + 0.001).astype(np.float32), "ws")
    wz = b.const(np.zeros(8, np.int8), "wz")
    w = b.op("DequantizeLinear", [wq, ws, wz], axis=0)
    h = b.op("Relu", [b.op("Conv", [x, w, b.weight([8], "b")], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    s, z = b.const(np.array(0.05, np.float32), "s"), b.const(np.array(0, np.uint8), "z")
    h = b.op("DequantizeLinear", [b.op("QuantizeLinear", [h, s, z]), s, z])
    b.conv(h, 8, 4)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4, 8, 8])
    return b.model()


def _qlinear_model() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8], "x", TensorProto.UINT8)
    rng = np.random.default_rng(0)
    s, z = b.const(np.array(0.02, np.float32), "s"), b.const(np.array(128, np.uint8), "z")
    wq = b.const(rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "wq")
    ws, wz = b.const(np.array(0.01, np.float32), "ws"), b.const(np.array(0, np.int8), "wz")
    h = b.op("QLinearConv", [x, s, z, wq, ws, wz, s, z], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    wq2 = b.const(rng.integers(-100, 100, (4, 8, 1, 1)).astype(np.int8), "wq2")
    b.op("QLinearConv", [h, s, z, wq2, ws, wz, s, z], kernel_shape=[1, 1])
    b.nodes[-1].output[0] = "y"
    b.output("y", TensorProto.UINT8, shape=[1, 4, 8, 8])
    return b.model()


def _integer_model() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8], "x", TensorProto.UINT8)
    rng = np.random.default_rng(0)
    w = b.const(rng.integers(0, 50, (8, 3, 3, 3)).astype(np.uint8), "w")
    h = b.op("ConvInteger", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    f = b.op("Cast", [h], to=TensorProto.FLOAT)
    b.op("Relu", [f])
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 8, 8, 8])
    return b.model()


@pytest.mark.parametrize("make", [_qdq_model, _qlinear_model, _integer_model], ids=["qdq", "qlinear", "integer"])
def test_quantized_models_are_frozen_never_corrupted(make):
    model = make()
    analysis = onnxprune.analyze(model)
    assert not analysis.prunable, "quantized channels must stay frozen"
    assert _frozen_reasons(model)
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    after = {t.name: t.SerializeToString() for t in result.model.graph.initializer}
    assert after == before
    from onnxprune.verify import random_inputs, session
    feeds = random_inputs(model)
    for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
        np.testing.assert_array_equal(a, b)


# --- dynamic and symbolic dims ----------------------------------------------------------------

def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in vi.type.tensor_type.shape.dim]


def test_symbolic_and_dynamic_dims_survive_pruning():
    b = GraphBuilder()
    x = b.input(["batch", 3, "height", None])
    h = b.op("Relu", [b.bn(b.conv(x, 3, 8), 8)])
    h = b.op("Add", [h, b.op("Relu", [b.conv(h, 8, 8)])])
    g = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    b.gemm(g, 8, 5)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=["batch", 5])
    model = b.model()
    result = _prune_checked(model)
    assert result.report.channels_removed > 0
    assert [_dims(v) for v in result.model.graph.input] == [_dims(v) for v in model.graph.input]
    assert [_dims(v) for v in result.model.graph.output] == [_dims(v) for v in model.graph.output]
    from onnxprune.verify import session
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 3, 5, 7)).astype(np.float32)}
    assert session(result.model).run(None, feeds)[0].shape == (3, 5)


# --- outputs: same file, missing or read-only directory, disk full ------------------------------

@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_output_equal_to_input_is_refused(how, tmp_path, capsys):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = {"same": path, "symlink": tmp_path / "link.onnx", "hardlink": tmp_path / "hard.onnx",
           "dotted": f"{tmp_path}/sub/../m.onnx"}[how]  # pathlib would drop a "." itself
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        out.symlink_to(path)
    elif how == "hardlink":
        os.link(path, out)
    assert_refused(["prune", path, "-o", out], "overwrite the input", capsys, tmp_path)


@pytest.mark.parametrize("flag", ["--report", "--save-plan"])
def test_side_output_equal_to_input_is_refused(flag, tmp_path, capsys):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    assert_refused(["prune", path, "-o", out, flag, path], "would overwrite the input", capsys, tmp_path, out)


def test_output_directory_missing_is_refused(tmp_path, capsys):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "missing" / "o.onnx"
    assert_refused(["prune", path, "-o", out], "does not exist", capsys, tmp_path, out)


def test_output_directory_read_only_is_refused(tmp_path, capsys, monkeypatch):
    path = save(small_cnn(), tmp_path / "m.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: make the OS refuse as it would
            import tempfile
            monkeypatch.setattr(os, "access", lambda *a, **k: True)

            def refuse(*a, **k):
                raise PermissionError(errno.EACCES, "Permission denied")
            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        out = ro / "o.onnx"
        err = assert_refused(["prune", path, "-o", out], str(ro), capsys, tmp_path, out)
        assert "writ" in err or "Permission" in err
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)


def _fail_fsync_after(monkeypatch, calls_ok: int):
    """The OS reports a full disk at the (calls_ok+1)-th fsync of a regular file."""
    real = os.fsync
    count = {"n": 0}

    def fsync(fd):
        import stat
        if stat.S_ISREG(os.fstat(fd).st_mode):
            count["n"] += 1
            if count["n"] > calls_ok:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("external,calls_ok", [(False, 0), (True, 0), (True, 1)],
                         ids=["model", "data-file", "model-after-data"])
def test_disk_full_leaves_previous_output_intact(external, calls_ok, tmp_path, capsys, monkeypatch):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    args = ["prune", path, "-o", out] + (["--save-external-data"] if external else [])
    assert run(args + ["--ratio", "0.25"], capsys)[0] == 0
    before = snapshot(tmp_path)
    _fail_fsync_after(monkeypatch, calls_ok)
    code, _, err = run(args, capsys)
    monkeypatch.undo()
    assert code == 2 and "No space left" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"
    onnxprune.analyze(str(out))  # the previous output still loads, data file included


def test_failed_model_rename_restores_the_previous_data_file(tmp_path, capsys, monkeypatch):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    args = ["prune", path, "-o", out, "--save-external-data"]
    assert run(args + ["--ratio", "0.25"], capsys)[0] == 0
    before = snapshot(tmp_path)
    real = os.replace

    def replace(src, dst, *a, **k):
        if os.fspath(dst).endswith("o.onnx"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run(args, capsys)
    monkeypatch.undo()
    assert code == 2 and "Input/output error" in err
    assert snapshot(tmp_path) == before
    onnxprune.analyze(str(out))


# --- reproducible output ----------------------------------------------------------------------

@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_same_input_options_and_seed_give_identical_bytes(external, tmp_path, capsys):
    path = _external_model(tmp_path) if external else save(small_cnn(), tmp_path / "m.onnx")
    outputs = []
    for k in range(2):
        d = tmp_path / f"run{k}"
        d.mkdir()
        args = ["prune", path, "-o", d / "p.onnx", "--criterion", "random", "--seed", "7", "--ratio", "0.4"]
        args += ["--save-external-data", "p.data"] if external else []
        assert run(args, capsys)[0] == 0
        outputs.append(snapshot(d))
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == ({"p.onnx", "p.data"} if external else {"p.onnx"})
    d = tmp_path / "other"  # the comparison can fail: another seed removes other channels
    d.mkdir()
    args = ["prune", path, "-o", d / "p.onnx", "--criterion", "random", "--seed", "8", "--ratio", "0.4"]
    assert run(args + (["--save-external-data", "p.data"] if external else []), capsys)[0] == 0
    assert snapshot(d) != outputs[0]


def test_data_file_is_renamed_before_the_model(tmp_path, capsys, monkeypatch):
    path = save(small_cnn(), tmp_path / "m.onnx")
    renamed: list[str] = []
    real = os.replace

    def replace(src, dst, *a, **k):
        renamed.append(Path(dst).name)
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    assert run(["prune", path, "-o", tmp_path / "o.onnx", "--save-external-data", "o.bin"], capsys)[0] == 0
    assert renamed == ["o.bin", "o.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_without_any_channel_is_copied_unchanged(tmp_path, capsys):
    b = GraphBuilder()
    b.op("Relu", [b.input([1, 4])])
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 4])
    model = b.model()
    assert onnxprune.analyze(model).groups == []
    path = save(model, tmp_path / "m.onnx")
    code, _, err = run(["prune", path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 0, err
    assert onnx.load(tmp_path / "o.onnx").graph.node[0].op_type == "Relu"


def test_short_payload_inside_a_subgraph_is_refused(tmp_path, capsys):
    """A Constant in an If branch whose typed payload is shorter than its dims."""
    short = helper.make_tensor("tc", TensorProto.FLOAT, [64], [1.0] * 64)
    del short.float_data[32:]
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=short)], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [64])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        np.zeros(64, np.float32), "ec"))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [64])])
    b = GraphBuilder()
    b.nodes.append(helper.make_node("If", [b.input([], "cond", TensorProto.BOOL)], ["y"], name="branch",
                                    then_branch=then, else_branch=other))
    b.output("y", shape=[64])
    path = save(b.model(check=False), tmp_path / "m.onnx")
    assert_refused(["analyze", path], "holds 32 values in float_data, its dims need 64", capsys, tmp_path)
