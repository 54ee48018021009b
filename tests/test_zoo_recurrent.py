"""Recurrent networks from real exporters: torch nn.LSTM / GRU / RNN (legacy and dynamo) and Keras.

Every model gets dead hidden units planted before export (all of a unit's gate rows and biases
zero, so its state stays exactly 0). Then:
- lossless pruning removes exactly those units, the outputs are unchanged, and the weights left
  number as many as the parameters of the same architecture built narrower;
- pruning at ratio 0.5 gives a model that passes the full checker and runs with the same output
  shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.verify import random_inputs, session
from test_recurrent import hidden_sizes

HIDDEN, FEATURES, STEPS, BATCH = 8, 5, 4, 2
DEAD = (1, 5)


def weight_count(model: onnx.ModelProto) -> int:
    """Elements of float initializers that are not all zero (exporters add zero initial states)."""
    total = 0
    for init in model.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if np.issubdtype(array.dtype, np.floating) and np.any(array):
            total += array.size
    return total


def assert_same_outputs(model: onnx.ModelProto, pruned: onnx.ModelProto, tol: float = 1e-5) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_inputs(model, 0)
    for a, b in zip(session(model).run(None, feeds), session(pruned).run(None, feeds)):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


def assert_half_pruned_runs(model: onnx.ModelProto) -> onnxprune.PruneResult:
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(model, 1)
    for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
        assert a.shape == b.shape
    assert result.report.after.params < result.report.before.params
    return result


# ---------------------------------------------------------------------------------------------- torch

CASES = [  # (cell, exporter, layers, bidirectional, batch_first)
    ("LSTM", "legacy-folded", 2, True, False),
    ("LSTM", "dynamo", 2, True, True),
    ("GRU", "legacy-folded", 2, False, True),
    ("GRU", "dynamo", 2, True, False),
    ("RNN", "legacy-folded", 2, True, False),
    ("RNN", "dynamo", 1, False, True),
]


def _torch_model(cell: str, layers: int, bidirectional: bool, batch_first: bool, hidden: int):
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(FEATURES, hidden, num_layers=layers, bidirectional=bidirectional,
                                               batch_first=batch_first)
            self.fc = torch.nn.Linear(hidden * (2 if bidirectional else 1), 3)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.fc(y.mean(1 if batch_first else 0))

    torch.manual_seed(0)
    return Classifier()


def plant_dead_units(rnn, units: tuple[int, ...]) -> None:
    """Zero every gate row and bias entry of `units`, in every layer and direction."""
    import torch

    hidden = rnn.hidden_size
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            gates = param.shape[0] // hidden
            rows = [g * hidden + u for g in range(gates) for u in units]
            param[rows] = 0


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):
    """Per case: the export with dead units planted, and the weight count of the same architecture
    built narrower: its torch parameters, or its export's weights where the exporter unrolls the
    recurrence and adds folded constants (dynamo's nn.RNN)."""
    pytest.importorskip("torch")
    import torch

    from torch_export import export

    folder = tmp_path_factory.mktemp("recurrent")
    made = {}
    for case in CASES:
        cell, exporter, layers, bidirectional, batch_first = case
        shape = (BATCH, STEPS, FEATURES) if batch_first else (STEPS, BATCH, FEATURES)
        planted = _torch_model(cell, layers, bidirectional, batch_first, HIDDEN)
        plant_dead_units(planted.rnn, DEAD)
        narrow = _torch_model(cell, layers, bidirectional, batch_first, HIDDEN - len(DEAD))
        x = torch.randn(*shape)
        model = export(planted, (x,), folder / f"{cell}_{exporter}_{layers}.onnx", exporter)
        expected = sum(p.numel() for p in narrow.parameters())
        if not hidden_sizes(model):
            expected = weight_count(export(narrow, (x,), folder / f"{cell}_{exporter}_narrow.onnx", exporter))
        made[case] = (model, expected)
    return made


@pytest.mark.zoo
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_dead_units_removed_exactly(torch_exports, case):
    model, narrow_weights = torch_exports[case]
    assert_lossless_is_narrow(model, HIDDEN - len(DEAD), narrow_weights)  # dynamo unrolls nn.RNN: no RNN op


def assert_lossless_is_narrow(model: onnx.ModelProto, hidden: int, narrow_weights: int) -> onnxprune.PruneResult:
    """Lossless pruning keeps the outputs, leaves every recurrent op `hidden` wide and exactly the
    weights of the same network built narrower."""
    result = onnxprune.prune(model, lossless=True)
    assert_same_outputs(model, result.model)
    assert all(h == hidden for h in hidden_sizes(result.model))
    assert weight_count(result.model) == narrow_weights
    return result


@pytest.mark.zoo
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_prune_half(torch_exports, case):
    model = torch_exports[case][0]
    result = assert_half_pruned_runs(model)
    assert all(h == HIDDEN // 2 for h in hidden_sizes(result.model))


# ---------------------------------------------------------------------------------------------- keras

@pytest.fixture(scope="module")
def keras_lstm(tmp_path_factory):
    """Exports of a stacked Keras LSTM classifier with dead units planted, and of the same built
    narrower."""
    pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    import keras_export  # noqa: F401  (sets the backend before keras is imported)
    import keras
    from keras_models import export_planted_and_narrow, zero_units

    def build(units: int):
        keras.utils.set_random_seed(0)
        inp = keras.Input((STEPS, FEATURES))
        h = keras.layers.LSTM(units, return_sequences=True)(inp)
        h = keras.layers.LSTM(units)(h)
        return keras.Model(inp, keras.layers.Dense(3)(h))

    planted = build(HIDDEN)
    for layer in planted.layers:
        if isinstance(layer, keras.layers.LSTM):
            zero_units(layer, HIDDEN, DEAD)  # Keras gate order i, f, c, o along the last axis
    return export_planted_and_narrow(planted, build(HIDDEN - len(DEAD)), (STEPS, FEATURES),
                                     tmp_path_factory.mktemp("keras"))


@pytest.mark.keras
def test_keras_lstm_dead_units_removed_exactly(keras_lstm):
    model, narrow = keras_lstm
    assert "LSTM" in {n.op_type for n in model.graph.node}
    result = onnxprune.prune(model, lossless=True)
    assert_same_outputs(model, result.model)
    assert hidden_sizes(result.model) == hidden_sizes(narrow) == [HIDDEN - len(DEAD)] * 2
    # ONNX holds a W-bias and an R-bias per gate (Keras one) and drops Keras' zero Dense bias,
    # so the reference count is the narrower model's export, not Keras' count_params.
    assert weight_count(result.model) == weight_count(narrow)


@pytest.mark.keras
def test_keras_lstm_prune_half(keras_lstm):
    result = assert_half_pruned_runs(keras_lstm[0])
    assert hidden_sizes(result.model) == [HIDDEN // 2] * 2


# ------------------------------------------- bidirectional stacks: units per direction, dynamic batch

VOCAB, EMBED, WIDE = 40, 12, 16
STACKS = [  # (cell, embedding in front, exporter, dynamic batch)
    ("LSTM", False, "legacy-folded", True),
    ("LSTM", False, "dynamo", True),
    ("LSTM", True, "legacy-folded", False),
    ("LSTM", True, "dynamo", False),
    ("LSTM", True, "dynamo", True),
    ("GRU", True, "legacy-folded", True),
    ("GRU", True, "dynamo", True),
    ("RNN", False, "legacy-folded", True),
]


def _stack(cell: str, embedding: bool, hidden: int):
    """[embedding →] two bidirectional batch_first layers → Linear on the last step."""
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, EMBED) if embedding else None
            self.rnn = getattr(torch.nn, cell)(EMBED, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = torch.nn.Linear(2 * hidden, 3)

        def forward(self, x):
            y, _ = self.rnn(self.emb(x) if self.emb is not None else x)
            return self.fc(y[:, -1])

    torch.manual_seed(0)
    return Tagger().eval()


def plant_dead_per_direction(rnn, fraction: float = 0.25, seed: int = 1) -> None:
    """Zero the gate rows and biases of a random `fraction` of the units of every layer and
    direction, chosen independently per direction."""
    import torch

    rng = np.random.default_rng(seed)
    hidden = rnn.hidden_size
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            for suffix in ("", "_reverse"):
                units = rng.choice(hidden, int(hidden * fraction), replace=False)
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    param = getattr(rnn, f"{kind}_l{layer}{suffix}")
                    gates = param.shape[0] // hidden
                    param[[g * hidden + u for g in range(gates) for u in units]] = 0


def export_batch(model, x, path, exporter: str, dynamic: bool, batch_axis: int = 0) -> onnx.ModelProto:
    """torch_export.export of a one-input model, with axis `batch_axis` of the input (and axis 0 of
    the output) dynamic when `dynamic` (benchmarks/recurrent_compat.py uses it too)."""
    from torch_export import export

    return export(model, (x,), path, exporter, dynamic=dynamic, batch_axis=batch_axis)


@pytest.fixture(scope="module")
def stack_exports(tmp_path_factory):
    """Per case: the export with a quarter of each direction's units planted dead, and the parameter
    count of the same network built a quarter narrower."""
    pytest.importorskip("torch")
    import torch

    folder = tmp_path_factory.mktemp("stacks")
    made = {}
    for case in STACKS:
        cell, embedding, exporter, dynamic = case
        planted = _stack(cell, embedding, WIDE)
        plant_dead_per_direction(planted.rnn)
        x = torch.randint(0, VOCAB, (2, STEPS)) if embedding else torch.randn(2, STEPS, EMBED)
        model = export_batch(planted, x, folder / f"{cell}_{embedding}_{exporter}_{dynamic}.onnx", exporter, dynamic)
        made[case] = (model, sum(p.numel() for p in _stack(cell, embedding, WIDE * 3 // 4).parameters()))
    return made


@pytest.mark.zoo
@pytest.mark.parametrize("case", STACKS, ids=lambda c: "-".join(map(str, c)))
def test_bidirectional_stack_loses_each_directions_dead_units(stack_exports, case):
    model, narrow_params = stack_exports[case]
    result = assert_lossless_is_narrow(model, WIDE * 3 // 4, narrow_params)
    assert len(hidden_sizes(result.model)) == 2


@pytest.mark.zoo
@pytest.mark.parametrize("case", STACKS, ids=lambda c: "-".join(map(str, c)))
def test_bidirectional_stack_prunes_half_with_its_embedding(stack_exports, case):
    cell, embedding, exporter, dynamic = case
    model = stack_exports[case][0]
    result = assert_half_pruned_runs(model)
    assert hidden_sizes(result.model) == [WIDE // 2] * 2
    tables = [t for t in result.model.graph.initializer if t.name == "emb.weight"]
    assert [list(t.dims) for t in tables] == ([[VOCAB, EMBED // 2]] if embedding else [])
    if dynamic:  # a batch size the export never saw
        feeds = random_inputs(model, 2, batch=3)
        outputs = session(result.model).run(None, feeds)
        assert outputs[0].shape == session(model).run(None, feeds)[0].shape == (3, 3)
