"""Recurrent compatibility rows: torch LSTM / GRU / RNN through both exporters, Keras LSTM through
both Keras export paths. Writes docs/compatibility.md between `<!-- begin: recurrent -->` and
`<!-- end: recurrent -->` (other sections untouched) and prints the same table.

Per model: 2 stacked layers (bidirectional for torch), 16 hidden units, a Linear head on the mean
over time (Keras: the last step); torch models are exported with static shapes and with a dynamic
batch axis. A Keras GRU, SimpleRNN (one layer, the last state) and a Bidirectional GRU under a GRU
are exported as `Loop`s, with a dynamic and a static batch; their units are pruned through the loop
bodies. Two runs: `prune` at ratio 0.5 (full checker, ORT output shapes), and `--lossless` after
planting 4 dead units per layer, chosen independently in each direction (all gate rows and biases
zero): units removed per layer, max |diff| of the outputs, and whether the weights left number
exactly as many as the same model built 12 wide.

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


LOOP_MODELS = ("GRU", "SimpleRNN", "Bidirectional GRU + GRU")


def keras_loop_models(kind: str, path_kind: str, batch: "int | None", folder: Path
                      ) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]:
    """Keras recurrences both export paths write as `Loop`s (one of LOOP_MODELS): (random, dead
    units planted in every cell, built narrower), exported with a dynamic (None) or static batch."""
    import keras_export  # sets the Keras backend first
    import keras
    from keras_models import zero_units

    layers = keras.layers

    def build(units: int):
        keras.utils.set_random_seed(0)
        inp = keras.Input((STEPS, FEATURES))
        if kind == "Bidirectional GRU + GRU":
            h = layers.GRU(units)(layers.Bidirectional(layers.GRU(units, return_sequences=True))(inp))
        else:
            h = getattr(layers, kind)(units)(inp)
        return keras.Model(inp, layers.Dense(4)(h))

    planted = build(HIDDEN)
    for layer in planted.layers:
        for cell in [layer.forward_layer, layer.backward_layer] if isinstance(layer, layers.Bidirectional) else [layer]:
            if isinstance(cell, (layers.GRU, layers.SimpleRNN)):
                zero_units(cell, HIDDEN, DEAD)
    models = (build(HIDDEN), planted, build(HIDDEN - len(DEAD)))
    return tuple(onnx.load(keras_export.export(m, (STEPS, FEATURES), folder / f"{kind}_{path_kind}_{batch}_{k}.onnx",
                                               path_kind, batch)) for k, m in enumerate(models))


def weight_count_all(graph: onnx.GraphProto) -> int:
    """`weight_count` over a graph and its Loop/Scan bodies (where a pruned Keras recurrence keeps its weights)."""
    arrays = (onnx.numpy_helper.to_array(t) for t in graph.initializer)
    own = sum(a.size for a in arrays if np.issubdtype(a.dtype, np.floating) and np.any(a))
    return own + sum(weight_count_all(a.g) for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)


def prune_twice(models: tuple, batch: int = 1):
    """`prune` at ratio 0.5 of the plain model (full checker; output shapes in ORT at `batch`) and
    `--lossless` of the planted one: (half, exact, same output shapes)."""
    plain, planted, _ = models
    half = onnxprune.prune(plain, ratio=0.5)
    onnx.checker.check_model(half.model, full_check=True)
    feeds = random_inputs(plain, 0, batch=batch)
    same = all(a.shape == b.shape for a, b in zip(session(plain).run(None, feeds), session(half.model).run(None, feeds)))
    return half, onnxprune.prune(planted, lossless=True, verify=True), same


def table_line(name: str, exporter: str, half, units: str, removed, exact, weights: tuple[int, int], same: bool,
               start: float) -> str:
    """One row; `weights`: the lossless model's and the narrower model's weight counts."""
    narrow_ok = "✓" if weights[0] == weights[1] else f"✗ ({weights[0]} vs {weights[1]})"
    check = "full checker ✓, ORT shapes ✓" if same else "ORT output shapes differ ✗"
    return (f"| {name} | {exporter} | {half.report.before.params} → {half.report.after.params} | {units} "
            f"| {removed}, {exact.report.verify.max_abs_diff:.1e} | {narrow_ok} "
            f"| {check} ({time.perf_counter() - start:.0f} s) |")


def loop_row(name: str, exporter: str, models: tuple, start: float) -> str:
    half, exact, same = prune_twice(models, batch=2)
    groups = half.report.groups_pruned
    units = f"{HIDDEN} → {HIDDEN - half.report.channels_removed // groups}" + (f" (×{groups} cells)" if groups > 1 else "")
    weights = (weight_count_all(exact.model.graph), weight_count_all(models[2].graph))
    return table_line(name, exporter, half, units, exact.report.channels_removed, exact, weights, same, start)


def row(name: str, exporter: str, models: tuple, start: float) -> str:
    plain, planted, narrow = models
    half, exact, same = prune_twice(models)
    removed = [h0 - h1 for h0, h1 in zip(hidden_sizes(planted), hidden_sizes(exact.model))]
    units = "unrolled (no RNN op)" if not hidden_sizes(plain) else \
        f"{hidden_sizes(plain)} → {hidden_sizes(half.model)}"
    weights = (weight_count(exact.model), weight_count(narrow))
    return table_line(name, exporter, half, units, removed or exact.report.channels_removed, exact, weights, same,
                      start)


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
            for cell in LOOP_MODELS:
                for path_kind in ("keras", "tf2onnx"):
                    for batch in (None, BATCH):
                        start = time.perf_counter()
                        shape = "dynamic batch" if batch is None else f"batch {batch}"
                        models = keras_loop_models(cell, path_kind, batch, Path(tmp))
                        rows.append(loop_row(f"Keras {cell} (`Loop`), {shape}", path_kind, models, start))
                        print(rows[-1], flush=True)
        except ImportError as exc:
            print(f"Keras rows skipped: {exc}")
    write_rows(rows)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
