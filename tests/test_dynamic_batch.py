"""Exports with a dynamic batch (and image size) on tiny hand-built graphs.

Each pattern comes twice: the constant-target form a static export (or the dynamo exporter) writes,
and the run-time form of the TorchScript exporter with `dynamic_axes`, where reshape targets are
`Shape → Gather → Div/Mul → Concat` chains that read other layers' channel counts. Both must prune
alike, and every pruned model must match the consumer-masked reference at two batch sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, zero_columns
from onnxprune.heads import group_kind
from onnxprune.verify import session
from reference import assert_matches_masked

S, E, H = 6, 16, 4
D = E // H
FORMS = ("constant", "run-time")


def _ints(b: GraphBuilder, *values: int) -> str:
    return b.const(np.array(values, np.int64))


def _dim(b: GraphBuilder, tensor: str, axis: int) -> str:
    """`[tensor.shape[axis]]` read at run time."""
    return b.op("Gather", [b.op("Shape", [tensor]), _ints(b, axis)], axis=0)


def _over(b: GraphBuilder, value: str, by: int) -> str:
    return b.op("Div", [value, _ints(b, by)])


def _times(b: GraphBuilder, value: str, by: int) -> str:
    return b.op("Mul", [value, _ints(b, by)])


def _reshape(b: GraphBuilder, x: str, constant: list[int], pieces: "list[str] | None") -> str:
    target = _ints(b, *constant) if pieces is None else b.op("Concat", pieces, axis=0)
    return b.op("Reshape", [x, target])


def multihead_attention(form: str, dead_head: int | None = None) -> onnx.ModelProto:
    """`nn.MultiheadAttention` (sequence first, packed in-projection) as the TorchScript exporter
    writes it: [S, B, 3E] → [S, B, 3, E] → q, k, v → [S, B·H, D] → [B·H, S, D] → [B, H, S, D];
    context → [S, B, H, D] → [S·B, E] → out-projection → [S, B, E], plus the residual input.
    The run-time targets read E from the block's input (another layer's channels), as torch does."""
    b = GraphBuilder(seed=5)
    x = b.input([S, "B", E])
    run = form == "run-time"
    qkv = b.op("Add", [b.op("MatMul", [x, b.weight([E, 3 * E])]), b.weight([3 * E], "b")])
    seq, batch, width = (_dim(b, x, a) for a in range(3)) if run else (None, None, None)
    packed = _reshape(b, qkv, [S, -1, 3, E], [seq, batch, _ints(b, 3), width] if run else None)
    moved = b.op("Squeeze", [b.op("Transpose", [b.op("Unsqueeze", [packed, _ints(b, 0)])], perm=[3, 1, 2, 0, 4]),
                             _ints(b, 3)])
    heads = []
    for k in range(3):
        t = b.op("Gather", [moved, b.const(np.array(k, np.int64))], axis=0)
        t = _reshape(b, t, [S, -1, D], [seq, _times(b, batch, H), _over(b, width, H)] if run else None)
        t = b.op("Transpose", [t], perm=[1, 0, 2])
        heads.append(_reshape(b, t, [-1, H, S, D], [batch, _ints(b, H), seq, _over(b, width, H)] if run else None))
    q, k, v = heads
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          b.const(np.array(D ** -0.5, np.float32))])
    context = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])], perm=[2, 0, 1, 3])
    flat = _reshape(b, context, [-1, E], [b.op("Mul", [seq, batch]), width] if run else None)
    out = b.gemm(flat, E, E)
    out = _reshape(b, out, [S, -1, E], [seq, batch, _dim(b, out, 1)] if run else None)
    b.op("Add", [out, x])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    if dead_head is not None:
        _zero_head(model, dead_head)
    return model


def _zero_head(model: onnx.ModelProto, head: int) -> None:
    """Zero the Q, K and V columns (and biases) of one head in the packed projection."""
    weight, bias = [t.name for t in model.graph.initializer if t.dims and t.dims[-1] == 3 * E][:2]
    zero_columns(model, [weight, bias],
                 np.concatenate([np.arange(part * E + head * D, part * E + (head + 1) * D) for part in range(3)]))


def _head_groups(model: onnx.ModelProto):
    analysis = onnxprune.analyze(model)
    return [g for g in analysis.prunable if group_kind(analysis, g) == "heads"]


@pytest.mark.parametrize("form", FORMS)
def test_multihead_attention_with_a_dynamic_batch_prunes_heads(form):
    model = multihead_attention(form)
    assert [g.size for g in _head_groups(model)] == [H]
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == H // 2
    for batch in (1, 3):
        assert_matches_masked(model, result, batch=batch)


def test_multihead_attention_prunes_alike_in_both_forms():
    static = onnxprune.prune(multihead_attention("constant"), ratio=0.5, prune_hidden=True)
    dynamic = onnxprune.prune(multihead_attention("run-time"), ratio=0.5, prune_hidden=True)
    assert dynamic.report.after.params <= static.report.after.params
    assert [len(g.remove) for g in dynamic.plan.groups] == [len(g.remove) for g in static.plan.groups]


@pytest.mark.parametrize("form", FORMS)
def test_lossless_removes_a_dead_head_at_any_batch(form):
    model = multihead_attention(form, dead_head=2)
    result = onnxprune.prune(model, lossless=True)
    assert [g.remove for g in result.plan.groups if g.remove] == [[2]]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((S, batch, E)).astype(np.float32)
        np.testing.assert_allclose(session(result.model).run(None, {"x": x})[0],
                                   session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


C, P = 8, 4


def patch_embedding(form: str, dynamic_size: bool = False) -> onnx.ModelProto:
    """ViT's stem: a strided Conv, flatten of the patch grid ([B, C, H/P · W/P], the run-time form
    computes H/P and W/P with Div), transpose, the class token expanded to the batch and
    concatenated, then a dense layer."""
    b = GraphBuilder(seed=7)
    x = b.input(["B", 3, "H", "W"] if dynamic_size else ["B", 3, 8, 8])
    conv = b.op("Conv", [x, b.weight([C, 3, P, P]), b.weight([C], "b")], kernel_shape=[P, P], strides=[P, P])
    run = form == "run-time"
    grid = b.op("Mul", [_over(b, _dim(b, x, 2), P), _over(b, _dim(b, x, 3), P)]) if run else None
    tokens = _reshape(b, conv, [0, C, -1], [_dim(b, x, 0), _ints(b, C), grid] if run else None)
    tokens = b.op("Transpose", [tokens], perm=[0, 2, 1])
    cls_shape = b.op("Concat", [_dim(b, x, 0), _ints(b, -1, -1)], axis=0) if run else _ints(b, 1, 1, 1)
    if run:  # torch's expand(B, -1, -1): -1 entries become 1 through Where(Equal(t, -1), 1, t)
        ones = b.op("ConstantOfShape", [b.op("Shape", [cls_shape])],
                    value=onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1]))
        minus = b.op("Mul", [ones, b.const(np.array(-1, np.int64))])
        cls_shape = b.op("Where", [b.op("Equal", [cls_shape, minus]), ones, cls_shape])
    cls = b.op("Expand", [b.weight([1, 1, C], "cls"), cls_shape])
    if not run:  # a static export broadcasts the token with a Tile to the (here dynamic) batch
        cls = b.op("Tile", [cls, b.op("Concat", [_dim(b, x, 0), _ints(b, 1, 1)], axis=0)])
    seq = b.op("Concat", [cls, tokens], axis=1)
    b.op("MatMul", [b.op("Relu", [seq]), b.weight([C, 5])])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


@pytest.mark.parametrize("form", FORMS)
def test_patch_flatten_and_class_token_with_a_dynamic_batch(form):
    model = patch_embedding(form)
    analysis = onnxprune.analyze(model)
    assert [g.size for g in analysis.prunable] == [C], [g.frozen for g in analysis.groups]
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == C // 2
    for batch in (1, 3):
        assert_matches_masked(model, result, batch=batch)


def test_patch_flatten_with_a_dynamic_image_size():
    model = patch_embedding("run-time", dynamic_size=True)
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == C // 2
    for batch, side in ((1, 8), (3, 12)):
        x = np.random.default_rng(side).standard_normal((batch, 3, side, side)).astype(np.float32)
        out = session(result.model).run(None, {"x": x})[0]
        assert out.shape == (batch, (side // P) ** 2 + 1, 5)


def test_a_static_target_read_from_another_layer_is_pinned_to_a_constant():
    """The packed projection's [S, B, 3, E] target reads E from the block input: after import it
    is a constant, so pruning the heads rewrites it instead of freezing them."""
    from onnxprune.passes.fold_constants import folded_graph

    graph = folded_graph(multihead_attention("run-time"))
    reshapes = [n for n in graph.nodes if n.op == "Reshape"]
    first = reshapes[0]
    assert first.inputs[0].shape == [S, "B", 3 * E]
    assert np.asarray(first.inputs[1].values).tolist() == [S, -1, 3, E]
    assert not [n for n in reshapes if "4*B" in str(n.outputs[0].shape)]  # the batch x heads merge is gone


def test_chunk_bounds_computed_from_the_channel_count_are_pinned():
    """torch's `chunk(2, dim=1)` with a dynamic batch: the Slice bounds are (C + 1) // 2 and twice
    that, computed from `Shape` at run time. They are static, so the import writes them as constants
    that the Slice rule rewrites, and both halves prune as in a static export."""
    b = GraphBuilder(seed=9)
    x = b.input(["B", 3, 6, 6])
    h = b.op("Relu", [b.conv(x, 3, 8)])
    half = _over(b, b.op("Add", [_dim(b, h, 1), _ints(b, 1)]), 2)
    first = b.op("Slice", [h, _ints(b, 0), half, _ints(b, 1)])
    second = b.op("Slice", [h, half, _times(b, half, 2), _ints(b, 1)])
    b.op("Add", [b.conv(first, 4, 5), b.conv(second, 4, 5)])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    analysis = onnxprune.analyze(model)
    assert analysis.prunable and not [r for g in analysis.groups for r in g.frozen if "Slice" in r]
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.after.params < result.report.before.params
    for batch in (1, 3):
        assert_matches_masked(model, result, batch=batch)
