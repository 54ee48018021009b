"""Zoo tier: grouped-query attention of a tiny random-init Llama, pruned on both torch exporters.

The TorchScript export sizes `repeat_kv` at run time (expand_as Where/Equal targets, KV heads x
repeats as a Mul); the dynamo export writes constants. Either way a unit is a KV group with its
query heads, and pruning must shrink the heads the model actually runs with (read from ONNX
Runtime, not from the plan): 4 query heads / 2 KV heads per layer become 2 / 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from onnxprune.heads import group_kind
from onnxprune.verify import session

pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformer_models import EXPORTERS, HEADS, HIDDEN, LAYERS, example_inputs, export_transformer  # noqa: E402

pytestmark = pytest.mark.zoo

KV = HEADS // 2
DIM = HIDDEN // HEADS


@pytest.fixture(scope="module", params=EXPORTERS)
def llama(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa") / f"llama-{request.param}.onnx"
    return export_transformer("llama", request.param, path)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], extra: list[str] = ()) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in extra)
    names = {i.name for i in probe.graph.input}
    return session(probe).run(None, {k: v for k, v in feeds.items() if k in names})


def _running_heads(model: onnx.ModelProto) -> list[int]:
    """Head count of every attention product (MatMul of two activations) as ONNX Runtime runs it."""
    inits = {t.name for t in model.graph.initializer}
    products = [n.output[0] for n in model.graph.node if n.op_type == "MatMul"
                and n.input[0] not in inits and n.input[1] not in inits]
    outs = _run(model, example_inputs("llama", 2, 7), products)[-len(products):]
    return [o.shape[1] for o in outs if o.ndim == 4]


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    """Output width of every MatMul weight layer that reads the hidden size, by node name."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.name: inits.get(n.input[1]) for n in model.graph.node if n.op_type == "MatMul"}
    return {name: int(w.dims[1]) for name, w in weights.items() if w is not None and w.dims[0] == HIDDEN}


def test_units_are_kv_groups_with_their_query_heads(llama):
    model, _ = llama
    analysis = onnxprune.analyze(model)
    heads = [g for g in analysis.prunable if group_kind(analysis, g) == "heads"]
    assert [g.size for g in heads] == [KV] * LAYERS, analysis.summary()
    for group in heads:
        query = [m for m in group.members if m.role == "weight" and m.slot[1] == 1 and len(m.elem) == HEADS * DIM]
        assert query and all(np.bincount(m.unit).tolist() == [HEADS // KV * DIM] * KV for m in query)


def test_ratio_half_halves_the_heads_it_runs_with(llama):
    model, _ = llama
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert _running_heads(model) == [HEADS] * 2 * LAYERS
    assert _running_heads(result.model) == [HEADS // 2] * 2 * LAYERS
    before, after = _widths(model), _widths(result.model)
    kv_layers = [name for name, width in before.items() if width == KV * DIM]  # K and V projections
    assert len(kv_layers) == 2 * LAYERS and [after[name] for name in kv_layers] == [KV // 2 * DIM] * 2 * LAYERS
    for batch, seq in ((1, 5), (3, 11)):  # dynamic batch and sequence stay dynamic
        feeds = example_inputs("llama", batch, seq, seed=batch)
        assert [o.shape for o in _run(result.model, feeds)] == [(batch, seq, HIDDEN)]


def test_lossless_removes_the_planted_kv_group(llama):
    model, _ = llama
    result = onnxprune.prune(model, lossless=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert _running_heads(result.model) == [HEADS - HEADS // KV] * 2 * LAYERS
    for batch, seq in ((1, 5), (3, 11)):
        feeds = example_inputs("llama", batch, seq, seed=batch + 3)
        np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], rtol=1e-4, atol=1e-5)
