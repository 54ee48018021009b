"""The statistics pass: per-channel figures equal numpy on the same tensors, and shards merge exactly."""

import numpy as np
import onnx
import pytest

import onnxprune
from calib_models import conv_chain
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.importance import score_groups
from onnxprune.passes.stats import RowSource, Statistics, collect, conv_patches, expose_outputs, outputs_only
from onnxprune.verify import session


@pytest.fixture(scope="module")
def model():
    return conv_chain(constant=(2,))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).standard_normal((20, 3, 6, 6)).astype(np.float32)


def _relu_output(model):
    return next(n.output[0] for n in model.graph.node if n.op_type == "Relu")


def test_outputs_only_keeps_the_nodes_a_tensor_needs_and_its_values(model, images):
    name = _relu_output(model)
    cut = outputs_only(model, [name])
    assert [o.name for o in cut.graph.output] == [name]
    upstream = [n.op_type for n in model.graph.node][:[n.output[0] for n in model.graph.node].index(name) + 1]
    assert [n.op_type for n in cut.graph.node] == upstream and len(cut.graph.node) < len(model.graph.node)
    assert {t.name for t in cut.graph.initializer} <= {i for n in cut.graph.node for i in n.input}
    full = session(expose_outputs(model, [name])).run([name], {"x": images})[0]
    np.testing.assert_array_equal(session(cut).run(None, {"x": images})[0], full)


def test_outputs_only_keeps_what_an_if_branch_reads_from_outside():
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Relu", ["scaled"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Mul", ["x", "two"], ["scaled"]),  # read by the branch only
             helper.make_node("If", ["flag"], ["picked"], then_branch=branch, else_branch=branch),
             helper.make_node("Neg", ["picked"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])])
    cut = outputs_only(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["picked"])
    assert [n.op_type for n in cut.graph.node] == ["Mul", "If"] and [t.name for t in cut.graph.initializer] == ["two"]
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    np.testing.assert_array_equal(session(cut).run(None, {"x": x, "flag": np.array(True)})[0], np.maximum(2 * x, 0))


def test_activation_and_apoz_scores_equal_numpy_on_the_same_tensors(model, images):
    analysis = onnxprune.analyze(model)
    stats = collect(model, analysis, {"x": images}, quiet=True)
    name = _relu_output(model)
    act = session(expose_outputs(model, [name])).run([name], {"x": images})[0].astype(np.float64)
    per_channel = np.moveaxis(act, 1, 0).reshape(8, -1)
    s = stats.slots[(name, 1)]
    np.testing.assert_allclose(s.mean_abs, np.abs(per_channel).mean(1), rtol=1e-9)
    np.testing.assert_allclose(s.mean_sq, (per_channel ** 2).mean(1), rtol=1e-9)
    np.testing.assert_allclose(s.apoz, (per_channel == 0).mean(1))
    group = next(g for g in analysis.prunable if (name, 1) in {m.slot for m in g.members})
    activation = score_groups(analysis, "activation", stats=stats)[group.id]
    apoz = score_groups(analysis, "apoz", stats=stats)[group.id]
    expected = np.abs(per_channel).mean(1)
    np.testing.assert_allclose(activation, expected / expected.mean(), rtol=1e-9)
    np.testing.assert_allclose(apoz, 1 - (per_channel == 0).mean(1), rtol=1e-9)


def test_gram_equals_numpy_of_the_input_patches(model, images):
    analysis = onnxprune.analyze(model)
    stats = collect(model, analysis, {"x": images}, quiet=True)
    consumer = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    name = consumer.input[0]
    act = session(expose_outputs(model, [name])).run([name], {"x": images})[0].astype(np.float64)
    # patches by explicit loops: 3x3, no padding, stride 1 on 6x6 -> 4x4 positions
    rows = np.array([act[n, :, i:i + 3, j:j + 3].ravel() for n in range(len(act)) for i in range(4) for j in range(4)])
    rows = np.hstack([rows, np.ones((len(rows), 1))])
    np.testing.assert_allclose(stats.grams[consumer.name].gram[0], rows.T @ rows, rtol=1e-9, atol=1e-9)
    assert stats.grams[consumer.name].rows == len(rows)


def test_conv_patches_match_a_loop_with_padding_stride_and_groups():
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 5))
    src = RowSource("c", "Conv", "x", 2 * 9, groups=2, kernel=(3, 3), strides=(2, 2), dilations=(1, 1),
                    pads=(1, 1, 1, 1))
    got = conv_patches(x, src)
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    for g in range(2):
        want = [xp[n, 2 * g:2 * g + 2, i:i + 3, j:j + 3].ravel() for n in range(2) for i in (0, 2, 4) for j in (0, 2, 4)]
        np.testing.assert_allclose(got[g], np.array(want))


def test_merged_shards_equal_a_single_run(model, images, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "all.npz", x=images)
    np.savez(tmp_path / "a.npz", x=images[:7])
    np.savez(tmp_path / "b.npz", x=images[7:])
    for name in ("all", "a", "b"):
        assert main(["stats", str(path), "--data", str(tmp_path / f"{name}.npz"), "-o",
                     str(tmp_path / f"{name}.stats.npz"), "--quiet"]) == 0
    assert main(["stats", "merge", str(tmp_path / "a.stats.npz"), str(tmp_path / "b.stats.npz"), "-o",
                 str(tmp_path / "merged.npz")]) == 0
    single, merged = Statistics.load(tmp_path / "all.stats.npz"), Statistics.load(tmp_path / "merged.npz")
    assert merged.samples == single.samples == 20
    assert set(merged.slots) == set(single.slots) and set(merged.grams) == set(single.grams)
    for slot, s in single.slots.items():
        m = merged.slots[slot]
        assert m.count == s.count
        for field in ("sum", "abs", "sq", "zeros"):
            np.testing.assert_allclose(getattr(m, field), getattr(s, field), rtol=1e-10, atol=1e-9)
    for name, g in single.grams.items():
        np.testing.assert_allclose(merged.grams[name].gram, g.gram, rtol=1e-10, atol=1e-9)


def test_statistics_of_another_model_are_refused(model, images, tmp_path):
    stats = collect(model, onnxprune.analyze(model), {"x": images}, quiet=True)
    other = conv_chain(consumer_group=2)
    with pytest.raises(InputError, match="different model"):
        onnxprune.prune(other, stats=stats, criterion="activation")
    with pytest.raises(InputError, match="different models"):
        stats.merge(collect(other, onnxprune.analyze(other), {"x": images}, quiet=True))


def test_pruning_from_saved_statistics_alone(model, images, tmp_path):
    stats = collect(model, onnxprune.analyze(model), {"x": images}, quiet=True)
    stats.save(tmp_path / "s.npz")
    a = onnxprune.prune(model, stats=tmp_path / "s.npz", criterion="activation", recover="lstsq")
    b = onnxprune.prune(model, data={"x": images}, criterion="activation", recover="lstsq")
    assert a.plan.to_json() == b.plan.to_json()
    out_a, out_b = (session(r.model).run(None, {"x": images})[0] for r in (a, b))
    np.testing.assert_allclose(out_a, out_b, rtol=1e-6, atol=1e-6)
