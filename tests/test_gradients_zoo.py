"""taylor and fisher computed on real exports: torch legacy and dynamo CNNs, LSTM/GRU (the dynamo
exporter's gate-reordered weights are folded before grouping: their gradients must still arrive)
and a tiny BERT (heads and MLP neurons). Every prunable group gets finite, not-all-zero scores and
the pruned model passes the checker."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune

torch = pytest.importorskip("torch")

from onnxprune.train.gradients import gradient_scores  # noqa: E402
from onnxprune.verify import random_inputs  # noqa: E402


def _check_every_group_scored(model: onnx.ModelProto, data: dict, kind: str, **prune_options) -> None:
    analysis = onnxprune.analyze(model)
    assert analysis.prunable
    scores = gradient_scores(model, analysis, data, kind=kind, quiet=True).scores
    for group in analysis.prunable:
        s = scores[group.key]
        assert s.shape == (group.size,) and np.all(np.isfinite(s)) and np.any(s > 0), group.key
    result = onnxprune.prune(model, criterion=kind, data=data, recover="none", **prune_options)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.channels_removed > 0


class _Recurrent(torch.nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = getattr(torch.nn, cell)(5, 8, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y.mean(1))


class _Cnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                        torch.nn.Linear(8 * 6 * 6, 4))

    def forward(self, x):
        return self.body(x)


@pytest.mark.zoo
@pytest.mark.parametrize("exporter, kind", [("legacy-folded", "taylor"), ("dynamo", "fisher")])
def test_cnn_exports(tmp_path, exporter, kind):
    from torch_export import export

    torch.manual_seed(0)
    model = export(_Cnn(), (torch.randn(2, 1, 6, 6),), tmp_path / "cnn.onnx", exporter)
    data = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((16, 1, 6, 6)).astype(np.float32)}
    _check_every_group_scored(model, data, kind, ratio=0.5)


@pytest.mark.zoo
@pytest.mark.parametrize("cell, exporter", [("LSTM", "dynamo"), ("GRU", "dynamo"), ("GRU", "legacy-folded")])
def test_recurrent_exports(tmp_path, cell, exporter):
    from torch_export import export

    torch.manual_seed(0)
    model = export(_Recurrent(cell), (torch.randn(2, 4, 5),), tmp_path / f"{cell}.onnx", exporter)
    data = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((12, 4, 5)).astype(np.float32)}
    _check_every_group_scored(model, data, "fisher", ratio=0.5)


@pytest.mark.zoo
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_heads_and_neurons(tmp_path, exporter):
    pytest.importorskip("transformers")
    from transformer_models import example_inputs, export_transformer

    model, _ = export_transformer("bert", exporter, tmp_path / "bert.onnx")
    data = example_inputs("bert", 6, 8, seed=1)  # an embedding output: the noise-projection signal
    _check_every_group_scored(model, data, "fisher", ratio=0.5, head_ratio=0.5)
