"""Zoo tier: `prune_hidden` on tiny random-init causal LMs (tests/causal_lm_models.py), both exporters.

GPT-2 (LayerNorm, wte tied to lm_head, position embeddings added into the stream) and Llama
(decomposed RMSNorm, untied and tied heads) end in logits, so the residual stream is internal:
- by default it is frozen with the prune_hidden reason and the embedding keeps its width;
- with `prune_hidden=True` it is one group from the embedding lookups to the LM head, lossy
  (LayerNorm/RMSNorm statistics), and a ratio shrinks the embedding columns, every norm weight and
  the LM head rows alike, into a model that passes the full checker and runs at two sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.heads import hidden_groups
from onnxprune.verify import session

pytest.importorskip("torch")
pytest.importorskip("transformers")

from causal_lm_models import HIDDEN, VOCAB, export_causal_lm, lm_inputs  # noqa: E402

pytestmark = pytest.mark.zoo

CASES = [pytest.param(f, e, id=f"{f}-{e}") for f, e in (("gpt2", "legacy"), ("gpt2", "dynamo"), ("llama", "legacy"),
                                                           ("llama", "dynamo"), ("llama-tied", "dynamo"))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(family: str, exporter: str) -> onnx.ModelProto:
        if (family, exporter) not in cache:
            path = tmp_path_factory.mktemp("lm") / f"{family}-{exporter}.onnx"
            cache[(family, exporter)] = export_causal_lm(family, exporter, path)
        return cache[(family, exporter)]

    return get


def _embedding_widths(model: onnx.ModelProto) -> list[int]:
    """Columns of every embedding table the model looks up (token and position)."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return sorted(inits[n.input[0]][1] for n in model.graph.node
                  if n.op_type == "Gather" and len(inits.get(n.input[0], [])) == 2)


@pytest.mark.parametrize("family, exporter", CASES)
def test_hidden_stream_is_one_lossy_group_frozen_by_default(exported, family, exporter):
    model = exported(family, exporter)
    (frozen,) = hidden_groups(onnxprune.analyze(model))
    assert any("prune_hidden=True" in r for r in frozen.frozen), frozen.frozen
    (stream,) = hidden_groups(onnxprune.analyze(model, prune_hidden=True))
    assert stream.prunable and stream.size == HIDDEN, stream.frozen
    norm = "RMSNorm" if family.startswith("llama") else "LayerNormalization"
    assert any(norm in r for r in stream.lossy_only), stream.lossy_only
    kept = onnxprune.prune(model, ratio=0.25)
    assert set(_embedding_widths(kept.model)) == {HIDDEN}


@pytest.mark.parametrize("family, exporter", CASES)
def test_prune_hidden_shrinks_embeddings_norms_and_head(exported, family, exporter):
    model = exported(family, exporter)
    result = onnxprune.prune(model, ratio=0.25, prune_hidden=True)
    onnx.checker.check_model(result.model, full_check=True)
    small = HIDDEN - HIDDEN // 4
    assert set(_embedding_widths(result.model)) == {small}
    shapes = [list(t.dims) for t in result.model.graph.initializer]
    assert [small, VOCAB] in shapes or [VOCAB, small] in shapes  # the LM head reads the smaller stream
    assert [HIDDEN] not in shapes  # every norm weight (and bias) shrank
    names = {i.name for i in result.model.graph.input}
    for batch, seq in ((1, 5), (3, 11)):
        feeds = {k: v for k, v in lm_inputs(batch, seq).items() if k in names}
        logits = session(result.model).run(None, feeds)[0]
        assert logits.shape == (batch, seq, VOCAB) and np.isfinite(logits).all()
