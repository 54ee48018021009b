"""Scale: streamed reading/writing, in-place export, external data, checker by path, linear analysis.

Every model here is small; what is checked is that the memory-saving paths produce exactly the
model the plain onnx functions would (same bytes parsed, same outputs in ONNX Runtime).
"""

import numpy as np
import onnx
import onnxruntime
import pytest

import onnxprune
from builders import GraphBuilder, small_cnn
from onnxprune import ir
from onnxprune.cli import main
from onnxprune.passes import dependency
from onnxprune.streaming import read_model_file, serialized_size, write_model_file
from onnxprune.verify import random_inputs, session


def _outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def _deep_cnn(blocks: int, width: int = 8) -> onnx.ModelProto:
    b = GraphBuilder(seed=blocks)
    h = b.input([1, width, 6, 6])
    for _ in range(blocks):
        h = b.op("Relu", [b.bn(b.conv(h, width, width), width)])
    b.output(b.conv(h, width, 4), shape=[1, 4, 6, 6])
    return b.model()


def test_streamed_read_and_write_match_onnx(tmp_path):
    model = small_cnn()
    big = onnx.numpy_helper.from_array(np.arange(40000, dtype=np.float32), "unused_big")  # > 64 KiB
    model.graph.initializer.append(big)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    loaded = read_model_file(path)
    assert loaded == onnx.load(str(path))
    assert serialized_size(loaded) == loaded.ByteSize()
    with open(tmp_path / "w.onnx", "wb") as fh:
        write_model_file(loaded, fh)
    assert onnx.load(str(tmp_path / "w.onnx")) == model
    feeds = random_inputs(model)  # ONNX Runtime's own parser reads the streamed layout too
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as `session`
    by_path = onnxruntime.InferenceSession(str(tmp_path / "w.onnx"), options, providers=["CPUExecutionProvider"])
    for x, y in zip(by_path.run(None, feeds), _outputs(model, feeds)):
        np.testing.assert_array_equal(x, y)


def test_prune_from_path_equals_prune_from_proto(tmp_path):
    """The path route exports into the loaded proto; it must give the copying export's model."""
    model = small_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    from_proto = onnxprune.prune(model, ratio=0.5)
    from_path = onnxprune.prune(str(path), ratio=0.5)
    assert from_path.plan.to_json() == from_proto.plan.to_json()
    inits = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = inits(from_proto.model), inits(from_path.model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    feeds = random_inputs(model)
    for x, y in zip(_outputs(from_proto.model, feeds), _outputs(from_path.model, feeds)):
        np.testing.assert_array_equal(x, y)
    assert from_path.report.before.params == from_proto.report.before.params
    assert onnx.load(str(path)) == model  # the file is never touched


@pytest.mark.parametrize("data_name", [True, "weights.bin"])
def test_external_data_round_trip(tmp_path, data_name):
    model = small_cnn()
    result = onnxprune.prune(model, ratio=0.5)
    out = tmp_path / "pruned.onnx"
    result.save(out, external_data=data_name)
    data = tmp_path / (data_name if isinstance(data_name, str) else "pruned.onnx.data")
    assert data.is_file() and data.stat().st_size > 0
    skeleton = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    feeds = random_inputs(model)
    for x, y in zip(_outputs(result.model, feeds), _outputs(ir.load_model(out), feeds)):
        np.testing.assert_array_equal(x, y)
    again = onnxprune.prune(out, ratio=0.0)  # an external-data model is valid input too
    assert again.report.before.params == result.report.after.params


def test_external_data_file_is_fresh_never_appended(tmp_path):
    result = onnxprune.prune(small_cnn(), ratio=0.5)
    out, data = tmp_path / "p.onnx", tmp_path / "p.onnx.data"
    data.write_bytes(b"\xff" * 1_000_000)  # a stale, larger data file from an earlier run
    result.save(out, external_data=True)
    first = data.read_bytes()
    assert len(first) < 1_000_000 and b"\xff" * 64 not in first
    result.save(out, external_data=True)
    assert data.read_bytes() == first
    onnx.checker.check_model(str(out), full_check=True)


def test_cli_save_external_data(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(small_cnn(), str(src))
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--save-external-data", "w.bin"]) == 0
    assert (tmp_path / "w.bin").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    assert main(["prune", str(src), "-o", str(tmp_path / "o2.onnx"), "--save-external-data", "../w.bin"]) == 2


def test_models_above_the_protobuf_limit_get_external_data(tmp_path, monkeypatch):
    """Above the limit a single file cannot hold the model; the limit is lowered to test the switch."""
    result = onnxprune.prune(small_cnn(), ratio=0.5)
    monkeypatch.setattr(ir, "PROTOBUF_LIMIT", 64 << 20)  # the switch leaves 64 MiB of headroom
    out = tmp_path / "p.onnx"
    result.save(out)
    assert (tmp_path / "p.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)


def test_checker_by_path_still_rejects_bad_payloads():
    model = small_cnn()
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    assert len(weight.raw_data) >= 1024  # large enough to be a stand-in in the checked copy
    weight.raw_data = weight.raw_data[:-4]
    with pytest.raises(onnx.checker.ValidationError, match="raw_data size"):
        ir.check_model(model)
    model = small_cnn()
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        ir.check_model(model)


def test_analysis_work_grows_linearly(monkeypatch):
    """Rule look-ups (the analysis' unit of work) for 10x the depth stay within ~10x."""
    calls = {"n": 0}
    lookup = dependency.rule_for

    def counting(node, opset):
        calls["n"] += 1
        return lookup(node, opset)

    monkeypatch.setattr(dependency, "rule_for", counting)
    counts = []
    for blocks in (4, 40):
        calls["n"] = 0
        analysis = onnxprune.analyze(_deep_cnn(blocks))
        assert len(analysis.prunable) == blocks
        counts.append(calls["n"])
    assert counts[1] <= 10.5 * counts[0], counts
