"""Recurrent compatibility rows: torch LSTM / GRU / RNN through both exporters, Keras LSTM through
both Keras export paths. Writes docs/compatibility.md between `<!-- begin: recurrent -->` and
`<!-- end: recurrent -->` (other sections untouched) and prints the same table.

Per model: 2 stacked layers (bidirectional for torch), 16 hidden units, a Linear head on the mean
over time (Keras: the last step); torch models are exported with static shapes and with a dynamic
batch axis. A Keras GRU, exported as a Loop, must come out frozen with a reason. Two runs: `prune`
at ratio 0.5 (full checker, ORT output shapes), and `--lossless` after planting 4 dead units per
layer, chosen independently in each direction (all gate rows and biases zero): units removed per
layer, max |diff| of the outputs, and whether the weights left number exactly as many as the same
model built 12 wide.

    python benchmarks/recurrent_compat.py            # about a minute on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.ir import atomic_write_text
from onnxprune.verify import random_inputs, session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- begin: recurrent -->", "<!-- end: recurrent -->"
HIDDEN, DEAD, FEATURES, STEPS, BATCH = 16, (2, 5, 9, 13), 6, 5, 2
HEADER = ("| model | exporter | params (ratio 0.5) | hidden units | lossless: dead units removed, max abs diff "
          "| lossless = built narrower | verification |\n|---|---|---|---|---|---|---|")
RECURRENT = ("LSTM", "GRU", "RNN")


def weight_count(model: onnx.ModelProto) -> int:
    """Elements of float initializers that are not all zero (exporters add zero initial states)."""
    arrays = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
    return sum(a.size for a in arrays if np.issubdtype(a.dtype, np.floating) and np.any(a))


def hidden_sizes(model: onnx.ModelProto) -> list[int]:
    return [a.i for n in model.graph.node if n.op_type in RECURRENT for a in n.attribute if a.name == "hidden_size"]


def torch_models(cell: str, exporter: str, folder: Path, dynamic: bool
                 ) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]:
    """(random export, export with dead units planted per direction, export of the same built narrower)."""
    import torch

    from test_zoo_recurrent import export_batch, plant_dead_per_direction

    class Classifier(torch.nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(FEATURES, hidden, num_layers=2, bidirectional=True)
            self.fc = torch.nn.Linear(2 * hidden, 4)

        def forward(self, x):
            return self.fc(self.rnn(x)[0].mean(0))

    x = torch.randn(STEPS, BATCH, FEATURES)  # time-major: a dynamic batch is axis 1
    torch.manual_seed(0)
    plain = Classifier(HIDDEN)
    planted = Classifier(HIDDEN)
    plant_dead_per_direction(planted.rnn, len(DEAD) / HIDDEN)
    narrow = Classifier(HIDDEN - len(DEAD))
    return tuple(export_batch(m.eval(), x, folder / f"{cell}_{exporter}_{dynamic}_{k}.onnx", exporter, dynamic, 1)
                 for k, m in enumerate((plain, planted, narrow)))


def keras_models(path_kind: str, folder: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]:
    import keras_export  # sets the Keras backend first
    import keras

    def build(units: int):
        keras.utils.set_random_seed(0)
        inp = keras.Input((STEPS, FEATURES))
        h = keras.layers.LSTM(units, return_sequences=True)(inp)
        return keras.Model(inp, keras.layers.Dense(4)(keras.layers.LSTM(units)(h)))

    planted = build(HIDDEN)
    for layer in planted.layers:
        if isinstance(layer, keras.layers.LSTM):
            kernel, recurrent, bias = layer.get_weights()
            cols = [g * HIDDEN + u for g in range(4) for u in DEAD]
            kernel[:, cols], recurrent[:, cols], bias[cols] = 0, 0, 0
            layer.set_weights([kernel, recurrent, bias])
    models = (build(HIDDEN), planted, build(HIDDEN - len(DEAD)))
    return tuple(onnx.load(keras_export.export(m, (STEPS, FEATURES), folder / f"keras_{path_kind}_{k}.onnx", path_kind))
                 for k, m in enumerate(models))


def keras_gru_row(folder: Path, start: float) -> str:
    """Keras writes a GRU as a Loop: its units must show up frozen, with the reason."""
    import keras_export  # sets the Keras backend first
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((STEPS, FEATURES))
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GRU(HIDDEN)(inp)))
    onnx_model = onnx.load(keras_export.export(model, (STEPS, FEATURES), folder / "keras_gru.onnx", "keras"))
    result = onnxprune.prune(onnx_model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    reasons = sorted({r for g in result.report.to_dict()["groups_frozen"] for r in g["reasons"] if "Loop" in r})
    return (f"| Keras GRU (a `Loop`) | keras | {result.report.before.params} → {result.report.after.params} "
            f"| frozen: {reasons[0].split(': ', 1)[-1] if reasons else 'no reason shown ✗'} | – | – "
            f"| full checker ✓ ({time.perf_counter() - start:.0f} s) |")


def row(name: str, exporter: str, models: tuple, start: float) -> str:
    plain, planted, narrow = models
    half = onnxprune.prune(plain, ratio=0.5)
    onnx.checker.check_model(half.model, full_check=True)
    feeds = random_inputs(plain, 0)
    same = all(a.shape == b.shape for a, b in zip(session(plain).run(None, feeds), session(half.model).run(None, feeds)))
    exact = onnxprune.prune(planted, lossless=True, verify=True)
    removed = [h0 - h1 for h0, h1 in zip(hidden_sizes(planted), hidden_sizes(exact.model))]
    units = "unrolled (no RNN op)" if not hidden_sizes(plain) else \
        f"{hidden_sizes(plain)} → {hidden_sizes(half.model)}"
    narrow_ok = "✓" if weight_count(exact.model) == weight_count(narrow) else \
        f"✗ ({weight_count(exact.model)} vs {weight_count(narrow)})"
    check = "full checker ✓, ORT shapes ✓" if same else "ORT output shapes differ ✗"
    return (f"| {name} | {exporter} | {half.report.before.params} → {half.report.after.params} | {units} "
            f"| {removed or exact.report.channels_removed}, {exact.report.verify.max_abs_diff:.1e} | {narrow_ok} "
            f"| {check} ({time.perf_counter() - start:.0f} s) |")


def write_rows(rows: list[str]) -> None:
    """Replace only the recurrent section of docs/compatibility.md (create the file if absent)."""
    text = DOC.read_text() if DOC.exists() else "# Compatibility\n"
    if BEGIN not in text:
        text = text.rstrip() + f"\n\n## Recurrent networks (LSTM, GRU, RNN)\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(DOC, f"{head}{BEGIN}\n{HEADER}\n" + "\n".join(rows) + f"\n{END}{tail}")


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = []
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for cell in RECURRENT:
            for exporter in ("legacy-folded", "dynamo"):
                for dynamic in (False, True):
                    start = time.perf_counter()
                    rows.append(row(f"torch {cell} 2-layer bidirectional" + (", dynamic batch" if dynamic else ""),
                                    exporter, torch_models(cell, exporter, Path(tmp), dynamic), start))
                    print(rows[-1], flush=True)
        try:
            for path_kind in ("keras", "tf2onnx"):
                start = time.perf_counter()
                rows.append(row("Keras LSTM 2-layer", path_kind, keras_models(path_kind, Path(tmp)), start))
                print(rows[-1], flush=True)
            rows.append(keras_gru_row(Path(tmp), time.perf_counter()))
            print(rows[-1], flush=True)
        except ImportError as exc:
            print(f"Keras rows skipped: {exc}")
    write_rows(rows)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
