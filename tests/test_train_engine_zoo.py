"""TrainableGraph on real exports made as users make them: torchvision CNNs, tiny Hugging Face
transformers (BERT, GPT-2, Llama with GQA) and recurrent classifiers, through the TorchScript
("legacy") and torch.export ("dynamo") exporters with a dynamic batch axis. Each must match ONNX
Runtime, train a few SGD steps, and write back into the same graph with torch and ONNX Runtime
still agreeing on the trained model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
torch.set_num_threads(1)  # 2 shared cores: torch spin-waits with more threads

from builders import structure  # noqa: E402
from test_train_engine_writeback import sgd_steps  # noqa: E402
from torch_export import export  # noqa: E402

from onnxprune.train import TrainableGraph, max_relative_error  # noqa: E402

pytestmark = pytest.mark.zoo
FORWARD_TOL, TRAINED_TOL = 1e-5, 1e-4


def export_dynamic_batch(module, example: tuple, path, exporter: str, names: list[str], batch_axis: int = 0,
                         opset: int | None = None) -> onnx.ModelProto:
    """Export with a dynamic batch axis, as users deploy models (default opset: 17 for TorchScript)."""
    return export(module, example, path, exporter, names, dynamic=True, batch_axis=batch_axis,
                  opset=opset or (18 if exporter == "dynamo" else 17))


def assert_trains_and_writes_back(model: onnx.ModelProto, train_feeds: dict, check_feeds: dict) -> None:
    """Forward matches ORT at another batch size; training reaches (nearly) every weight; write-back
    changes payloads only; the trained graph still matches ORT."""
    g = TrainableGraph(model)
    assert max_relative_error(g, check_feeds) <= FORWARD_TOL
    before = {n: p.detach().clone() for n, p in g.parameters_by_name.items()}
    sgd_steps(g, train_feeds, steps=2, lr=1e-3, adam=True)
    weights = [n for n, r in g.roles.items() if r in ("param", "bn_param")]
    moved = [n for n in weights if not torch.equal(before[n], g.parameters_by_name[n])]
    assert len(moved) >= 0.9 * len(weights), sorted(set(weights) - set(moved))[:10]
    assert all(torch.equal(before[n], g.parameters_by_name[n]) for n, r in g.roles.items() if r == "bn_stat")
    trained = g.to_onnx()
    assert structure(trained) == structure(model)
    assert max_relative_error(trained, check_feeds) <= TRAINED_TOL


# ------------------------------------------------------------------------------------------ CNNs

CNN_CASES = [("resnet18", "legacy-bn"), ("mobilenet_v3_small", "legacy-folded"), ("resnet_small", "dynamo")]
# Each dynamo export costs 10-40 s here; benchmarks/train_engine.py runs the full exporter matrix.


def cnn_model(name: str):
    import torchvision

    torch.manual_seed(0)
    if name == "resnet_small":  # resnet18's blocks, one per stage
        from torchvision.models.resnet import BasicBlock, ResNet
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


@pytest.mark.parametrize("name,exporter", CNN_CASES, ids=lambda c: str(c))
def test_torchvision_cnn(name, exporter, tmp_path):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    model = export_dynamic_batch(cnn_model(name), (torch.randn(2, 3, 32, 32),), tmp_path / "m.onnx", exporter, ["x"])
    if exporter == "legacy-bn":
        assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    assert_trains_and_writes_back(model, {"x": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)},
                                  {"x": rng.standard_normal((3, 3, 32, 32)).astype(np.float32)})


# ------------------------------------------------------------------------------------------ transformers

TRANSFORMER_CASES = [("bert", "legacy"), ("gpt2", "legacy"), ("gpt2", "dynamo"),
                     ("llama", "legacy"), ("llama", "dynamo")]


@pytest.mark.parametrize("family,exporter", TRANSFORMER_CASES, ids=lambda c: str(c))
def test_transformer(family, exporter, tmp_path):
    """BERT-like encoder; GPT-2 and Llama (GQA: 2 KV heads for 4 query heads) with an LM head."""
    pytest.importorskip("transformers")
    if family == "bert":
        from transformer_models import example_inputs, export_transformer
        model, _ = export_transformer("bert", exporter, tmp_path / "m.onnx")
        feeds = lambda b, s, seed: example_inputs("bert", b, s, seed)  # noqa: E731
    else:
        from causal_lm_models import export_causal_lm, lm_inputs
        model = export_causal_lm(family, exporter, tmp_path / "m.onnx")
        feeds = lambda b, s, seed: lm_inputs(b, s, seed)  # noqa: E731
    train = feeds(2, 8, 1)
    train["attention_mask"][1, 6:] = 0  # padding in the batch
    assert_trains_and_writes_back(model, train, feeds(3, 5, 2))


# ------------------------------------------------------------------------------------------ recurrent

RECURRENT_CASES = [("LSTM", "legacy-folded", True, False), ("LSTM", "dynamo", True, True),
                   ("GRU", "legacy-folded", False, True), ("GRU", "dynamo", True, False),
                   ("RNN", "legacy-folded", True, False)]


class RecurrentClassifier(torch.nn.Module):
    def __init__(self, cell: str, bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.rnn = getattr(torch.nn, cell)(5, 8, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
        self.fc = torch.nn.Linear(8 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("cell,exporter,bidirectional,batch_first", RECURRENT_CASES, ids=lambda c: str(c))
def test_recurrent(cell, exporter, bidirectional, batch_first, tmp_path):
    rng = np.random.default_rng(0)

    def x(batch):
        shape = (batch, 6, 5) if batch_first else (6, batch, 5)
        return rng.standard_normal(shape).astype(np.float32)
    module = RecurrentClassifier(cell, bidirectional, batch_first)
    model = export_dynamic_batch(module, (torch.from_numpy(x(2)),), tmp_path / "m.onnx", exporter, ["x"],
                                 batch_axis=0 if batch_first else 1)
    assert_trains_and_writes_back(model, {"x": x(4)}, {"x": x(3)})
