"""The training engine (onnxprune.train.TrainableGraph) on real exports, and its speed.

    python benchmarks/train_engine.py                     # every row below
    python benchmarks/train_engine.py --only cnn lstm     # rows whose name contains a word
    python benchmarks/train_engine.py --onnx a.onnx ...   # also these files (e.g. Keras exports,
                                                          # made in another process: no TF here)

Per export (torchvision CNNs, tiny HF transformers and causal LMs, LSTM/GRU/RNN classifiers; TorchScript
"legacy" and torch.export "dynamo" exporters, dynamic batch; Llama at opset 23 with fused Attention
and RotaryEmbedding): whether the engine runs it, the max torch-vs-ORT error relative to the largest
ORT output at a batch size other than the export's, and the same after two Adam steps written back
with to_onnx(). Then forward+backward time per batch of the shipped digits CNN and of a tiny BERT,
next to ONNX Runtime's forward time on the same batch (one thread each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

torch.set_num_threads(1)

from test_train_engine_writeback import sgd_steps  # noqa: E402
from test_train_engine_zoo import RecurrentClassifier, cnn_model, export_dynamic_batch  # noqa: E402

from onnxprune.train import TrainableGraph, max_relative_error  # noqa: E402
from onnxprune.verify import random_inputs, session  # noqa: E402


def _cnn_rows():
    for name in ("resnet18", "mobilenet_v3_small"):
        for exporter in ("legacy-folded", "legacy-bn", "dynamo"):
            def make(d, name=name, exporter=exporter):
                model = export_dynamic_batch(cnn_model(name), (torch.randn(2, 3, 32, 32),), d / "m.onnx", exporter, ["x"])
                rng = np.random.default_rng(0)
                return model, {"x": rng.standard_normal((3, 3, 32, 32)).astype(np.float32)}
            yield f"{name} {exporter}", make


def _transformer_rows():
    from causal_lm_models import export_causal_lm, lm_inputs
    from transformer_models import EXPORTERS, FAMILIES, example_inputs, export_transformer
    for family in FAMILIES:
        for exporter in EXPORTERS:
            def make(d, family=family, exporter=exporter):
                return export_transformer(family, exporter, d / "m.onnx")[0], example_inputs(family, 3, 5, 1)
            yield f"{family} {exporter}", make
    for family in ("gpt2", "llama"):
        for exporter in EXPORTERS:
            def make(d, family=family, exporter=exporter):
                return export_causal_lm(family, exporter, d / "m.onnx"), lm_inputs(3, 5, 1)
            yield f"{family}-lm {exporter}", make
    yield "llama-lm dynamo opset 23 (batch 1)", _llama_opset23


def _llama_opset23(d):
    """Attention + RotaryEmbedding nodes; ONNX Runtime 1.32 runs this export at batch 1 only."""
    import contextlib
    import io
    import warnings

    from causal_lm_models import _Logits, causal_lm, lm_inputs
    feeds = lm_inputs(2, 8)
    args = tuple(torch.from_numpy(a) for a in feeds.values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=48)
        program = torch.onnx.export(_Logits(causal_lm("llama")).eval(), args, dynamo=True, input_names=list(feeds),
                                    output_names=["logits"], dynamic_shapes=tuple({0: b, 1: s} for _ in feeds),
                                    opset_version=23, verbose=False)
        program.save(str(d / "m.onnx"), external_data=False)
    return onnx.load(str(d / "m.onnx")), lm_inputs(1, 6, 1)


def _recurrent_rows():
    for cell in ("LSTM", "GRU", "RNN"):
        for exporter in ("legacy-folded", "dynamo"):
            def make(d, cell=cell, exporter=exporter):
                module = RecurrentClassifier(cell, bidirectional=True, batch_first=False)
                x = torch.randn(6, 2, 5)
                model = export_dynamic_batch(module, (x,), d / "m.onnx", exporter, ["x"], batch_axis=1)
                return model, {"x": np.random.default_rng(1).standard_normal((6, 3, 5)).astype(np.float32)}
            yield f"{cell} bidirectional {exporter}", make


def measure(make, directory: Path) -> dict:
    try:
        model, feeds = make(directory)
    except Exception as exc:  # noqa: BLE001 - an exporter failure is a row
        return {"runs": f"export failed: {type(exc).__name__}"}
    return measure_model(model, feeds)


def measure_model(model: onnx.ModelProto, feeds: dict) -> dict:
    ops = len({n.op_type for n in model.graph.node})
    try:
        g = TrainableGraph(model)
        forward = max_relative_error(g, feeds)
        sgd_steps(g, feeds, steps=2, lr=1e-3, adam=True)
        trained = max_relative_error(g.to_onnx(), feeds)
    except Exception as exc:  # noqa: BLE001 - a failure is a row
        return {"ops": ops, "runs": f"no: {str(exc)[:120]}"}
    return {"ops": ops, "runs": "yes", "forward": forward, "trained": trained}


def _per_batch(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def speed(model: onnx.ModelProto, feeds: dict) -> tuple[float, float]:
    """(ms forward+backward in torch, ms forward in ONNX Runtime) per batch."""
    g = TrainableGraph(model)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def step():
        out = g(tensors)
        sum(v.float().square().mean() for v in out.values()).backward()
    sess = session(model, threads=1)
    return _per_batch(step), _per_batch(lambda: sess.run(None, feeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--onnx", nargs="*", default=[], type=Path)
    args = parser.parse_args()
    rows = [*_cnn_rows(), *_transformer_rows(), *_recurrent_rows()]
    rows = [(n, m) for n, m in rows if not args.only or any(w in n for w in args.only)]
    print("| export | op types | engine runs | max rel. error vs ORT | after training + write-back |")
    print("|---|---|---|---|---|")
    ran = 0
    with tempfile.TemporaryDirectory() as tmp:
        results = [(name, measure(make, Path(tmp))) for name, make in rows]
    results += [(path.name, measure_model(onnx.load(path), random_inputs(onnx.load(path), seed=1, batch=3)))
                for path in args.onnx]
    for name, r in results:
        ran += r["runs"] == "yes"
        errors = f"{r['forward']:.1e} | {r['trained']:.1e}" if r["runs"] == "yes" else " | "
        print(f"| {name} | {r.get('ops', '')} | {r['runs']} | {errors} |", flush=True)
    print(f"\nengine runs {ran} of {len(results)} exports\n")

    digits = onnx.load(ROOT / "onnxprune" / "data" / "digits_cnn.onnx")
    from transformer_models import example_inputs, export_transformer
    with tempfile.TemporaryDirectory() as tmp:
        bert = export_transformer("bert", "legacy", Path(tmp) / "bert.onnx")[0]
    print("| model | batch | torch forward+backward ms | ORT forward ms | ratio |")
    print("|---|---|---|---|---|")
    for name, model, feeds in (("digits CNN", digits, random_inputs(digits, batch=64)),
                               ("BERT-tiny (2 layers, hidden 64)", bert, example_inputs("bert", 8, 32))):
        torch_ms, ort_ms = speed(model, feeds)
        batch = next(iter(feeds.values())).shape
        print(f"| {name} | {batch} | {torch_ms:.2f} | {ort_ms:.2f} | {torch_ms / ort_ms:.1f}x |")


if __name__ == "__main__":
    main()
