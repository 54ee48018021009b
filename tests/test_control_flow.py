"""Recurrences written as Loop / Scan bodies (ops/control_flow.py): channels enter as carried state,
scan inputs or outer tensors the body reads, flow through the body's ops, and leave as carried or
scan outputs. Each pattern is pruned at ratio 0.5 against the consumer-masked reference, and dead
units (every gate column and bias zero) are removed exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import assert_matches_masked

import onnxprune
from onnxprune.metrics import count
from onnxprune.verify import random_inputs, session

T, B, I, F, H = 4, 2, 5, 6, 8
DEAD = (1, 4, 6)
FLOAT = TensorProto.FLOAT


def _rng_weights(seed: int, hidden: int, dead=()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"proj": rng.standard_normal((I, F)), "W": rng.standard_normal((F, hidden)) * 0.5,
         "R": rng.standard_normal((hidden, hidden)) * 0.5, "b": rng.standard_normal(hidden) * 0.1,
         "head": rng.standard_normal((T * hidden, 3)), "last": rng.standard_normal((hidden, 3))}
    for name in ("W", "R", "b"):
        w[name][..., list(dead)] = 0
    return {k: v.astype(np.float32) for k, v in w.items()}


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _cell(x_t: str, h: str, out: str, w: str, r: str, b: str) -> list[onnx.NodeProto]:
    """h' = tanh(x_t·W + h·R + b), the SimpleRNN cell the exporters write."""
    return [helper.make_node("MatMul", [x_t, w], ["xw"], name="cell_xw"),
            helper.make_node("MatMul", [h, r], ["hr"], name="cell_hr"),
            helper.make_node("Add", ["xw", "hr"], ["pre"], name="cell_add"),
            helper.make_node("Add", ["pre", b], ["act_in"], name="cell_bias"),
            helper.make_node("Tanh", ["act_in"], [out], name="cell_tanh")]


def _model(nodes, inits, outputs_from: tuple[str, str], hidden: int, w: dict) -> onnx.ModelProto:
    """Outer head shared by the Loop and Scan models: the sequence output [B, T, H] flattened into
    one dense layer, plus the final state into another."""
    seq, last = outputs_from
    nodes = list(nodes) + [
        helper.make_node("Reshape", [seq, "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "head"], ["y_seq"], name="head_seq"),
        helper.make_node("MatMul", [last, "last"], ["y_last"], name="head_last"),
        helper.make_node("Add", ["y_seq", "y_last"], ["y"], name="head_add")]
    inits = list(inits) + [_init("flat_shape", np.array([B, T * hidden], np.int64)), _init("head", w["head"]),
                           _init("last", w["last"]), _init("proj", w["proj"])]
    graph = helper.make_graph(nodes, "recurrence", [helper.make_tensor_value_info("x", FLOAT, [B, T, I])],
                              [helper.make_tensor_value_info("y", FLOAT, [B, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_rnn(hidden: int = H, dead=(), carried_weights: bool = False, scripted: bool = False, seed: int = 0
             ) -> onnx.ModelProto:
    """Keras/tf2onnx form: a Loop whose body reads step t of an outer [T, B, F] tensor with Gather,
    a zero state Expand-ed to a run-time batch size, the weights either read from the outer scope or
    passed through as loop-carried state, and the per-step state concatenated as a scan output.
    `scripted`: the torch.jit.script form instead, a ConstantOfShape zero state and a body state
    input declared with symbolic dims."""
    w = _rng_weights(seed, hidden, dead)
    carried = ["W", "R"] if carried_weights else []
    body_in = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
               helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
               helper.make_tensor_value_info("h_in", FLOAT, ["h_dim_0", "h_dim_1"] if scripted else [None, hidden])]
    body_in += [helper.make_tensor_value_info(f"{n}_in", FLOAT, list(w[n].shape)) for n in carried]
    weight = {n: f"{n}_in" if n in carried else n for n in ("W", "R")}
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_copy"),
                  helper.make_node("Gather", ["xt", "i"], ["x_t"], name="step_read", axis=0),
                  *_cell("x_t", "h_in", "h_out", weight["W"], weight["R"], "b"),
                  helper.make_node("Identity", ["h_out"], ["y_t"], name="step_write")]
    body_out = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_out", FLOAT, [None, hidden])]
    body_out += [helper.make_tensor_value_info(f"{n}_in", FLOAT, list(w[n].shape)) for n in carried]
    body_out += [helper.make_tensor_value_info("y_t", FLOAT, [None, hidden])]
    body = helper.make_graph(body_nodes, "loop_body", body_in, body_out)
    nodes = [
        helper.make_node("MatMul", ["x", "proj"], ["xf"], name="project"),
        helper.make_node("Transpose", ["xf"], ["xt"], name="time_major", perm=[1, 0, 2]),
        helper.make_node("Shape", ["x"], ["x_shape"], name="batch_shape"),
        helper.make_node("Slice", ["x_shape", "zero1", "one1"], ["batch"], name="batch_size"),
        helper.make_node("Concat", ["batch", "width"], ["h0_shape"], name="state_shape", axis=0),
        helper.make_node("ConstantOfShape", ["h0_shape"], ["h0"], name="zero_state") if scripted else
        helper.make_node("Expand", ["zero", "h0_shape"], ["h0"], name="zero_state"),
        helper.make_node("Loop", ["trips", "true", "h0", *carried], ["h_last", *[f"{n}_final" for n in carried], "ys"],
                         name="recurrence", body=body),
        helper.make_node("Transpose", ["ys"], ["seq"], name="batch_major", perm=[1, 0, 2])]
    inits = [_init("trips", np.array(T, np.int64)), _init("true", np.array(True)),
             *([] if scripted else [_init("zero", np.float32(0))]), _init("zero1", np.array([0], np.int64)), _init("one1", np.array([1], np.int64)),
             _init("width", np.array([hidden], np.int64)), _init("W", w["W"]), _init("R", w["R"]), _init("b", w["b"])]
    return _model(nodes, inits, ("seq", "h_last"), hidden, w)


def scan_rnn(hidden: int = H, dead=(), seed: int = 0) -> onnx.ModelProto:
    """A Scan over the time axis of a batch-major [B, T, F] tensor (scan_input_axes = 1), writing
    the states batch-major (scan_output_axes = 1); W is a body initializer, R a body Constant node,
    b an outer initializer the body reads."""
    w = _rng_weights(seed, hidden, dead)
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["R_body"], name="recurrent_weight", value=_init("R_body", w["R"])),
         *_cell("x_t", "h_in", "h_out", "W_body", "R_body", "b"),
         helper.make_node("Identity", ["h_out"], ["y_t"], name="step_write")],
        "scan_body",
        [helper.make_tensor_value_info("h_in", FLOAT, [B, hidden]), helper.make_tensor_value_info("x_t", FLOAT, [B, F])],
        [helper.make_tensor_value_info("h_out", FLOAT, [B, hidden]), helper.make_tensor_value_info("y_t", FLOAT, [B, hidden])],
        [_init("W_body", w["W"])])
    nodes = [helper.make_node("MatMul", ["x", "proj"], ["xf"], name="project"),
             helper.make_node("Scan", ["h0", "xf"], ["h_last", "seq"], name="recurrence", body=body,
                              num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1])]
    inits = [_init("h0", np.zeros((B, hidden), np.float32)), _init("b", w["b"])]
    return _model(nodes, inits, ("seq", "h_last"), hidden, w)


BUILDERS = {"loop": loop_rnn, "loop_carried_weights": lambda **kw: loop_rnn(carried_weights=True, **kw),
            "loop_scripted": lambda **kw: loop_rnn(scripted=True, **kw), "scan": scan_rnn}


def _hidden_group(analysis) -> list:
    return [g for g in analysis.groups if g.size == H and any(m.slot[0] in ("R", "R_body", "R_in") for m in g.members)]


@pytest.mark.parametrize("kind", BUILDERS)
def test_recurrence_prunes_like_masked_reference(kind):
    model = BUILDERS[kind]()
    analysis = onnxprune.analyze(model)
    group = _hidden_group(analysis)
    assert group and group[0].prunable, analysis.summary()
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.after.params < result.report.before.params
    assert_matches_masked(model, result)


@pytest.mark.parametrize("kind", BUILDERS)
def test_dead_units_removed_exactly(kind):
    model = BUILDERS[kind](dead=DEAD)
    result = onnxprune.prune(model, lossless=True)
    onnx.checker.check_model(result.model, full_check=True)
    for seed in (0, 1):
        feeds = random_inputs(model, seed)
        for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    narrow = BUILDERS[kind](hidden=H - len(DEAD))
    assert count(result.model).params == count(narrow).params


def test_input_projection_read_inside_the_body_is_pruned():
    """The body reads the outer projection `xf` (through the Transpose and Gather): its features are
    one group with the rows of W, pruned like any dense layer's inputs."""
    model = loop_rnn()
    analysis = onnxprune.analyze(model)
    group = next(g for g in analysis.groups if any(m.slot == ("proj", 1) for m in g.members))
    assert group.prunable and ("W", 0) in {m.slot for m in group.members}


def test_constant_feature_read_inside_the_body_is_folded_there():
    """A projected input feature that is constant (zero weight column, bias 0.7) reaches the body
    through Transpose and Gather; lossless removal folds 0.7·W[c] into a bias after the body's
    MatMul, added inside the body, and the outputs do not change."""
    model = loop_rnn()
    proj = next(t for t in model.graph.initializer if t.name == "proj")
    weights = numpy_helper.to_array(proj).copy()
    weights[:, 2] = 0
    proj.CopyFrom(_init("proj", weights))
    bias = np.zeros(F, np.float32)
    bias[2] = 0.7
    model.graph.initializer.append(_init("proj_bias", bias))
    project = next(n for n in model.graph.node if n.name == "project")
    project.output[0] = "xf_raw"
    model.graph.node.insert(1, helper.make_node("Add", ["xf_raw", "proj_bias"], ["xf"], name="project_bias"))
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 1
    onnx.checker.check_model(result.model, full_check=True)
    loop = next(n for n in result.model.graph.node if n.op_type == "Loop")
    assert "Add" in {n.op_type for n in loop.attribute[0].g.node if n.name.endswith("_bias_add")}
    feeds = random_inputs(model, 0)
    np.testing.assert_allclose(session(result.model).run(None, feeds)[0], session(model).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_body_reshaping_the_state_to_a_run_time_target_freezes_with_the_node():
    """A body that reshapes the carried state to a shape carried from outside (computed at run time)
    cannot be followed: the hidden units freeze with the reshape's name in the reason."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_copy"),
         helper.make_node("Reshape", ["h_in", "shape_in"], ["h_flat"], name="body_reshape"),
         helper.make_node("MatMul", ["h_flat", "R"], ["hr"], name="body_matmul"),
         helper.make_node("Tanh", ["hr"], ["h_out"], name="body_tanh")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", FLOAT, [B, H]),
         helper.make_tensor_value_info("shape_in", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", FLOAT, [B, H]),
         helper.make_tensor_value_info("shape_in", TensorProto.INT64, [2])])
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h0"], name="project"),
         helper.make_node("Shape", ["h0"], ["h0_shape"], name="state_shape"),
         helper.make_node("Loop", ["trips", "true", "h0", "h0_shape"], ["h_last", "shape_last"], name="recurrence",
                          body=body),
         helper.make_node("MatMul", ["h_last", "head"], ["y"], name="head")],
        "frozen", [helper.make_tensor_value_info("x", FLOAT, [B, I])], [helper.make_tensor_value_info("y", FLOAT, [B, 3])],
        [_init("W", rng.standard_normal((I, H)).astype(np.float32)), _init("R", rng.standard_normal((H, H)).astype(np.float32)),
         _init("head", rng.standard_normal((H, 3)).astype(np.float32)), _init("trips", np.array(T, np.int64)),
         _init("true", np.array(True))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    summary = onnxprune.analyze(model).summary()
    frozen = [g for g in summary["groups_frozen"] if g["group"].startswith("W:")]
    assert frozen and any("body_reshape" in r for r in frozen[0]["reasons"]), summary
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(model, 0)
    np.testing.assert_allclose(session(result.model).run(None, feeds)[0], session(model).run(None, feeds)[0], rtol=1e-6)


def test_if_branches_still_freeze_what_they_read():
    rng = np.random.default_rng(1)
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["h"], [f"{name}_y"], name=f"{name}_op")], name, [],
        [helper.make_tensor_value_info(f"{name}_y", FLOAT, [B, H])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="project"),
         helper.make_node("If", ["flag"], ["chosen"], name="choose", then_branch=branch("then", "Relu"),
                          else_branch=branch("else", "Tanh")),
         helper.make_node("MatMul", ["chosen", "head"], ["y"], name="head")],
        "if", [helper.make_tensor_value_info("x", FLOAT, [B, I]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", FLOAT, [B, 3])],
        [_init("W", rng.standard_normal((I, H)).astype(np.float32)),
         _init("head", rng.standard_normal((H, 3)).astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    summary = onnxprune.analyze(model).summary()
    frozen = [g for g in summary["groups_frozen"] if g["group"].startswith("W:")]
    assert frozen and any("read inside the subgraph of If 'choose'" in r for r in frozen[0]["reasons"]), summary


def test_reverse_sequence_passes_the_feature_axis():
    """Keras writes a backward layer's output sequence reversed by ReverseSequence (time axis 0,
    batch axis 1): the feature axis passes through and prunes like the masked reference."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="project"),
         helper.make_node("ReverseSequence", ["h", "lens"], ["r"], name="reverse", batch_axis=1, time_axis=0),
         helper.make_node("MatMul", ["r", "head"], ["y"], name="head")],
        "reverse", [helper.make_tensor_value_info("x", FLOAT, [T, B, I])], [helper.make_tensor_value_info("y", FLOAT, [T, B, 3])],
        [_init("W", rng.standard_normal((I, H)).astype(np.float32)), _init("head", rng.standard_normal((H, 3)).astype(np.float32)),
         _init("lens", np.array([T, T - 1], np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.groups_pruned == 1
    assert_matches_masked(model, result)


def test_carried_channel_that_drifts_is_not_taken_for_constant():
    """Two channels start at 0 (zero weight columns); the body adds 1 to one of them at every step,
    so only the other is constant at the loop's fixed point and removable without a change."""
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((I, H)).astype(np.float32)
    weights[:, [2, 5]] = 0
    step = np.zeros(H, np.float32)
    step[2] = 1.0
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_copy"),
         helper.make_node("Relu", ["h_in"], ["h_relu"], name="body_relu"),
         helper.make_node("Add", ["h_relu", "step"], ["h_out"], name="body_step")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", FLOAT, [B, H])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", FLOAT, [B, H])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h0"], name="project"),
         helper.make_node("Loop", ["trips", "true", "h0"], ["h_last"], name="recurrence", body=body),
         helper.make_node("MatMul", ["h_last", "head"], ["y"], name="head")],
        "drift", [helper.make_tensor_value_info("x", FLOAT, [B, I])], [helper.make_tensor_value_info("y", FLOAT, [B, 3])],
        [_init("W", weights), _init("step", step), _init("head", rng.standard_normal((H, 3)).astype(np.float32)),
         _init("trips", np.array(T, np.int64)), _init("true", np.array(True))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 1
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(model, 0)
    np.testing.assert_allclose(session(result.model).run(None, feeds)[0], session(model).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-5)
