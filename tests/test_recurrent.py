"""LSTM, GRU and RNN hidden units as channel groups, on tiny onnx.helper models.

Each model is input → MatMul (its features feed the recurrent op's W columns) → recurrent op →
Transpose/Reshape → MatMul, plus a head on Y_h. Pruned at ratio 0.5, it must pass the full checker
and equal the consumer-masked reference in ORT. For a recurrent op the hidden units are also their
own consumers (the columns of R), so the reference zeroes those columns too: every kept unit then
computes exactly what the pruned model computes.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxprune
from builders import GraphBuilder
from onnxprune.ir import ModelMeta, from_graph, to_graph
from onnxprune.passes.fold_constants import fold_constants, folded_graph
from onnxprune.passes.rewrite import removed_elements
from onnxprune.plan import GroupPlan
from onnxprune.verify import random_inputs, session
from reference import masked_reference

T, BATCH, FEATURES, IN, H = 4, 2, 3, 5, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
CANDIDATE = {"LSTM": 3, "GRU": 2, "RNN": 0}


def zero_candidate(w: np.ndarray, r: np.ndarray, bias: np.ndarray, op: str, hidden: int, units,
                   direction: "int | slice" = slice(None)) -> None:
    """Kill `units` of `direction` (default: every direction) in place: zero their candidate-gate
    rows of W and R and their two candidate biases, so their state stays 0 from a zero start."""
    g, c = GATES[op], CANDIDATE[op]
    rows = [c * hidden + u for u in units]
    w[direction, rows] = r[direction, rows] = 0
    bias[direction, rows + [(g + c) * hidden + u for u in units]] = 0


def recurrent_model(op: str, direction: str = "forward", *, bias: bool = True, states: bool = False,
                    peephole: bool = False, seq_lens: bool = False, layout: int = 0, seed: int = 0,
                    hidden: int = H, dead: tuple[int, ...] = (), **attrs) -> onnx.ModelProto:
    """x → MatMul → op → (Transpose) → Reshape → MatMul → y, and Y_h → Transpose → Reshape → Gemm → yh.

    `dead` units get zero candidate-gate rows and biases in every direction (their state stays 0).
    """
    d, g = (2 if direction == "bidirectional" else 1), GATES[op]
    b = GraphBuilder(seed=seed, opset=14 if layout else 17)
    seq_shape = [T, BATCH, FEATURES] if layout == 0 else [BATCH, T, FEATURES]
    x = b.op("MatMul", [b.input(seq_shape), b.weight([FEATURES, IN])])
    w = (b.rng.standard_normal([d, g * hidden, IN]) * 0.5).astype(np.float32)
    r = (b.rng.standard_normal([d, g * hidden, hidden]) * 0.5).astype(np.float32)
    bb = (b.rng.standard_normal([d, 2 * g * hidden]) * 0.5).astype(np.float32)
    zero_candidate(w, r, bb, op, hidden, dead)
    inputs = [x, b.const(w, "W"), b.const(r, "R"), b.const(bb, "B") if bias else ""]
    state_shape = [d, BATCH, hidden] if layout == 0 else [BATCH, d, hidden]
    inputs.append(b.const(np.array([T, T - 1] * (BATCH // 2), np.int32), "seq") if seq_lens else "")
    inputs.append(b.weight(state_shape, "h0") if states else "")
    n_out = 2
    if op == "LSTM":
        inputs.append(b.weight(state_shape, "c0") if states else "")
        inputs.append(b.weight([d, 3 * hidden], "P") if peephole else "")
        n_out = 3
    while inputs and inputs[-1] == "":
        inputs.pop()
    outs = b.op(op, inputs, n_out=n_out, hidden_size=hidden, direction=direction,
                **({"layout": layout} if layout else {}), **attrs)
    y, yh = outs[0], outs[1]
    if layout == 0:
        y = b.op("Transpose", [y], perm=[0, 2, 1, 3])
        yh = b.op("Transpose", [yh], perm=[1, 0, 2])
    y = b.op("Reshape", [y, b.const(np.array([0, 0, -1], np.int64))])
    b.op("MatMul", [y, b.weight([d * hidden, 3])])
    b.nodes[-1].output[0] = "y"
    yh = b.op("Reshape", [yh, b.const(np.array([0, -1], np.int64))])
    b.gemm(yh, d * hidden, 2)
    b.nodes[-1].output[0] = "yh"
    b.output("y")
    b.output("yh")
    return b.model()


def recurrent_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in GATES)


def hidden_size(model: onnx.ModelProto) -> int:
    node = recurrent_node(model)
    return next(a.i for a in node.attribute if a.name == "hidden_size")


def hidden_sizes(model: onnx.ModelProto) -> list[int]:
    """`hidden_size` of every recurrent op, in graph order."""
    return [a.i for n in model.graph.node if n.op_type in GATES for a in n.attribute if a.name == "hidden_size"]


def masked_recurrent_reference(model: onnx.ModelProto, result: onnxprune.PruneResult) -> onnx.ModelProto:
    """The consumer-masked reference, plus the removed units' columns of R zeroed."""
    masked = masked_reference(model, result)
    analysis = onnxprune.analyze(model)
    removed = removed_elements(analysis, result.plan.resolve(analysis))
    for node in masked.graph.node:
        if node.op_type not in GATES:
            continue
        init = next(t for t in masked.graph.initializer if t.name == node.input[2])
        arr = numpy_helper.to_array(init).copy()
        arr[:, :, removed.get((node.input[2], 2), [])] = 0  # plain slot: unit j of every direction
        for e in removed.get((node.input[2], (0, 2)), []):  # paired slot: element d*H + j
            arr[e // arr.shape[2], :, e % arr.shape[2]] = 0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return masked


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """ORT, or ONNX's reference evaluator for layout 1 (which ORT's CPU kernels reject)."""
    if any(a.name == "layout" and a.i == 1 for a in recurrent_node(model).attribute):
        return ReferenceEvaluator(model).run(None, feeds)
    return session(model).run(None, feeds)


def assert_matches_recurrent_reference(model: onnx.ModelProto, result: onnxprune.PruneResult) -> None:
    onnx.checker.check_model(result.model, full_check=True)
    reference = masked_recurrent_reference(model, result)
    for seed in (0, 1):
        feeds = random_inputs(model, seed)
        want = run(reference, feeds)
        got = run(result.model, feeds)
        orig = run(model, feeds)
        for w, o, g in zip(want, got, orig):
            assert o.shape == g.shape
            np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-5)


def prune_half(model: onnx.ModelProto, **kw) -> onnxprune.PruneResult:
    result = onnxprune.prune(model, ratio=0.5, **kw)
    assert hidden_size(result.model) == H - H // 2
    assert_matches_recurrent_reference(model, result)
    return result


CASES = [(op, direction, bias) for op in GATES for direction in ("forward", "reverse", "bidirectional")
         for bias in (True, False)]


@pytest.mark.parametrize("op,direction,bias", CASES)
def test_units_prune_like_masked_reference(op, direction, bias):
    prune_half(recurrent_model(op, direction, bias=bias))


@pytest.mark.parametrize("op,direction", list(itertools.product(GATES, ("forward", "bidirectional"))))
def test_initial_states_and_sequence_lengths(op, direction):
    prune_half(recurrent_model(op, direction, states=True, seq_lens=True, peephole=op == "LSTM"))


@pytest.mark.parametrize("op", list(GATES))
def test_layout_1(op):
    prune_half(recurrent_model(op, "bidirectional", states=True, layout=1, peephole=op == "LSTM"))


@pytest.mark.parametrize("lbr", [0, 1])
def test_gru_linear_before_reset(lbr):
    prune_half(recurrent_model("GRU", "bidirectional", states=True, linear_before_reset=lbr))


def test_clip_and_activations():
    prune_half(recurrent_model("LSTM", "forward", clip=0.7, activations=["HardSigmoid", "Softsign", "Elu"]))
    prune_half(recurrent_model("GRU", "reverse", clip=1.5, activations=["Sigmoid", "Relu"]))
    prune_half(recurrent_model("RNN", "bidirectional", activations=["Relu", "LeakyRelu"],
                               activation_alpha=[0.2]))


def test_each_direction_is_a_part_of_one_equal_count_group():
    model = recurrent_model("LSTM", "bidirectional", states=True, peephole=True)
    node = recurrent_node(model)
    hub = (node.input[2], (0, 2))
    group = next(g for g in onnxprune.analyze(model).groups if any(m.slot == hub for m in g.members))
    assert group.prunable and group.size == 2 * H and group.part_count == 2
    paired = {(node.input[k], (0, 1)) for k in (1, 2, 3, 7)} | {(node.input[k], (0, 2)) for k in (5, 6)}
    assert paired | {(node.output[0], (1, 3)), (node.output[1], (0, 2))} <= {m.slot for m in group.members}
    hub_member = next(m for m in group.members if m.slot == hub)
    np.testing.assert_array_equal(group.parts[hub_member.unit], hub_member.elem // H)  # direction of each unit
    weights = {m.slot[0] for m in group.weight_members()}
    assert {node.input[1], node.input[2]} <= weights  # every gate row and the R column score the unit


def _plant_dead(model: onnx.ModelProto, dead: dict[int, list[int]]) -> onnx.ModelProto:
    """Zero the candidate rows and biases of `dead[d]` units in direction d only."""
    node = recurrent_node(model)
    inits = {t.name: t for t in model.graph.initializer}
    names = node.input[1:4]
    w, r, bias = (numpy_helper.to_array(inits[name]).copy() for name in names)
    for d, units in dead.items():
        zero_candidate(w, r, bias, node.op_type, H, units, d)
    for name, arr in zip(names, (w, r, bias)):
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return model


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_directions_lose_different_dead_units(op):
    """Dead units differ per direction: lossless removes min(count) of each direction's own dead ones."""
    model = _plant_dead(recurrent_model(op, "bidirectional", states=False), {0: [0, 2, 5], 1: [1, 4]})
    result = onnxprune.prune(model, lossless=True)
    assert hidden_size(result.model) == H - 2
    _assert_same_outputs(model, result.model)
    node = recurrent_node(model)
    entry = next(e for e in result.plan.groups if e.key.startswith(node.output[0]))
    assert len(entry.remove) == 4


@pytest.mark.parametrize("scope", ["local", "global"])
def test_directions_keep_equal_counts_of_their_own_units(scope):
    model = recurrent_model("GRU", "bidirectional", seed=4)
    result = onnxprune.prune(model, ratio=0.5, scope=scope, round_to=2)
    assert hidden_size(result.model) % 2 == 0
    assert_matches_recurrent_reference(model, result)
    analysis = onnxprune.analyze(model)
    group = next(g for g in analysis.prunable if g.parts is not None)
    removed = result.plan.resolve(analysis)[group.id]
    per_dir = [int(np.count_nonzero(group.parts[removed] == d)) for d in (0, 1)]
    assert per_dir[0] == per_dir[1] > 0  # > 0: equal counts of nothing would prove nothing


def test_plan_with_unequal_direction_counts_is_refused():
    model = recurrent_model("LSTM", "bidirectional")
    analysis = onnxprune.analyze(model)
    group = next(g for g in analysis.prunable if g.parts is not None)
    forward = [int(u) for u in np.flatnonzero(group.parts == 0)[:2]]
    plan = onnxprune.Plan([GroupPlan(group.key, group.size, forward)])
    with pytest.raises(onnxprune.InputError, match="every part must lose the same number"):
        onnxprune.prune(model, plan=plan)


def test_input_features_shrink_with_the_producer():
    model = recurrent_model("GRU", "forward")
    result = onnxprune.prune(model, ratio=0.5)
    w = next(t for t in result.model.graph.initializer if t.name == recurrent_node(result.model).input[1])
    assert list(w.dims) == [1, 3 * (H - H // 2), IN - IN // 2]


def test_non_constant_weights_are_frozen_with_a_reason():
    model = recurrent_model("RNN", "forward")
    node = recurrent_node(model)
    w = next(t for t in model.graph.initializer if t.name == node.input[1])
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info(w.name, onnx.TensorProto.FLOAT, list(w.dims)))
    reasons = [r for g in onnxprune.analyze(model).summary()["groups_frozen"] for r in g["reasons"]]
    assert any("weights are computed at run time" in r for r in reasons)


@pytest.mark.parametrize("op,direction", list(itertools.product(GATES, ("forward", "reverse", "bidirectional"))))
def test_dead_units_are_removed_exactly(op, direction):
    model = recurrent_model(op, direction, dead=(1, 4), peephole=op == "LSTM", seq_lens=True)
    result = onnxprune.prune(model, lossless=True)
    assert hidden_size(result.model) == H - 2
    _assert_same_outputs(model, result.model)


@pytest.mark.parametrize("lbr", [0, 1])
def test_gru_dead_units_need_both_candidate_biases_zero_with_linear_before_reset(lbr):
    model = recurrent_model("GRU", "forward", dead=(2,), linear_before_reset=lbr)
    b = next(t for t in model.graph.initializer if t.name == recurrent_node(model).input[3])
    arr = numpy_helper.to_array(b).copy()
    arr[:, 2 * H + 2] = 0.75  # W-bias of the candidate ...
    arr[:, 5 * H + 2] = -0.75  # ... cancelled by its R-bias: exact unless the R-bias is gated by r
    b.CopyFrom(numpy_helper.from_array(arr, b.name))
    result = onnxprune.prune(model, lossless=True)
    assert hidden_size(result.model) == (H - 1 if lbr == 0 else H)
    _assert_same_outputs(model, result.model)


def test_live_initial_state_keeps_a_unit():
    model = recurrent_model("LSTM", "forward", dead=(0, 3), states=True)
    c0 = next(t for t in model.graph.initializer if t.name == recurrent_node(model).input[6])
    arr = numpy_helper.to_array(c0).copy()
    arr[..., 3] = 0
    c0.CopyFrom(numpy_helper.from_array(arr, c0.name))
    h0 = next(t for t in model.graph.initializer if t.name == recurrent_node(model).input[5])
    arr = numpy_helper.to_array(h0).copy()
    arr[..., 3] = 0
    h0.CopyFrom(numpy_helper.from_array(arr, h0.name))
    result = onnxprune.prune(model, lossless=True)
    assert hidden_size(result.model) == H - 1  # unit 0 starts from a non-zero state, unit 3 goes
    _assert_same_outputs(model, result.model)


def test_zero_at_zero_activation_is_required_for_dead_units():
    model = recurrent_model("RNN", "forward", dead=(2,), activations=["Sigmoid"])
    assert hidden_size(onnxprune.prune(model, lossless=True).model) == H


def _assert_same_outputs(model: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    for seed in (0, 1):
        feeds = random_inputs(model, seed)
        for a, b in zip(session(model).run(None, feeds), session(pruned).run(None, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_gate_blocks_reordered_at_run_time_are_folded():
    """Like the dynamo exporter without its optimizer: W and R are Slice/Concat/Unsqueeze of
    torch-ordered (i, f, g, o) initializers. The fold pass makes them constants; pruning is exact."""
    b = GraphBuilder(seed=5)
    x = b.op("MatMul", [b.input([T, BATCH, FEATURES]), b.weight([FEATURES, IN])])

    def reordered(shape) -> str:
        torch_order = b.weight(shape, "torch_w")
        blocks = [b.op("Slice", [torch_order, b.const(np.array([k * H], np.int64)),
                                 b.const(np.array([(k + 1) * H], np.int64)), b.const(np.array([0], np.int64))])
                  for k in (0, 3, 1, 2)]  # i, o, f, c
        return b.op("Unsqueeze", [b.op("Concat", blocks, axis=0), b.const(np.array([0], np.int64))])

    y = b.op("LSTM", [x, reordered([4 * H, IN]), reordered([4 * H, H])], n_out=3, hidden_size=H)[0]
    y = b.op("Reshape", [b.op("Squeeze", [y, b.const(np.array([1], np.int64))]), b.const(np.array([T * BATCH, H], np.int64))])
    b.gemm(y, H, 2)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    assert onnxprune.analyze(model).summary()["groups_prunable"] == 2  # MatMul features, LSTM units
    folded = from_graph(folded_graph(model), ModelMeta.of(model))
    assert not {"Slice", "Concat"} & {n.op_type for n in folded.graph.node}
    _assert_same_outputs(model, folded)
    result = onnxprune.prune(model, ratio=0.5)
    assert hidden_size(result.model) == H - H // 2
    assert_matches_recurrent_reference(folded, result)  # the reference needs W and R as initializers


def test_fold_constants_keeps_run_time_shapes():
    b = GraphBuilder(seed=6)
    x = b.input([2, 3])
    shape = b.op("Concat", [b.const(np.array([3], np.int64)), b.const(np.array([2], np.int64))], axis=0)
    y = b.op("Reshape", [x, b.op("Shape", [b.op("Reshape", [x, shape])])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    graph = fold_constants(to_graph(b.model()), 17).graph
    assert [n.op for n in graph.nodes] == ["Reshape", "Shape", "Reshape"]  # Concat folded, Shape kept
    assert isinstance(graph.nodes[0].inputs[1], gs.Constant)
    assert graph.nodes[0].inputs[1].values.tolist() == [3, 2]


def _quiet_units_model(quiet: tuple[int, ...]) -> onnx.ModelProto:
    """An LSTM whose `quiet` units carry little signal (gate rows and biases scaled down) and feed no
    other unit (zero columns of R), so removing them changes nothing but their own contribution to
    the consumers."""
    model = recurrent_model("LSTM", "forward", seed=11)
    node = recurrent_node(model)
    rows = [g * H + u for g in range(8) for u in quiet]  # 4 gates; B holds 8 blocks
    for index in (1, 2, 3):
        init = next(t for t in model.graph.initializer if t.name == node.input[index])
        arr = numpy_helper.to_array(init).copy()
        own = [r for r in rows if r < arr.shape[1]]
        arr[:, own] *= 0.05
        if index == 2:
            arr[:, :, list(quiet)] = 0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return model


def test_activation_criterion_reads_units_over_time():
    model = _quiet_units_model((1, 4))
    calib = random_inputs(model, 3)
    result = onnxprune.prune(model, ratio=1 / 3, criterion="activation", data=calib, recover="none")
    node = recurrent_node(model)
    analysis = onnxprune.analyze(model)
    group = next(g for g in analysis.groups if any(m.slot == (node.input[2], 2) for m in g.members))
    assert next(g.remove for g in result.plan.groups if g.key == group.key) == [1, 4]


@pytest.mark.parametrize("recover", ["bias", "lstsq"])
def test_recovery_refits_the_layers_after_a_recurrent_op(recover):
    """Only the units go (the input MatMul is excluded). On the calibration data itself, recovery
    cannot do worse than plain removal: least squares and mean folding both minimise the consumers'
    error there, and the kept units compute exactly what they did."""
    model = _quiet_units_model((1, 4))
    calib = random_inputs(model, 3)
    exclude = [model.graph.node[0].name]
    plan = onnxprune.prune(model, ratio=1 / 3, criterion="activation", data=calib, exclude=exclude).plan
    errors = {}
    for method in ("none", recover):
        pruned = onnxprune.prune(model, plan=plan, data=calib, recover=method, exclude=exclude).model
        assert hidden_size(pruned) == H - 2
        onnx.checker.check_model(pruned, full_check=True)
        got, want = session(pruned).run(None, calib), session(model).run(None, calib)
        errors[method] = [float(np.mean((g - w) ** 2)) for g, w in zip(got, want)]  # y and the Y_h head
    assert all(r < n for r, n in zip(errors[recover], errors["none"])), errors


@pytest.mark.parametrize("fill", ["Expand", "ConstantOfShape"])
def test_zero_initial_state_of_run_time_shape_is_dropped(fill):
    """Exporters build zero states from the batch size read at run time (Keras: Unsqueeze(Expand(0,
    [B, H])); torch, dynamic batch: Slice(ConstantOfShape([L*D, B, H]))). The unit axis of such a
    state is not tied: the state is dropped when the width changes (absent means zeros)."""
    b = GraphBuilder(seed=8)
    x = b.op("MatMul", [b.input([T, "batch", FEATURES]), b.weight([FEATURES, IN])])
    batch = b.op("Gather", [b.op("Shape", [x]), b.const(np.array([1], np.int64))], axis=0)
    if fill == "Expand":
        shape = b.op("Concat", [batch, b.const(np.array([H], np.int64))], axis=0)
        state = b.op("Unsqueeze", [b.op("Expand", [b.const(np.array(0.0, np.float32)), shape]),
                                   b.const(np.array([0], np.int64))])
    else:
        shape = b.op("Concat", [b.const(np.array([2], np.int64)), batch, b.const(np.array([H], np.int64))], axis=0)
        zeros = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
        state = b.op("Slice", [zeros, b.const(np.array([1], np.int64)), b.const(np.array([2], np.int64)),
                               b.const(np.array([0], np.int64))])
    w, r = b.weight([1, 3 * H, IN]), b.weight([1, 3 * H, H])
    y = b.op("GRU", [x, w, r, "", "", state], n_out=2, hidden_size=H)[0]
    y = b.op("Squeeze", [y, b.const(np.array([1], np.int64))])
    b.op("MatMul", [y, b.weight([H, 2])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    result = prune_half(model)
    assert recurrent_node(result.model).input[5] == ""
    assert not {"Expand", "ConstantOfShape"} & {n.op_type for n in result.model.graph.node}


def test_encoder_state_initialises_decoder():
    """Seq2seq: the encoder's Y_h is the decoder's initial_h, so both layers share one unit group."""
    b = GraphBuilder(seed=9)
    x = b.op("MatMul", [b.input([T, BATCH, FEATURES]), b.weight([FEATURES, IN])])
    enc = b.op("GRU", [x, b.weight([1, 3 * H, IN]), b.weight([1, 3 * H, H]), b.weight([1, 6 * H])], n_out=2,
               hidden_size=H)
    dec = b.op("GRU", [x, b.weight([1, 3 * H, IN]), b.weight([1, 3 * H, H]), "", "", enc[1]], n_out=2, hidden_size=H)
    y = b.op("Squeeze", [dec[0], b.const(np.array([1], np.int64))])
    b.op("MatMul", [y, b.weight([H, 2])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    units = [g for g in onnxprune.analyze(model).groups if g.size == H]
    assert len(units) == 1 and units[0].prunable and len(units[0].producers) == 2
    result = prune_half(model)
    assert [a.i for n in result.model.graph.node if n.op_type == "GRU" for a in n.attribute
            if a.name == "hidden_size"] == [H - H // 2] * 2


def test_fold_constants_never_stores_a_large_weight_twice():
    """Slices of one large weight that only layout ops read fold (the original goes away); a
    Transpose of a large weight a MatMul also reads stays, else the weight would be stored twice."""
    b = GraphBuilder(seed=10)
    x = b.input([2, 300])
    shared, reordered = b.weight([300, 300]), b.weight([600, 300])
    halves = [b.op("Slice", [reordered, b.const(np.array([lo], np.int64)), b.const(np.array([lo + 300], np.int64)),
                             b.const(np.array([0], np.int64))]) for lo in (300, 0)]
    swapped = b.op("Transpose", [b.op("Concat", halves, axis=0)], perm=[1, 0])
    tied = b.op("MatMul", [x, b.op("Transpose", [shared], perm=[1, 0])])
    b.op("Add", [b.op("MatMul", [x, shared]), tied])
    b.nodes[-1].output[0] = "y"
    b.op("MatMul", [x, swapped])
    b.nodes[-1].output[0] = "z"
    b.output("y", shape=[2, 300])
    b.output("z", shape=[2, 600])
    model = b.model()
    graph = fold_constants(to_graph(model), 17).graph
    assert sorted(n.op for n in graph.nodes) == ["Add", "MatMul", "MatMul", "MatMul", "Transpose"]
    feeds = random_inputs(model, 0)
    folded = from_graph(graph, ModelMeta.of(model))
    for a, b in zip(session(folded).run(None, feeds), session(model).run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # same values; MatMul's summation order may differ


def stacked_runtime_flatten_model(dead: dict[int, list[int]] | None = None, embedding: bool = False
                                  ) -> onnx.ModelProto:
    """Like the dynamo exporter with a dynamic batch: [embedding lookup →] bidirectional GRU over
    [T, batch, F], Y → Transpose [T, B, 2, H] → Reshape to Concat(Shape[0:1], Shape[1:2],
    Shape[2:3] * Shape[3:4]) → a second bidirectional GRU → the same flatten → MatMul."""
    b = GraphBuilder(seed=5)
    if embedding:
        ids = b.input([T, "batch"], "ids", onnx.TensorProto.INT64)
        x = b.op("Gather", [b.weight([11, IN], "table"), ids], axis=0)
    else:
        x = b.input([T, "batch", IN])

    def layer(x: str, features: int, units: list[int]) -> str:
        w = (b.rng.standard_normal([2, 3 * H, features]) * 0.5).astype(np.float32)
        r = (b.rng.standard_normal([2, 3 * H, H]) * 0.5).astype(np.float32)
        bias = (b.rng.standard_normal([2, 6 * H]) * 0.5).astype(np.float32)
        for d, dead_units in enumerate(units):
            zero_candidate(w, r, bias, "GRU", H, dead_units, d)
        y = b.op("GRU", [x, b.const(w, "W"), b.const(r, "R"), b.const(bias, "B")], hidden_size=H,
                 direction="bidirectional")
        y = b.op("Transpose", [y], perm=[0, 2, 1, 3])
        shape = b.op("Shape", [y])
        dims = [b.op("Slice", [shape, b.const(np.array([k], np.int64)), b.const(np.array([k + 1], np.int64))])
                for k in range(4)]
        return b.op("Reshape", [y, b.op("Concat", [dims[0], dims[1], b.op("Mul", [dims[2], dims[3]])], axis=0)])

    units = dead or {}
    y = layer(layer(x, IN, [units.get(0, []), units.get(1, [])]), 2 * H, [units.get(2, []), units.get(3, [])])
    b.op("MatMul", [y, b.weight([2 * H, 3])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_run_time_flatten_of_both_directions_prunes():
    model = stacked_runtime_flatten_model()
    assert all(g.part_count == 2 for g in onnxprune.analyze(model).prunable)
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert hidden_sizes(result.model) == [H // 2] * 2
    feeds = random_inputs(model, 0, batch=3)
    assert session(result.model).run(None, feeds)[0].shape == (T, 3, 3)


def test_run_time_flatten_loses_each_directions_dead_units_exactly():
    model = stacked_runtime_flatten_model({0: [1, 4], 1: [0, 2, 5], 2: [3, 5], 3: [0, 1]})
    result = onnxprune.prune(model, lossless=True)
    assert hidden_sizes(result.model) == [H - 2] * 2
    _assert_same_outputs(model, result.model)


def test_embedding_feeding_a_recurrent_layer_is_an_ordinary_group():
    """No skip Add and no norm read the lookup: its width prunes by default, with the GRU's W columns."""
    model = stacked_runtime_flatten_model(embedding=True)
    analysis = onnxprune.analyze(model)
    table = next(g for g in analysis.groups if any(m.slot[0].startswith("table") for m in g.members))
    assert table.prunable, table.frozen
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    shrunk = next(t for t in result.model.graph.initializer if t.name.startswith("table"))
    assert list(shrunk.dims) == [11, IN - IN // 2]
    feeds = random_inputs(model, 0, batch=3)
    assert session(result.model).run(None, feeds)[0].shape == (T, 3, 3)


def test_state_read_by_a_gather_ties_the_directions_again():
    """`h_n[-1]` (a Gather on the direction axis of Y_h) is read on the plain unit axis: unit j of both
    directions is one channel there, so the layer still prunes, with the same units in each direction."""
    b = GraphBuilder(seed=7)
    x = b.input([T, BATCH, IN])
    w, r = b.weight([2, 3 * H, IN]), b.weight([2, 3 * H, H])
    y, yh = b.op("GRU", [x, w, r, b.weight([2, 6 * H])], n_out=2, hidden_size=H, direction="bidirectional")
    y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, -1], np.int64))])
    b.op("MatMul", [y, b.weight([2 * H, 3])])
    b.nodes[-1].output[0] = "y"
    b.gemm(b.op("Gather", [yh, b.const(np.array(1, np.int64))], axis=0), H, 2)
    b.nodes[-1].output[0] = "yh"
    b.output("y")
    b.output("yh")
    model = b.model()
    (group,) = [g for g in onnxprune.analyze(model).prunable if any(m.slot[0] == r for m in g.members)]
    assert group.parts is None and group.size == H
    result = prune_half(model)
    assert result.report.channels_removed == H // 2


def unrolled_rnn(fill: str, dead: tuple[int, ...] = ()) -> tuple[onnx.ModelProto, str]:
    """An unrolled RNN as the dynamo exporter writes `nn.RNN` with a dynamic batch: the zero state is
    a fill of run-time shape (Shape → Gather → Concat with the constant H), multiplied by the
    recurrent weight that every step shares, then added to the input projection. `dead`: units
    whose input and recurrent columns and biases are zero. Returns (model, recurrent weight)."""
    b = GraphBuilder(seed=11)
    x = b.input([T, "batch", FEATURES])
    batch = b.op("Gather", [b.op("Shape", [x]), b.const(np.array([1], np.int64))], axis=0)
    if fill == "Expand":
        shape = b.op("Concat", [batch, b.const(np.array([H], np.int64))], axis=0)
        state = b.op("Expand", [b.const(np.array(0.0, np.float32)), shape])
    else:  # [layers, B, H], one layer's slice squeezed (torch's h_0 for a stacked RNN)
        shape = b.op("Concat", [b.const(np.array([2], np.int64)), batch, b.const(np.array([H], np.int64))], axis=0)
        zeros = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
        one = b.const(np.array([0], np.int64))
        state = b.op("Squeeze", [b.op("Slice", [zeros, one, b.const(np.array([1], np.int64)), one]), one])
    wx, bx, wh, bh = b.weight([FEATURES, H]), b.weight([H], "b"), b.weight([H, H]), b.weight([H], "b")
    projected = b.op("Add", [b.op("MatMul", [x, wx]), bx])
    for step in range(T):
        here = b.op("Gather", [projected, b.const(np.array(step, np.int64))], axis=0)
        state = b.op("Tanh", [b.op("Add", [b.op("Add", [b.op("MatMul", [state, wh]), bh]), here])])
    b.op("Add", [b.op("MatMul", [state, b.weight([H, 2])]), b.weight([2], "b")])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    inits = {t.name: t for t in model.graph.initializer}
    for name in (wx, bx, wh, bh):
        value = numpy_helper.to_array(inits[name]).copy()
        value[..., list(dead)] = 0
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model, wh


def _weight_shapes(model: onnx.ModelProto, name: str) -> set[tuple[int, ...]]:
    """Shapes of the initializer `name` and of its private copies (`name__shared<k>`)."""
    return {tuple(t.dims) for t in model.graph.initializer if t.name == name or t.name.startswith(f"{name}__")}


@pytest.mark.parametrize("fill", ["Expand", "ConstantOfShape"])
def test_zero_state_times_the_recurrent_weight_follows_the_units(fill):
    """`MatMul(zero state, W_hh)` of an unrolled RNN with a dynamic batch: the state's width was tied
    to nothing, so the first step's copy of W_hh kept all its rows. The product is a zero fill
    whose width follows the units: every copy loses the same rows and columns."""
    model, wh = unrolled_rnn(fill)
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert _weight_shapes(result.model, wh) == {(H - H // 2, H - H // 2)}
    for batch in (1, 3):
        feeds = random_inputs(model, 0, batch=batch)
        got, want = session(result.model).run(None, feeds), session(model).run(None, feeds)
        assert [g.shape for g in got] == [w.shape for w in want]
    # units 1 and 4 dead: removed exactly, leaving the weights a model built 4 units wide has
    planted, wh = unrolled_rnn(fill, dead=(1, 4))
    exact = onnxprune.prune(planted, lossless=True)
    assert exact.report.channels_removed == 2
    assert _weight_shapes(exact.model, wh) == {(H - 2, H - 2)}
    onnx.checker.check_model(exact.model, full_check=True)
    for batch in (1, 3):
        feeds = random_inputs(planted, batch, batch=batch)
        got, want = session(exact.model).run(None, feeds), session(planted).run(None, feeds)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
