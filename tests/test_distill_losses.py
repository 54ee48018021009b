"""Distillation losses on plain torch tensors, the default-loss heuristic on tiny graphs, and the
modality-aware augmentation."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.errors import InputError
from onnxprune.train.augment import augment_batch, is_token_ids, modality, spatial_axes, swap_tokens
from onnxprune.train.distill import DistillOptions
from onnxprune.train.losses import (LossPlan, OutputLoss, batch_loss, cosine_loss, find_padding_mask, kl_loss,
                                    looks_like_logits, mean_pool, mse_loss, parse_loss_option, plan_losses,
                                    pooled_loss, position_weights)

torch = pytest.importorskip("torch")


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    t = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    assert float(kl_loss(t.clone(), t, 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_loss(t.flip(-1), t, 2.0)) > 0.1


def test_kl_matches_hand_computation_with_temperature_scaling():
    s, t, T = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 2.0
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    expected = float((p * (p.log() - q.log())).sum()) * T * T
    assert float(kl_loss(s, t, T)) == pytest.approx(expected, rel=1e-6)


def test_kl_on_probabilities_equals_kl_on_their_logits():
    s, t = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), torch.randn(4, 5)
    direct = kl_loss(s, t, 1.5)
    via_probs = kl_loss(torch.softmax(s, -1), torch.softmax(t, -1), 1.5, probabilities=True)
    assert float(via_probs) == pytest.approx(float(direct), rel=1e-4)


def test_cosine_ignores_scale_but_not_direction():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(cosine_loss(3 * a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_loss(-a, a)) == pytest.approx(2.0, abs=1e-6)


def test_batch_loss_sums_outputs_matches_and_cross_entropy():
    plan = LossPlan((OutputLoss("logits", "kl"), OutputLoss("emb", "mse")), 1.0, ("h",), "logits", 0.5)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]], requires_grad=True)
    student = {"logits": logits, "emb": torch.ones(2, 3), "h": torch.zeros(2, 4)}
    teacher = {"logits": torch.tensor([[3.0, 0.0], [0.0, 3.0]]), "emb": torch.zeros(2, 3), "h": torch.ones(2, 4)}
    total, parts = batch_loss(plan, student, teacher, torch.tensor([1, 1]))
    assert parts["kl:logits"] == pytest.approx(0.0, abs=1e-6)
    assert parts["mse:emb"] == pytest.approx(1.0)
    assert parts["match:h"] == pytest.approx(1.0)
    ce = float(torch.nn.functional.cross_entropy(logits.detach(), torch.tensor([1, 1]))) * 0.5
    assert parts["ce"] == pytest.approx(ce, rel=1e-6)
    assert float(total.detach()) == pytest.approx(sum(parts.values()), rel=1e-6)
    total.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_batch_loss_refuses_matched_tensors_of_different_shapes():
    plan = LossPlan((OutputLoss("y", "mse"),), match=("h",))
    student = {"y": torch.zeros(2, 2), "h": torch.zeros(2, 3)}
    teacher = {"y": torch.zeros(2, 2), "h": torch.zeros(2, 4)}
    with pytest.raises(InputError, match="--match h: .*equal shape"):
        batch_loss(plan, student, teacher)


def _one_output_model(op: str, shape, name: str = "y", elem=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info(name, elem, shape)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
    nodes.append(helper.make_node(op, ["m"], [name]) if op != "MatMul" else helper.make_node("Identity", ["m"], [name]))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]))


@pytest.mark.parametrize("op, shape, name, expected", [
    ("MatMul", ["N", 4], "logits", True),        # linear layer (through Identity)
    ("Softmax", ["N", 4], "probs", True),
    ("Tanh", ["N", 4], "y", False),              # a BERT-style pooled embedding
    ("MatMul", ["N", 4], "sentence_embedding", False),
    ("MatMul", ["N", 1], "y", False),            # a single score is a regression target
    ("MatMul", ["N", 3, 4], "y", False),         # rank 3: token states
])
def test_logits_heuristic(op, shape, name, expected):
    assert looks_like_logits(_one_output_model(op, shape, name), name) is expected


def test_plan_losses_defaults_and_overrides():
    model = _one_output_model("Softmax", ["N", 4], "probs")
    plan = plan_losses(model)
    assert plan.outputs == (OutputLoss("probs", "kl", probabilities=True, logits="m"),)
    assert plan_losses(model, loss={"probs": "cosine"}).outputs[0].kind == "cosine"
    assert plan_losses(_one_output_model("Tanh", ["N", 4]), labels=False).outputs[0].kind == "mse"
    with pytest.raises(InputError, match="no output looks like class logits"):
        plan_losses(_one_output_model("Tanh", ["N", 4]), labels=True)
    with pytest.raises(InputError, match="unknown output"):
        plan_losses(model, loss={"nope": "kl"})
    with pytest.raises(InputError, match="loss must be one of"):
        plan_losses(model, loss="huber")
    with pytest.raises(InputError, match="temperature"):
        plan_losses(model, temperature=0)


def test_softmax_outputs_are_distilled_through_the_softmax_input():
    model = _one_output_model("Softmax", ["N", 4], "probs")
    plan = plan_losses(model)
    assert plan.outputs[0].scores == "m" and plan.captured == ("m",)
    renamed = _one_output_model("Softmax", ["N", 4], "probs")
    renamed.graph.node[0].output[0] = renamed.graph.node[1].input[0] = "other"
    assert plan_losses(model, teacher=renamed).outputs[0].logits is None  # the teacher lacks "m"
    across_batch = _one_output_model("Softmax", ["N", 4], "probs")
    across_batch.graph.node[1].attribute.append(helper.make_attribute("axis", 0))
    assert plan_losses(across_batch).outputs[0].logits is None


def test_kl_and_cross_entropy_read_the_softmax_input():
    plan = plan_losses(_one_output_model("Softmax", ["N", 4], "probs"), labels=True)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    student = {"probs": torch.softmax(s, -1), "m": s.clone().requires_grad_()}
    teacher = {"probs": torch.softmax(t, -1), "m": t}
    loss, parts = batch_loss(plan, student, teacher, torch.tensor([0, 1, 2]))
    expected = kl_loss(s, t, plan.temperature) + torch.nn.functional.cross_entropy(s, torch.tensor([0, 1, 2]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert student["m"].grad is not None and float(student["m"].grad.abs().sum()) > 0


def test_a_saturated_softmax_has_no_gradient_through_its_clamped_log():
    """Why the softmax input is read: confidently wrong probabilities (0 where the teacher puts its
    mass) give the clamped log zero gradient, the logits do not."""
    s = torch.tensor([[40.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 40.0, 0.0]])
    probabilities = torch.softmax(s, -1)
    kl_loss(probabilities, torch.softmax(t, -1), 2.0, probabilities=True).backward()
    assert float(s.grad.abs().sum()) < 1e-12
    s.grad = None
    kl_loss(s, t, 2.0).backward()
    assert float(s.grad.abs().sum()) > 1.0


def test_parse_loss_option():
    assert parse_loss_option(None) == "auto"
    assert parse_loss_option(["cosine"]) == "cosine"
    assert parse_loss_option(["a=kl", "b=mse"]) == {"a": "kl", "b": "mse"}
    with pytest.raises(InputError):
        parse_loss_option(["kl", "b=mse"])


def test_augmentation_by_modality_is_seeded():
    images = np.arange(2 * 1 * 6 * 6, dtype=np.float32).reshape(2, 1, 6, 6)
    tokens = np.arange(12, dtype=np.int64).reshape(2, 6)
    seq = np.ones((2, 5, 3), dtype=np.float32) * np.arange(3, dtype=np.float32)
    batch = {"img": images, "ids": tokens, "seq": seq, "label": np.array([0, 1])}
    a = augment_batch(batch, ["img", "ids", "seq"], np.random.default_rng(3))
    b = augment_batch(batch, ["img", "ids", "seq"], np.random.default_rng(3))
    assert [modality(v) for v in (images, tokens, seq)] == ["image", "none", "float"]
    for key in batch:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].dtype == batch[key].dtype and a[key].shape == batch[key].shape
    np.testing.assert_array_equal(a["ids"], tokens)
    np.testing.assert_array_equal(a["label"], batch["label"])
    assert not np.array_equal(a["img"], images) and not np.array_equal(a["seq"], seq)
    assert np.abs(a["seq"] - seq).max() < 0.1  # 1% of the std, not a different input


def test_token_swap_replaces_a_share_of_ids_from_the_batch_and_spares_padding_masks_positions():
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(64, 40)).astype(np.int64)
    ids[:, 30:] = 0  # padding
    mask = (ids != 0).astype(np.int64)
    positions = np.tile(np.arange(40, dtype=np.int64), (64, 1))
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "label": np.arange(64)}
    names = ["input_ids", "attention_mask", "position_ids"]
    a = swap_tokens(batch, names, np.random.default_rng(1), 0.2)
    b = swap_tokens(batch, names, np.random.default_rng(1), 0.2)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    for key in ("attention_mask", "position_ids", "label"):
        np.testing.assert_array_equal(a[key], batch[key])
    changed = a["input_ids"] != ids
    assert 0.15 < changed[:, :30].mean() < 0.22  # ~20% of the content (a draw may repeat the id)
    assert not changed[:, 30:].any()  # padding stays padding
    assert np.isin(a["input_ids"][:, :30], ids[:, :30]).all()  # every id came from the batch's content
    assert a["input_ids"].dtype == ids.dtype
    assert not is_token_ids(mask) and not is_token_ids(positions) and is_token_ids(ids)
    assert swap_tokens(batch, names, rng, 0.0)["input_ids"] is ids
    with pytest.raises(InputError, match="token_swap"):
        DistillOptions(token_swap=1.5).check()


def test_image_shift_moves_pixels_and_zero_fills():
    images = np.zeros((64, 1, 5, 5), dtype=np.float32)
    images[:, 0, 2, 2] = 100.0
    out = augment_batch({"x": images}, ["x"], np.random.default_rng(0))["x"]
    peaks = {tuple(np.argwhere(o[0] > 50)[0]) for o in out}
    assert peaks <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(peaks) > 3
    assert spatial_axes((2, 8, 8, 3)) == (1, 2) and spatial_axes((2, 3, 8, 8)) == (2, 3)


def _token_model(*mask_names: str) -> onnx.ModelProto:
    """input_ids (and mask inputs) -> Gather -> hidden states [N, L, 4]."""
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in ("input_ids",) + mask_names]
    table = helper.make_tensor("table", TensorProto.FLOAT, [8, 4], np.arange(32, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["hidden"])], "tokens", ints,
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", "L", 4])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_padding_mask_is_the_one_rank_2_input_named_like_a_mask():
    assert find_padding_mask(_token_model("attention_mask")) == "attention_mask"
    assert find_padding_mask(_token_model()) is None
    assert find_padding_mask(_token_model("attention_mask", "token_mask")) is None  # ambiguous: none chosen
    assert plan_losses(_token_model("attention_mask")).padding_mask == "attention_mask"
    for off in (None, "none"):
        assert plan_losses(_token_model("attention_mask"), padding_mask=off).padding_mask is None
    assert plan_losses(_token_model("attention_mask", "token_mask"), padding_mask="token_mask").padding_mask == \
        "token_mask"
    with pytest.raises(InputError, match="--padding-mask 'nope': not a .* input of the student"):
        plan_losses(_token_model("attention_mask"), padding_mask="nope")


def test_padded_positions_are_left_out_of_every_token_term():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    teacher = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    student = torch.where((mask == 0)[..., None], -3 * teacher, teacher)  # differs on padding only
    weights = position_weights(mask, student)
    for loss in (mse_loss, cosine_loss):
        assert float(loss(student, teacher, weights)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(student, teacher)) > 0.1
    assert float(kl_loss(student, teacher, 2.0, weights=weights)) == pytest.approx(0.0, abs=1e-5)
    assert float(kl_loss(student, teacher, 2.0)) > 0.1
    shifted = teacher + 1.0  # off by one on every real position: the masked mean is exactly 1
    assert float(mse_loss(shifted, teacher, weights)) == pytest.approx(1.0, rel=1e-6)
    plan = LossPlan((OutputLoss("y", "mse"),), match=("h",), padding_mask="attention_mask")
    total, parts = batch_loss(plan, {"y": student, "h": student}, {"y": teacher, "h": teacher}, mask=mask)
    assert float(total) == pytest.approx(0.0, abs=1e-6) and set(parts) == {"mse:y", "match:h"}
    assert float(batch_loss(plan, {"y": student, "h": student}, {"y": teacher, "h": teacher})[0]) > 1


def test_only_batch_positions_features_tensors_take_the_mask():
    mask = torch.ones(2, 4)
    assert position_weights(mask, torch.zeros(2, 4, 3)) is not None
    assert position_weights(mask, torch.zeros(2, 4)) is None  # rank 2: a pooled output
    assert position_weights(mask, torch.zeros(2, 4, 4, 4)) is None  # rank 4: (batch, heads, ...) could match by chance
    assert position_weights(mask, torch.zeros(4, 2, 3)) is None  # time-major
    assert position_weights(None, torch.zeros(2, 4, 3)) is None


def test_pooled_loss_compares_the_mean_of_the_real_positions():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[2.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    weights = position_weights(mask, teacher)
    np.testing.assert_allclose(mean_pool(teacher, weights).numpy(), [[0.5, 0.5], [2.0, 0.0]])
    np.testing.assert_allclose(mean_pool(teacher, None).numpy(), teacher.mean(1).numpy())
    # positions swapped within a sentence, padding replaced, norm scaled: the pooled direction is unchanged
    student = torch.stack([3 * teacher[0, [1, 0, 2]], teacher[1]])
    student[:, 2] = -7.0
    assert float(pooled_loss(student, teacher, weights)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_loss(student, teacher, weights)) > 0.1  # the per-position cosine sees the swap
    opposite = -teacher  # every pooled embedding reversed: 1 - (-1) = 2
    assert float(pooled_loss(opposite, teacher, weights)) == pytest.approx(2.0, abs=1e-6)
    plan = LossPlan((OutputLoss("y", "pooled"),), padding_mask="attention_mask")
    total, parts = batch_loss(plan, {"y": student}, {"y": teacher}, mask=mask)
    assert set(parts) == {"pooled:y"} and float(total) == pytest.approx(0.0, abs=1e-6)


def test_pooled_loss_needs_a_batch_positions_features_output():
    assert plan_losses(_token_model("attention_mask"), loss="pooled").outputs[0].kind == "pooled"
    by_name = plan_losses(_token_model(), loss=parse_loss_option(["hidden=pooled"]))  # the CLI's OUTPUT=KIND form
    assert by_name.outputs[0].kind == "pooled"
    flat = _token_model()
    flat.graph.output[0].type.tensor_type.shape.dim.pop()  # declared rank 2
    with pytest.raises(InputError, match="--loss pooled: output hidden has rank 2"):
        plan_losses(flat, loss="pooled")


def test_match_weight_scales_every_matched_term():
    plan = plan_losses(_token_model("attention_mask"), match=("a", "b"), match_weight=0.25)
    assert plan.match_weight == 0.25
    student = {"hidden": torch.zeros(2, 3, 4), "a": torch.ones(2, 3, 4), "b": 2 * torch.ones(2, 3, 4)}
    teacher = {name: torch.zeros(2, 3, 4) for name in student}
    total, parts = batch_loss(plan, student, teacher)
    assert parts["match:a"] == pytest.approx(0.25) and parts["match:b"] == pytest.approx(1.0)
    assert float(total) == pytest.approx(1.25)
    with pytest.raises(InputError, match="match weight must be >= 0"):
        plan_losses(_token_model(), match_weight=float("nan"))
