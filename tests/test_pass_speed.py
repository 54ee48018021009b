"""Issue 7 (pass speed): the faster paths give the same results as the plain ones they replace.

- channel groups numbered from vectorised signatures = numbered from one tuple per component;
- initializers sliced with one keep mask per axis = successive np.delete;
- magnitude scores with |w| shared across a weight's axes = per-member sums;
- the ORT shape probe with narrowed weight MatMuls = a full run with the real weights;
- the probe runs reused after constant folding = probing the folded graph again.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_static_shapes import _full_run_shapes

from onnxprune import ir, static_shapes
from onnxprune.api import analyze, prune
from onnxprune.importance import ScoringContext, _sum_but, score_groups
from onnxprune.passes.dependency import _signature_groups, _signature_groups_exact
from onnxprune.passes.fold_constants import _refresh_shapes, fold_constants, folded_graph
from onnxprune.passes.rewrite import _without


def _components(rng: np.random.Generator, n_comp: int, n_slots: int, n_sigs: int) -> tuple[np.ndarray, np.ndarray]:
    """(comp_slot, starts) as `_groups` builds them: per component, a sorted set of slot ids, with
    components drawing their slot sets from `n_sigs` distinct signatures."""
    sigs = [np.sort(rng.choice(n_slots, size=rng.integers(1, min(n_slots, 6) + 1), replace=False))
            for _ in range(n_sigs)]
    chosen = [sigs[k] for k in rng.integers(0, n_sigs, size=n_comp)]
    lengths = np.array([len(s) for s in chosen])
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    return np.concatenate(chosen).astype(np.int64), starts.astype(np.int64)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_signature_groups_match_exact_tuples(seed):
    rng = np.random.default_rng(seed)
    comp_slot, starts = _components(rng, n_comp=400, n_slots=30, n_sigs=12)
    fast_gid, fast_first = _signature_groups(comp_slot, starts, 30)
    exact_gid, exact_first = _signature_groups_exact(comp_slot, starts)
    assert np.array_equal(fast_gid, exact_gid) and fast_first == exact_first
    assert fast_gid[0] == 0 and len(fast_first) == len(set(map(tuple, np.split(comp_slot, starts[1:]))))


def test_signature_groups_of_no_components():
    gid, first = _signature_groups(np.zeros(0, np.int64), np.zeros(0, np.int64), 1)
    assert len(gid) == 0 and first == []


def test_analysis_groups_unchanged_on_a_residual_cnn(tmp_path):
    """Groups of a model with shared (residual) channels: the vectorised numbering must give each
    group the same members and channel count as the exact path."""
    from builders import small_cnn

    analysis = analyze(small_cnn())
    for group in analysis.groups:
        units = np.concatenate([m.unit for m in group.members])
        assert set(units.tolist()) == set(range(group.size))  # every channel of the group appears
    keys = [g.key for g in analysis.groups]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("shape,axes", [((6, 5, 3, 3), (0, 1)), ((8, 12), (1,)), ((8, 12), (0, 1)),
                                        ((4, 6, 8, 10), (1, 3)), ((7,), (0,)), ((5, 4, 3), (2,))])
def test_slicing_with_keep_masks_equals_successive_deletes(shape, axes):
    rng = np.random.default_rng(0)
    array = rng.standard_normal(shape).astype(np.float32)
    removed = {axis: np.sort(rng.choice(shape[axis], shape[axis] // 2, replace=False)) for axis in axes}
    expected = array
    for axis in axes:
        expected = np.delete(expected, removed[axis], axis=axis)
    got = _without(array, removed)
    assert got.flags.c_contiguous and got.dtype == array.dtype
    assert got.shape == expected.shape and got.tobytes() == expected.tobytes()


def test_slicing_refuses_an_index_beyond_the_axis():
    with pytest.raises(IndexError):
        _without(np.zeros((3, 4), np.float32), {1: np.array([4])})


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (6, 5), (4, 3, 2, 5, 2), (7,)])
def test_sum_over_other_axes_matches_numpy(shape):
    rng = np.random.default_rng(1)
    magnitude = np.abs(rng.standard_normal(shape)).astype(np.float32)
    for axis in range(len(shape)):
        others = tuple(a for a in range(len(shape)) if a != axis)
        expected = magnitude.sum(axis=others, dtype=np.float64)
        np.testing.assert_allclose(_sum_but(magnitude, axis), expected, rtol=1e-13, atol=0)
        ints = np.round(magnitude * 8).astype(np.float32)  # exactly representable sums: bit-equal
        assert np.array_equal(_sum_but(ints, axis), ints.sum(axis=others, dtype=np.float64))


@pytest.mark.parametrize("criterion,power", [("l1", 1), ("l2", 2)])
def test_shared_magnitude_sums_give_the_per_member_scores(criterion, power):
    """A conv weight scored by its output group and by its input group: the cached per-axis sums
    equal a direct per-member computation (the definition of the criterion)."""
    from builders import small_cnn

    analysis = analyze(small_cnn())
    scores = score_groups(analysis, criterion)
    ctx = ScoringContext(analysis)
    assert scores
    for group in analysis.prunable:
        total = np.zeros(group.size)
        for member in group.weight_members():
            w = ctx.values(member.slot[0])
            others = tuple(a for a in range(w.ndim) if a != member.slot[1])
            per_elem = (np.abs(w) ** power).sum(axis=others)
            per_unit = np.bincount(member.unit, weights=per_elem[member.elem], minlength=group.size)
            per_unit = np.sqrt(per_unit) if power == 2 else per_unit
            total += per_unit / per_unit.mean() if per_unit.mean() > 0 else per_unit
        np.testing.assert_allclose(scores[group.id], total, rtol=1e-12)


def _batched_matmul_model() -> onnx.ModelProto:
    """x[B, S, 32] through two weight MatMuls (one weight read twice, once through a Transpose),
    a 1-D MatMul, and a Reshape whose target symbolic inference cannot follow (Where)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((48, 32)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "v"),
             numpy_helper.from_array(np.array([0, -1, 8], dtype=np.int64), "target")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"]),
             helper.make_node("Transpose", ["W2"], ["W2t"]),
             helper.make_node("MatMul", ["y", "W2t"], ["back"]),
             helper.make_node("MatMul", ["v", "W1"], ["row"]),  # 1-D input: [32] @ [32, 48] -> [48]
             helper.make_node("Shape", ["back"], ["shape"]),
             helper.make_node("Equal", ["shape", "shape"], ["same"]),
             helper.make_node("Where", ["same", "target", "shape"], ["new_shape"]),
             helper.make_node("Reshape", ["back", "new_shape"], ["out"])]
    graph = helper.make_graph(nodes, "batched", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("row", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_narrowed_probe_sees_the_shapes_of_a_run_with_the_real_weights():
    model = _batched_matmul_model()
    for sizes in static_shapes._PROBES:
        assert static_shapes._executed_shapes(model, onnx.ModelProto(), sizes) == _full_run_shapes(model, sizes)


def test_narrowing_rewrites_only_matmuls_by_a_zero_fed_weight():
    model = _batched_matmul_model()
    probe, stubs = static_shapes._probe_model(model)
    rows = static_shapes._narrow_weight_matmuls(probe, stubs)
    assert sorted(r.name for r in rows) == ["W1:onnxprune_row", "W2:onnxprune_row"]
    assert [list(r.dims) for r in sorted(rows, key=lambda r: r.name)] == [[1, 48], [1, 32]]
    ops = [n.op_type for n in probe.graph.node]
    assert ops.count("Slice") == 3 and ops.count("MatMul") == 4  # y @ W2t reads a computed tensor


def test_static_inputs_are_probed_once_and_dynamic_ones_twice():
    model = _batched_matmul_model()
    assert static_shapes._has_dynamic_inputs(model)
    static_shapes._pin_inputs(model, (4, 6))
    assert not static_shapes._has_dynamic_inputs(model)
    probes = static_shapes.ProbeRuns()
    shapes = ir.infer_shapes(model, resolve=True, probes=probes)
    assert list(probes.seen) == [static_shapes._PROBES[0]]  # one executed run serves both
    assert shapes["out"][1] == (4, 36, 8)  # [4, 6, 48] -> [0, -1, 8]


def _chunk_model() -> onnx.ModelProto:
    """A Slice whose bounds come from a constant shape subgraph (folded), after a Where-built
    Reshape (executed probe): folding runs and the refreshed shapes need the probe again."""
    base = _batched_matmul_model()
    inits = list(base.graph.initializer) + [
        numpy_helper.from_array(np.array([4, 8], dtype=np.int64), "dims"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis")]
    nodes = list(base.graph.node) + [
        helper.make_node("Gather", ["dims", "one"], ["half"]),  # folded: 8
        helper.make_node("Slice", ["out", "zero", "half", "axis"], ["chunk"])]
    graph = helper.make_graph(nodes, "chunk", list(base.graph.input),
                              [helper.make_tensor_value_info("chunk", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("row", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_probe_runs_reused_after_folding_give_the_same_shapes():
    model = _chunk_model()
    graph = folded_graph(model)  # probes shared by both inferences
    fresh = fold_constants(ir.to_graph(model), ir.opset_version(model))
    assert fresh.folded
    _refresh_shapes(fresh.graph, model)  # probed again from scratch
    cached = {name: t.shape for name, t in graph.tensors().items()}
    again = {name: t.shape for name, t in fresh.graph.tensors().items()}
    assert cached == again and cached["out"] == ["B", "6*S", 8]  # [B, S, 48] -> [0, -1, 8]


def test_a_probe_run_is_not_reused_for_a_graph_with_new_tensors():
    model = _batched_matmul_model()
    probes = static_shapes.ProbeRuns()
    ir.infer_shapes(model, resolve=True, probes=probes)
    assert probes.lookup(model, static_shapes._PROBES[0]) is not None
    model.graph.node.append(helper.make_node("Relu", ["out"], ["extra"]))
    assert probes.lookup(model, static_shapes._PROBES[0]) is None


def test_pruned_model_from_the_fast_paths_runs_and_checks(tmp_path):
    """End to end on a small CNN: checker-clean, same output shapes in ORT."""
    import onnxruntime as ort

    from builders import small_cnn

    model = small_cnn()
    result = prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(
        [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    after = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert [a.shape for a in before] == [b.shape for b in after]
    assert result.report.channels_removed > 0
