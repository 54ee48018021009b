"""Distillation through the Python API on tiny real graphs: it learns, it keeps the graph, it is
reproducible, and its options do what they say."""

import numpy as np
import onnx
import pytest

import onnxprune
from builders import structure
from distill_models import INPUT, images, labelled, perturbed, pruned_student, tiny_classifier
from onnxprune.errors import InputError
from onnxprune.train.distill import DistillOptions, run_distillation
from onnxprune.verify import session

pytest.importorskip("torch")

FAST = dict(epochs=5, lr=1e-2, quiet=True)


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_classifier()
    return teacher, pruned_student(teacher)


def _agreement(student, teacher, x):
    return float(np.mean(session(student).run(None, {INPUT: x})[0].argmax(1)
                         == session(teacher).run(None, {INPUT: x})[0].argmax(1)))


def test_distillation_lowers_loss_and_raises_agreement(pair):
    teacher, student = pair
    held_out = images(seed=7)
    result = onnxprune.distill(student, teacher, {INPUT: images()}, **FAST)
    h = result.history
    assert h.epochs[-1].loss < 0.5 * h.epochs[0].loss
    assert h.after["loss"] < 0.5 * h.before["loss"]
    assert h.after["agreement"] > h.before["agreement"] + 0.1
    assert _agreement(result.model, teacher, held_out) > _agreement(student, teacher, held_out) + 0.1
    assert h.torch_vs_ort_max_rel is not None and h.torch_vs_ort_max_rel <= 1e-4
    onnx.checker.check_model(result.model, full_check=True)


def test_only_initializer_values_change_and_inputs_are_untouched(pair):
    teacher, student = pair
    before = student.SerializeToString(), teacher.SerializeToString()
    result = onnxprune.distill(student, teacher, {INPUT: images()}, **FAST)
    assert (student.SerializeToString(), teacher.SerializeToString()) == before
    assert structure(result.model) == structure(student)
    changed = [a.name for a, b in zip(student.graph.initializer, result.model.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))]
    assert len(changed) >= 4


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(pair, tmp_path):
    teacher, student = pair
    data = {INPUT: images()}
    runs = [onnxprune.distill(student, teacher, data, augment=True, seed=s, **FAST) for s in (3, 3, 4)]
    for i, r in enumerate(runs):
        r.save(tmp_path / f"{i}.onnx")
    assert (tmp_path / "0.onnx").read_bytes() == (tmp_path / "1.onnx").read_bytes()
    assert (tmp_path / "0.onnx").read_bytes() != (tmp_path / "2.onnx").read_bytes()


def test_adam_uses_the_fused_cpu_kernel_where_torch_has_it():
    import torch

    from onnxprune.train.distill import adam

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = adam([weight], 0.1)
    weight.sum().backward()
    optimizer.step()
    assert optimizer.defaults.get("fused") is True  # torch 2.4+, which the train extra pins
    assert torch.all(weight < 1)


def test_teacher_runs_optimised_with_torchs_threads_and_gives_the_plain_outputs(pair):
    import onnxruntime as ort
    import torch

    from onnxprune.train.distill import TeacherRunner

    teacher, _ = pair
    relu = next(n.output[0] for n in teacher.graph.node if n.op_type == "Relu")
    runner = TeacherRunner(teacher, (relu,))
    options = runner.session.get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    x = images(n=16)
    plain = onnx.ModelProto()
    plain.CopyFrom(teacher)
    plain.graph.output.extend([onnx.helper.make_empty_tensor_value_info(relu)])
    expected = dict(zip(["logits", relu], session(plain).run(["logits", relu], {INPUT: x})))
    got = runner({INPUT: x})
    assert sorted(got) == sorted(expected)
    for name in expected:  # the fused Conv+BatchNorm+Relu still yields the matched Relu output
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_freeze_bn_keeps_batchnorm_values(pair):
    teacher, student = pair
    result = onnxprune.distill(student, teacher, {INPUT: images()}, freeze_bn=True, **FAST)
    bn = next(n for n in student.graph.node if n.op_type == "BatchNormalization")
    old = {i.name: onnx.numpy_helper.to_array(i) for i in student.graph.initializer}
    new = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for name in bn.input[1:]:
        np.testing.assert_array_equal(old[name], new[name])
    assert any(not np.array_equal(old[n], new[n]) for n in old if n not in bn.input and old[n].size > 1)


def test_freeze_patterns_keep_the_named_initializers(pair):
    teacher, student = pair
    conv = next(n for n in student.graph.node if n.op_type == "Conv")
    gemm = next(n for n in student.graph.node if n.op_type == "Gemm")
    frozen = {conv.input[1], gemm.input[2]}
    result = onnxprune.distill(student, teacher, {INPUT: images()}, freeze=[conv.input[1], gemm.input[2][:1] + "*"],
                               **FAST)  # an exact name and a shell-style pattern
    old = {i.name: onnx.numpy_helper.to_array(i) for i in student.graph.initializer}
    new = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for name in old:
        if name in frozen or (name.startswith(gemm.input[2][:1]) and old[name].size > 1):
            np.testing.assert_array_equal(old[name], new[name])
    assert not np.array_equal(old[gemm.input[1]], new[gemm.input[1]])
    assert result.history.after["agreement"] > result.history.before["agreement"]


def test_freeze_pattern_naming_nothing_is_refused(pair):
    teacher, student = pair
    with pytest.raises(InputError, match=r"--freeze '\*nothing\*' names no trainable initializer"):
        onnxprune.distill(student, teacher, {INPUT: images()}, freeze=["*nothing*"], **FAST)
    with pytest.raises(InputError, match=r"no trainable float initializers \(all frozen\)"):
        onnxprune.distill(student, teacher, {INPUT: images()}, freeze=["*"], **FAST)


def test_labels_add_cross_entropy_and_eval_reports_accuracy(pair):
    teacher, student = pair
    data, held_out = labelled(teacher), labelled(teacher, seed=5)
    result = onnxprune.distill(student, teacher, data, eval_data=held_out, labels="label", **FAST)
    h = result.history
    assert "ce" in h.epochs[0].parts and h.metric == "accuracy" and h.evaluated_on == "eval data"
    assert h.after["accuracy"] > h.before["accuracy"]
    # the best epoch's weights are kept: the final figure is the best one measured
    assert h.after["accuracy"] == pytest.approx(max([h.before["accuracy"]] + [e.eval["accuracy"] for e in h.epochs]))


def test_early_stopping_and_time_budget(pair):
    teacher, student = pair
    data = {INPUT: images()}
    stopped = onnxprune.distill(student, teacher, data, eval_data={INPUT: images(9)}, epochs=40, lr=1e-2,
                                patience=1, quiet=True).history
    assert stopped.stopped == "early stop" and len(stopped.epochs) < 40
    budget = onnxprune.distill(student, teacher, data, epochs=1000, max_minutes=0.02, quiet=True).history
    assert budget.stopped == "time budget" and len(budget.epochs) < 1000 and budget.seconds < 10


def test_learning_rate_decays_over_the_nearer_end_epochs_or_budget(pair):
    """A budget that ends before the epochs paces the cosine decay by the clock; a generous one
    leaves the per-epoch decay (and so determinism) alone."""
    import time

    from onnxprune.train.distill import _Trainer

    teacher, student = pair
    trainer = _Trainer(student, teacher, {INPUT: images()}, DistillOptions(epochs=1000, lr=1.0, max_minutes=10))
    now = time.monotonic()
    assert trainer.learning_rate(1, None) == 1.0
    assert trainer.learning_rate(1, now + 600) == pytest.approx(1.0, abs=1e-3)  # budget just started
    assert trainer.learning_rate(1, now + 300) == pytest.approx(0.5, abs=1e-3)  # half the budget spent
    assert trainer.learning_rate(1, now - 1) == 0.0  # budget over
    generous = _Trainer(student, teacher, {INPUT: images()}, DistillOptions(epochs=4, lr=1.0, max_minutes=600))
    assert generous.learning_rate(3, time.monotonic() + 600 * 60 - 1) == pytest.approx(0.5)


def test_feature_matching_on_a_tensor_of_equal_shape():
    teacher = tiny_classifier()
    student = perturbed(teacher)
    relu = next(n.output[0] for n in teacher.graph.node if n.op_type == "Relu")
    result = onnxprune.distill(student, teacher, {INPUT: images()}, match=[relu], **FAST)
    parts = [e.parts[f"match:{relu}"] for e in result.history.epochs]
    assert parts[-1] < parts[0]


def test_feature_matching_refuses_pruned_shapes_and_unknown_tensors(pair):
    teacher, student = pair
    relu = next(n.output[0] for n in teacher.graph.node if n.op_type == "Relu")
    with pytest.raises(InputError, match=f"--match {relu}: .*only tensors of equal shape"):
        onnxprune.distill(student, teacher, {INPUT: images()}, match=[relu], **FAST)
    with pytest.raises(InputError, match="--match nope: no node of the student"):
        onnxprune.distill(student, teacher, {INPUT: images()}, match=["nope"], **FAST)


def test_one_shot_data_and_embedding_outputs_distil_with_no_options():
    """A generator is read once and spooled; a Tanh (pooled-embedding) output gets MSE."""
    teacher = tiny_classifier()
    teacher.graph.node[-1].op_type = "Tanh"  # logits -> an embedding-like output
    student = perturbed(teacher)
    batches = ({INPUT: images(s, 32)} for s in range(3))
    result = onnxprune.distill(student, teacher, batches, **FAST)
    assert result.history.losses == {"logits": "mse"} and result.history.metric == "cosine"
    assert result.history.after["cosine"] > result.history.before["cosine"]


def test_nan_loss_is_an_input_error(pair):
    teacher, student = pair
    x = images()
    x[5, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="loss became nan"):
        run_distillation(student, teacher, {INPUT: x}, DistillOptions(quiet=True, batch=8))


def test_shuffled_batches_mix_rows_only_of_equal_shape_and_keep_every_row():
    from onnxprune.train.distill import shuffled_batches

    chunks = [{"ids": np.full((n, length), i, dtype=np.int64), "row": np.arange(n) + 100 * i}
              for i, (n, length) in enumerate([(5, 7), (6, 4), (5, 7), (3, 4)])]
    first = list(shuffled_batches(chunks, ["ids"], 4, np.random.default_rng(0), extra=("row",)))
    again = list(shuffled_batches(chunks, ["ids"], 4, np.random.default_rng(0), extra=("row",)))
    rows = sorted(int(r) for b in first for r in b["row"])
    assert rows == sorted(int(r) for c in chunks for r in c["row"])  # every row exactly once
    lengths = {i: c["ids"].shape[1] for i, c in enumerate(chunks)}
    assert all(lengths[int(i)] == b["ids"].shape[1] and len(b["ids"]) <= 4 for b in first for i in b["ids"][:, 0])
    assert [b["row"].tolist() for b in first] == [b["row"].tolist() for b in again]
    assert [b["row"].tolist() for b in first] != [c["row"][:4].tolist() for c in chunks]  # shuffled
    kept = list(shuffled_batches(chunks, ["ids"], 4, np.random.default_rng(0), extra=("row",), drop_partial=True))
    assert all(len(b["ids"]) == 4 for b in kept) and sum(len(b["ids"]) for b in kept) == 16


def test_without_eval_data_a_worse_student_is_never_returned():
    teacher = tiny_classifier()
    student = perturbed(teacher, scale=0.01)  # already close: a huge learning rate can only hurt
    result = onnxprune.distill(student, teacher, {INPUT: images()}, epochs=2, lr=0.5, quiet=True)
    h = result.history
    assert h.epochs and h.best_epoch == 0 and h.after == h.before
    assert result.model.SerializeToString() == student.SerializeToString()
    from onnxprune.report import distill_line

    assert "no epoch improved on the given student" in distill_line(h.to_dict())
    assert "no epoch improved" not in distill_line(onnxprune.distill(student, teacher, {INPUT: images()}, epochs=2,
                                                                     lr=1e-3, quiet=True).history.to_dict())


def _softmax_head(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """`model` with its logits scaled by `scale` and passed through a Softmax (a Keras-style
    probabilities output)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producer = next(n for n in out.graph.node if "logits" in n.output)
    producer.output[0] = "raw_logits"
    out.graph.initializer.append(onnx.numpy_helper.from_array(np.array(scale, np.float32), "logit_scale"))
    out.graph.node.extend([onnx.helper.make_node("Mul", ["raw_logits", "logit_scale"], ["scaled"], name="scale"),
                           onnx.helper.make_node("Softmax", ["scaled"], ["logits"], name="softmax", axis=-1)])
    return out


def test_a_saturated_softmax_student_learns_through_the_softmax_input(pair):
    """Keras classifiers end in Softmax; a pruned student that is confidently wrong has probabilities
    of exactly 0 and 1, whose clamped log carries no gradient: the loss reads the softmax input."""
    teacher, student = (_softmax_head(m, 50.0) for m in pair)
    result = onnxprune.distill(student, teacher, {INPUT: images()}, epochs=10, lr=3e-3, quiet=True)
    h = result.history
    assert h.losses == {"logits": "kl (T=2)"}
    assert h.after["loss"] < 0.5 * h.before["loss"]
    assert h.after["agreement"] > h.before["agreement"] + 0.05
    held_out = images(seed=7)
    assert _agreement(result.model, teacher, held_out) > _agreement(student, teacher, held_out) + 0.05
    assert [o.name for o in result.model.graph.output] == ["logits"]  # the captured input stays internal


def test_prune_with_distill_accepts_unlabelled_eval_data():
    """Held-out data without labels stops the distillation early (agreement with the original);
    the report then compares outputs and gives no accuracy, instead of failing after training."""
    teacher = tiny_classifier()
    options = DistillOptions(epochs=2, lr=1e-2, quiet=True)
    result = onnxprune.prune(teacher, ratio=0.5, data={INPUT: images()}, eval_data={INPUT: images(9)},
                             distill=options, quiet=True)
    assert result.report.distill["evaluated_on"] == "eval data"
    figures = result.report.models["pruned"]
    assert figures.accuracy is None and figures.top1_agreement is not None
    with pytest.raises(InputError, match="no labels array"):  # without distillation the labels are the point
        onnxprune.prune(teacher, ratio=0.5, data={INPUT: images()}, eval_data={INPUT: images(9)}, quiet=True)


def _token_encoder(weight: np.ndarray, pad_offset: float) -> onnx.ModelProto:
    """ids, attention_mask -> Gather -> MatMul, plus `pad_offset` on padded positions only."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "table"),
             onnx.numpy_helper.from_array(weight, "w"),
             onnx.numpy_helper.from_array(np.full(4, pad_offset, np.float32), "pad_offset"),
             onnx.numpy_helper.from_array(np.ones((), np.float32), "one"),
             onnx.numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["z"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "m"], ["pad"]), helper.make_node("Unsqueeze", ["pad", "last"], ["pad3"]),
             helper.make_node("Mul", ["pad3", "pad_offset"], ["off"]), helper.make_node("Add", ["z", "off"], ["hidden"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in ("ids", "attention_mask")]
    graph = helper.make_graph(nodes, "encoder", inputs,
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", "L", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _token_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """64 sequences of 3 to 8 real tokens, padded to 8."""
    lengths = rng.integers(3, 9, 64)
    return {"ids": rng.integers(1, 16, (64, 8)).astype(np.int64),
            "attention_mask": (np.arange(8) < lengths[:, None]).astype(np.int64)}


def test_padded_positions_are_left_out_of_the_loss_and_the_cosine():
    """The student cannot imitate the teacher on padding (its offset there is frozen): with the
    attention mask found automatically, it still matches the real positions exactly; counting
    the padding, it cannot."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 4)).astype(np.float32)
    teacher = _token_encoder(weight, 0.0)
    student = _token_encoder(weight + rng.normal(scale=0.5, size=(4, 4)).astype(np.float32), 3.0)
    data = _token_batch(rng)
    options = dict(epochs=40, lr=5e-2, quiet=True, freeze=["pad_offset"])
    masked = onnxprune.distill(student, teacher, data, **options).history
    counted = onnxprune.distill(student, teacher, data, padding_mask=None, **options).history
    assert "padding" in masked.losses and "padding" not in counted.losses
    assert masked.after["cosine"] > 0.99 and masked.after["loss"] < 0.01 < 1 < masked.before["loss"]
    assert counted.after["loss"] > 100 * masked.after["loss"] and counted.after["cosine"] < 0.9


def _pooled_cosine(model: onnx.ModelProto, other: onnx.ModelProto, data: dict) -> float:
    """Mean cosine of the two models' ORT outputs mean-pooled over the real positions."""
    mask = data["attention_mask"][..., None].astype(np.float32)
    pooled = [(session(m).run(None, data)[0] * mask).sum(1) / mask.sum(1) for m in (model, other)]
    a, b = (p / np.linalg.norm(p, axis=1, keepdims=True) for p in pooled)
    return float(np.sum(a * b, axis=1).mean())


def test_pooled_loss_distills_and_evaluates_the_mean_pooled_embedding():
    """`loss="pooled"` trains the mean over the real positions (the sentence embedding), and the
    held-out cosine that early stopping reads is that embedding's too (checked against ORT)."""
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(4, 4)).astype(np.float32)
    teacher = _token_encoder(weight, 0.0)
    student = _token_encoder(weight + rng.normal(scale=0.7, size=(4, 4)).astype(np.float32), 0.0)
    data = _token_batch(rng)
    result = onnxprune.distill(student, teacher, data, loss="pooled", epochs=40, lr=5e-2, quiet=True)
    history = result.history
    assert history.losses["hidden"] == "pooled"
    assert history.before["cosine"] == pytest.approx(_pooled_cosine(student, teacher, data), abs=1e-5)
    assert history.after["cosine"] == pytest.approx(_pooled_cosine(result.model, teacher, data), abs=1e-5)
    assert history.before["cosine"] < 0.95 and history.after["cosine"] > 0.999
