"""Regression tests for review findings on graph naming, Gemm biases, rewrite errors and CLI checks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxprune
from builders import GraphBuilder


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _gemm_row_bias_model():
    """Gemm whose C is (M, N): one bias per batch row and feature, so no per-feature constant."""
    b = GraphBuilder(seed=3)
    x = b.input([2, 4])
    h = b.op("Gemm", [x, b.weight([6, 4]), b.weight([2, 6], "b")], transB=1)
    r = b.op("Relu", [h])
    y = b.op("Gemm", [r, b.weight([3, 6]), b.weight([3], "b")], transB=1)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[2, 3])
    return b.model()


def test_gemm_row_bias_lossless_does_not_crash():
    model = _gemm_row_bias_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    result = onnxprune.prune(model, lossless=True)
    np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], atol=1e-5)


def _digits(strip: str):
    """The bundled digits CNN with node names emptied ("empty"), all set to one name ("same") or kept."""
    import onnx
    from importlib.resources import files

    model = onnx.load(str(files("onnxprune") / "data" / "digits_cnn.onnx"))
    for node in model.graph.node if strip != "keep" else []:
        node.name = "" if strip == "empty" else "n"
    return model, str(files("onnxprune") / "data" / "digits_calib.npz")


def test_unnamed_nodes_prune_with_lstsq():
    model, calib = _digits("empty")
    result = onnxprune.prune(model, ratio=0.3, recover="lstsq", data=calib)
    names = [n.name for n in result.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    feeds = dict(np.load(calib))
    inp = model.graph.input[0].name
    x = feeds[inp][:4] if inp in feeds else next(iter(feeds.values()))[:4]
    assert np.isfinite(_run(result.model, {inp: x})[0]).all()


def test_node_naming_is_deterministic_and_keeps_unique_names():
    from onnxprune.ir import to_graph

    model, _ = _digits("empty")
    model.graph.node[0].name = "Conv_1"  # a real name that collides with a generated one
    first = [n.name for n in to_graph(model).nodes]
    assert first == [n.name for n in to_graph(model).nodes]
    assert first[0] == "Conv_1" and len(set(first)) == len(first)


def test_duplicate_node_names_become_unique():
    from onnxprune.ir import to_graph

    model, _ = _digits("same")  # ONNX Runtime refuses such a model; the analysis must not mix nodes up
    names = [n.name for n in to_graph(model).nodes]
    assert names[0] == "n" and len(set(names)) == len(names)


def test_rule_failure_names_op_and_node():
    from onnxprune.errors import InternalError, OnnxPruneError
    from onnxprune.ir import to_graph
    from onnxprune.ops.base import OpRule
    from onnxprune.passes.rewrite import node_context

    class Broken(OpRule):
        def update(self, v, edit) -> None:
            raise ValueError("bad shape")

    graph = to_graph(_gemm_row_bias_model())
    node = graph.nodes[0]
    with pytest.raises(InternalError, match=rf"internal error while rewriting Gemm '{node.name}': ValueError: bad shape") as info:
        with node_context(node):
            Broken().update(None, None)
    assert isinstance(info.value, OnnxPruneError) and isinstance(info.value.__cause__, ValueError)


def test_apply_fits_failure_names_node():
    from onnxprune.errors import InternalError
    from onnxprune.ir import to_graph
    from onnxprune.passes.recover import Fit, apply_fits

    graph = to_graph(_gemm_row_bias_model())
    node = graph.nodes[0]
    fit = Fit(node=node.name, op="Gemm", weight=np.zeros((4, 6), np.float32), bias=np.zeros(6, np.float32),
              kept_outputs=np.array([0, 9]))  # out of range: a bug in the fit, reported against its node
    with pytest.raises(InternalError, match=rf"Gemm '{node.name}'"):
        apply_fits(graph, [fit])


def test_exclude_pattern_matching_no_node_is_refused(tmp_path, capsys):
    import onnx

    from onnxprune.cli import main
    from onnxprune.errors import InputError

    model = _gemm_row_bias_model()
    with pytest.raises(InputError, match="--exclude 'typo_conv' matches no node"):
        onnxprune.prune(model, ratio=0.5, exclude=["Gemm*", "typo_conv"])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main(["analyze", str(path), "--exclude", "typo_conv"]) == 2
    err = capsys.readouterr().err
    assert "typo_conv" in err and len(err.strip().splitlines()) == 1
    onnxprune.prune(model, ratio=0.5, exclude=["Gemm*"])  # a matching pattern still works


def _mlp():
    b = GraphBuilder(seed=5)
    h = b.op("Relu", [b.gemm(b.input([1, 4]), 4, 6)])
    h = b.op("Relu", [b.gemm(h, 6, 6)])
    b.gemm(h, 6, 3)
    b.nodes[-1].output[0] = "y"
    b.output("y", shape=[1, 3])
    return b.model()


def test_global_ranking_keeps_order_of_negative_scores():
    from onnxprune.plan import _global_order, global_plan, normalise_scores

    analysis = onnxprune.analyze(_mlp())
    groups = analysis.prunable
    assert len(groups) == 2
    neg = -np.arange(1.0, 7.0)  # a custom criterion with a negative mean: channel 5 is the least important
    scores = {groups[0].id: neg, groups[1].id: np.arange(1.0, 7.0) * 100}
    plan = global_plan(analysis, scores, ratio=0.25)
    removed = {g.key: g.remove for g in plan.groups}
    assert removed[groups[0].key] == [3, 4, 5]
    owner, channel = _global_order(groups, scores)
    assert list(zip(owner[:3], channel[:3])) == [(0, 5), (0, 4), (0, 3)]
    assert np.array_equal(normalise_scores(np.zeros(3)), np.zeros(3))


@pytest.mark.parametrize("argv", [
    ["stats", "{model}", "--data", "{data}", "-o", "{model}"],
    ["stats", "{model}", "--data", "{data}", "-o", "{data}"],
    ["sensitivity", "{model}", "--data", "{data}", "--json", "{data}"],
    ["sensitivity", "{model}", "--data", "{data}", "--plot", "{model}"],
])
def test_data_commands_refuse_overwriting_inputs(tmp_path, capsys, argv):
    import shutil

    import onnx

    from onnxprune.cli import main

    model, calib = _digits("keep")
    shutil.copy(calib, tmp_path / "calib.npz")
    onnx.save(model, str(tmp_path / "m.onnx"))
    paths = {"model": str(tmp_path / "m.onnx"), "data": str(tmp_path / "calib.npz")}
    before = {k: open(v, "rb").read() for k, v in paths.items()}
    assert main([a.format(**paths) for a in argv]) == 2
    assert "would overwrite an input file" in capsys.readouterr().err
    assert before == {k: open(v, "rb").read() for k, v in paths.items()}


def test_stats_of_another_checkpoint_are_refused(tmp_path):
    from onnxprune.errors import InputError
    from onnxprune.passes.stats import Statistics, check_matches, collect

    model, calib = _digits("keep")
    stats = collect(model, onnxprune.analyze(model), calib, grams=False, quiet=True)
    check_matches(stats, model)
    other = type(model)()
    other.CopyFrom(model)
    init = max(other.graph.initializer, key=lambda t: len(t.raw_data) or 0)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[len(arr.flat) // 2] += 1.0  # one value of one weight: a different checkpoint
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    with pytest.raises(InputError, match="fingerprint mismatch"):
        check_matches(stats, other)
    with pytest.raises(InputError, match="fingerprint mismatch"):
        onnxprune.prune(other, ratio=0.3, data=calib, stats=stats)
    old = Statistics("0123456789abcdef", stats.samples, stats.slots, stats.grams)  # a pre-weight-fingerprint file
    old.save(tmp_path / "old.npz")
    with pytest.raises(InputError, match="recompute"):
        check_matches(Statistics.load(tmp_path / "old.npz"), model)


def test_cost_model_walks_the_graph_once(monkeypatch):
    from onnxprune.cost import CostModel

    analysis = onnxprune.analyze(_mlp())
    real, calls = analysis.graph.tensors, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis.graph, "tensors", counted)  # a spy on the real graph, not a mock
    cost = CostModel(analysis)
    assert len(calls) == 1
    group = analysis.prunable[0]
    macs, params = cost.evaluate({group.id: np.array([0, 1, 2])})
    assert 0 < macs < 1 and 0 < params < 1 and cost.evaluate({}) == (1.0, 1.0)


def test_root_usage_error_names_the_command_once(capsys):
    from onnxprune.cli import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "(see onnxprune --help)" in err and "onnxprune onnxprune" not in err
    assert main(["prune"]) == 2
    assert "(see onnxprune prune --help)" in capsys.readouterr().err


def test_config_round_to_bad_value_names_the_key(tmp_path, capsys):
    import json

    import onnx

    from onnxprune.cli import main

    onnx.save(_mlp(), str(tmp_path / "m.onnx"))
    (tmp_path / "c.json").write_text(json.dumps({"round_to": "abc"}))
    code = main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--config", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert code == 2 and "'round_to'" in err and "could not process" not in err


def test_analyze_cli_accepts_prune_hidden(tmp_path, capsys):
    import json

    import onnx

    from onnxprune.cli import main
    from test_attention import transformer_block

    onnx.save(transformer_block(), str(tmp_path / "t.onnx"))
    frozen = {}
    for flag in ([], ["--prune-hidden"]):
        out = tmp_path / f"a{len(flag)}.json"
        assert main(["analyze", str(tmp_path / "t.onnx"), "--json", str(out), *flag]) == 0
        frozen[bool(flag)] = json.dumps(json.loads(out.read_text())).count("prune_hidden=True")
    capsys.readouterr()
    assert frozen[False] > 0 and frozen[True] == 0
