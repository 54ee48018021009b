"""Keras GRU and SimpleRNN, which both Keras export paths write as a `Loop` (weights passed in as
loop-carried state, the input read step by step with Gather, the states concatenated as a scan
output): pruned at ratio 0.5 to a valid running model, and dead units removed exactly, to the
parameter count of the same model built narrower (ops/control_flow.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.verify import random_inputs, session

STEPS, FEATURES, UNITS, DEAD = 5, 6, 8, (1, 4, 6)
CASES = [("GRU", False, "keras"), ("SimpleRNN", True, "tf2onnx")]
"""(cell, return_sequences, export path): the last state through Keras' own export, the whole
sequence (flattened into the head) through tf2onnx."""


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'seq' if c[1] else 'last'}-{c[2]}")
def exports(request, tmp_path_factory):
    """(export with dead units planted, export of the same model built narrower)."""
    pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    import keras_export  # noqa: F401  (sets the backend before keras is imported)
    import keras
    from keras_models import export_planted_and_narrow, zero_units

    cell, sequences, path_kind = request.param

    def build(units: int):
        keras.utils.set_random_seed(0)
        inp = keras.Input((STEPS, FEATURES))
        h = getattr(keras.layers, cell)(units, return_sequences=sequences)(inp)
        return keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h) if sequences else h))

    planted = build(UNITS)
    zero_units(next(lay for lay in planted.layers if isinstance(lay, getattr(keras.layers, cell))), UNITS, DEAD)
    return export_planted_and_narrow(planted, build(UNITS - len(DEAD)), (STEPS, FEATURES),
                                     tmp_path_factory.mktemp("keras_loop"), path_kind)


@pytest.mark.keras
def test_keras_loop_recurrence_prunes_half(exports):
    model = exports[0]
    assert "Loop" in {n.op_type for n in model.graph.node}
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.groups_pruned == 1
    assert result.report.after.params < 0.6 * result.report.before.params
    feeds = random_inputs(model, 1, batch=3)  # a batch size the export never saw
    for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
        assert a.shape == b.shape


@pytest.mark.keras
def test_keras_loop_dead_units_removed_exactly(exports):
    model, narrow = exports
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == len(DEAD)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(model, 0, batch=3)
    for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    # the rewrite adds a Split `split` input (3 ints) where Keras splits evenly: count weights only
    assert float_params(result.model.graph) == float_params(narrow.graph)


def float_params(graph: onnx.GraphProto) -> int:
    """Elements of the float initializers of a graph and its subgraphs (the weights)."""
    total = sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    for node in graph.node:
        total += sum(float_params(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    return total


@pytest.fixture(scope="module")
def bidirectional_exports(tmp_path_factory):
    """A Bidirectional GRU (return_sequences) under a GRU, dead units planted independently in each
    of the three cells, exported by Keras; and the same built narrower."""
    pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    import keras_export  # noqa: F401  (sets the backend before keras is imported)
    import keras
    from keras_models import export_planted_and_narrow, zero_units

    layers = keras.layers

    def build(units: int):
        keras.utils.set_random_seed(0)
        inp = keras.Input((STEPS, FEATURES))
        h = layers.Bidirectional(layers.GRU(units, return_sequences=True))(inp)
        return keras.Model(inp, layers.Dense(3)(layers.GRU(units)(h)))

    planted = build(UNITS)
    rng = np.random.default_rng(0)
    for layer in planted.layers:
        cells = [layer.forward_layer, layer.backward_layer] if isinstance(layer, layers.Bidirectional) else \
            [layer] if isinstance(layer, layers.GRU) else []
        for cell in cells:
            zero_units(cell, UNITS, rng.choice(UNITS, len(DEAD), replace=False))
    return export_planted_and_narrow(planted, build(UNITS - len(DEAD)), (STEPS, FEATURES),
                                     tmp_path_factory.mktemp("keras_bidirectional"))


@pytest.mark.keras
def test_keras_bidirectional_stacked_gru_loops(bidirectional_exports):
    """Three Loops: the two directions (one zero state shared by both, the backward output reversed
    by ReverseSequence) and the next layer stay separate groups, each losing its own dead units."""
    model, narrow = bidirectional_exports
    assert sum(n.op_type == "Loop" for n in model.graph.node) == 3
    half = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(half.model, full_check=True)
    assert half.report.groups_pruned == 3
    result = onnxprune.prune(model, lossless=True)
    assert result.report.channels_removed == 3 * len(DEAD)
    feeds = random_inputs(model, 0, batch=3)
    for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    assert float_params(result.model.graph) == float_params(narrow.graph)
