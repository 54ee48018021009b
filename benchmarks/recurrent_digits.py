"""Accuracy of pruned recurrent classifiers without retraining: scikit-learn digits read row by row.

Each 8x8 digit is a sequence of 8 steps of 8 features. A one-layer LSTM and a one-layer GRU (32
hidden units, last hidden state -> Linear) are trained in torch on 75 % of the digits, exported with
the legacy exporter (dynamic batch), and 50 % of their hidden units (and 25 %) are pruned with onnxprune for
each criterion (l1 on all coupled weights, activation on calibration data) and each recovery
setting (none; bias: the removed units' mean output folded into the classifier's bias; lstsq: the
classifier re-fitted by least squares). Calibration: 512 training sequences. Test-split top-1
accuracy is measured in ONNX Runtime. Prints one table.

    python benchmarks/recurrent_digits.py        # a minute or two on 2 cores
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import onnxprune
from onnxprune.verify import session

HIDDEN = 32
RATIOS = (0.25, 0.5)
SETTINGS = [(criterion, recover) for criterion in ("l1", "activation") for recover in ("none", "bias", "lstsq")]


class Classifier(torch.nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = getattr(torch.nn, cell)(8, HIDDEN, batch_first=True)
        self.fc = torch.nn.Linear(HIDDEN, 10)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        return self.fc(h.squeeze(0))


def digits_sequences(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # [N, 8 rows, 8 columns]: 8 steps of 8 features
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def train(cell: str, x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    model = Classifier(cell)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    return model.eval()


def export(model: Classifier, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, opset_version=18)
    return onnx.load(str(path))


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    logits = session(model).run(None, {"x": x})[0]
    return float((logits.argmax(1) == y).mean())


def hidden_size(model: onnx.ModelProto) -> int:
    return next(a.i for n in model.graph.node if n.op_type in ("LSTM", "GRU") for a in n.attribute
                if a.name == "hidden_size")


def run(cells: list[str]) -> list[str]:
    x_train, x_test, y_train, y_test = digits_sequences()
    calib = {"x": x_train[:512]}
    rows = ["| model | hidden units | criterion | recovery | params | test accuracy |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            start = time.perf_counter()
            model = export(train(cell, x_train, y_train), Path(tmp) / f"{cell}.onnx")
            base = onnxprune.prune(model, ratio=0.0).report.before.params
            rows.append(f"| {cell} | {hidden_size(model)} | (original) | - | {base} "
                        f"| {accuracy(model, x_test, y_test):.3f} |")
            trained = time.perf_counter()
            for ratio in RATIOS:
                for criterion, recover in SETTINGS:
                    result = onnxprune.prune(model, ratio=ratio, criterion=criterion, recover=recover, data=calib,
                                             quiet=True)
                    rows.append(f"| {cell} | {hidden_size(result.model)} | {criterion} | {recover} "
                                f"| {result.report.after.params} | {accuracy(result.model, x_test, y_test):.3f} |")
            print(f"{cell}: trained and exported in {trained - start:.0f} s, pruned "
                  f"{len(RATIOS) * len(SETTINGS)} ways in {time.perf_counter() - trained:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", default=["LSTM", "GRU"], help="LSTM and/or GRU")
    args = parser.parse_args(argv)
    if set(args.cells) - {"LSTM", "GRU"}:
        parser.error("cells must be LSTM and/or GRU")
    print("\n".join(run(args.cells)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
