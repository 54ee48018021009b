"""Zoo tier: tiny random-init Hugging Face transformers exported to ONNX, heads and neurons pruned.

Each model (tests/transformer_models.py) has one dead head (or KV group) and a few dead MLP neurons
planted per layer and is exported once per exporter with dynamic batch and sequence axes. Then:
- analysis finds one head group and one neuron group per layer;
- lossless mode removes exactly the planted units and the outputs stay equal;
- ratio 0.5 prunes heads and neurons into a model that passes the full checker and runs in ONNX
  Runtime at two batch/sequence sizes with the original output shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.heads import group_kind
from onnxprune.verify import session

pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformer_models import (EXPORTERS, FAMILIES, FFN, HEADS, HEADS_FROZEN, LAYERS,  # noqa: E402
                                example_inputs, export_transformer)

pytestmark = pytest.mark.zoo

SIZES = ((1, 5), (3, 11))
"""Two (batch, sequence) sizes the pruned models must run at."""

CASES = [pytest.param(f, e, id=f"{f}-{e}") for f in FAMILIES for e in EXPORTERS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str], tuple[onnx.ModelProto, int]] = {}

    def get(family: str, exporter: str):
        if (family, exporter) not in cache:
            path = tmp_path_factory.mktemp("tx") / f"{family}-{exporter}.onnx"
            cache[(family, exporter)] = export_transformer(family, exporter, path)
        return cache[(family, exporter)]

    return get


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = {i.name for i in model.graph.input}
    return session(model).run(None, {k: v for k, v in feeds.items() if k in names})


@pytest.mark.parametrize("family, exporter", CASES)
def test_heads_and_neurons_are_found(exported, family, exporter):
    model, _ = exported(family, exporter)
    analysis = onnxprune.analyze(model)
    kinds = [group_kind(analysis, g) for g in analysis.prunable]
    if (family, exporter) in HEADS_FROZEN:
        frozen = [g for g in analysis.groups if g.frozen and group_kind(analysis, g) == "heads"]
        assert kinds.count("heads") == 0 and frozen and all(g.frozen[0] for g in frozen)
    else:
        assert kinds.count("heads") == LAYERS, analysis.summary()
    heads = [g for g, k in zip(analysis.prunable, kinds) if k == "heads"]
    kv_heads = HEADS // 2 if family == "llama" else HEADS
    assert all(g.size == kv_heads for g in heads)
    neurons = [g for g, k in zip(analysis.prunable, kinds) if k == "channels" and g.size == FFN]
    assert len(neurons) == LAYERS, analysis.summary()


@pytest.mark.parametrize("family, exporter", CASES)
def test_ratio_half_prunes_to_a_valid_dynamic_model(exported, family, exporter):
    model, _ = exported(family, exporter)
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.after.params < result.report.before.params
    analysis = onnxprune.analyze(model)
    removed = {g.key: len(g.remove) for g in result.plan.groups}
    heads = [g for g in analysis.prunable if group_kind(analysis, g) == "heads"]
    assert all(removed[g.key] == g.size // 2 for g in heads)
    for batch, seq in SIZES:
        feeds = example_inputs(family, batch, seq, seed=batch)
        got, want = _run(result.model, feeds), _run(model, feeds)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(np.all(np.isfinite(g)) for g in got)


@pytest.mark.parametrize("family, exporter", CASES)
def test_lossless_removes_exactly_the_planted_heads_and_neurons(exported, family, exporter):
    model, planted = exported(family, exporter)
    result = onnxprune.prune(model, lossless=True)
    onnx.checker.check_model(result.model, full_check=True)
    if (family, exporter) in HEADS_FROZEN:
        planted -= LAYERS  # the planted heads are exact to remove but stay frozen here
    assert result.report.channels_removed == planted, result.plan.to_json()
    for batch, seq in SIZES:
        feeds = example_inputs(family, batch, seq, seed=batch + 7)
        for got, want in zip(_run(result.model, feeds), _run(model, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
