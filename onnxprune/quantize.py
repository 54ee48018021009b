"""Prune, then quantize: hand the pruned model to ONNX Runtime's own quantizer and measure all three.

Quantization is ONNX Runtime's (`onnxruntime.quantization`), not ours: pruning removes channels,
quantization shrinks what is left, and the two compose. Static quantization calibrates on the same
inputs that `--data` gives verification, so one data set serves every step. The figures put the
original, pruned and pruned+quantized models side by side: size, latency (one interleaved run so
machine noise hits all alike), error against the original and, given labels, top-1 accuracy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.metrics import count
from onnxprune.verify import (DEFAULT_ATOL, DEFAULT_RTOL, LatencyReport, compare_outputs, interleaved_latency, session,
                              top1_correct)

QUANTIZE_MODES = ("dynamic", "static")
Feeds = dict[str, np.ndarray]


def quantize_model(model: onnx.ModelProto, mode: str, calibration=None) -> onnx.ModelProto:
    """Quantize with ONNX Runtime: 'dynamic' (int8 weights, activations scaled at run time) or
    'static' (int8 weights and activations, QDQ format, ranges calibrated on `calibration`, any
    data form `onnxprune.data` reads)."""
    from onnxruntime import quantization as q

    if mode not in QUANTIZE_MODES:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "static" and calibration is None:
        raise InputError("static quantization needs calibration inputs (--data)")
    with tempfile.TemporaryDirectory(prefix="onnxprune-quant-") as tmp:
        source, target = Path(tmp) / "pruned.onnx", Path(tmp) / "quantized.onnx"
        source.write_bytes(model.SerializeToString())  # by path: given a ModelProto, ORT may move its weights out
        # ORT logs advice ("consider pre-processing") to the root logger: drop just those records,
        # not every logger's (logging.disable is process-wide and would silence other threads).
        quiet = _QuantizerAdvice(os.path.dirname(q.__file__))
        logging.root.addFilter(quiet)
        try:
            if mode == "dynamic":
                q.quantize_dynamic(source, target)
            else:
                q.quantize_static(source, target, _Calibration(model, calibration), quant_format=q.QuantFormat.QDQ)
            return onnx.load(str(target))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{mode} quantization failed in onnxruntime.quantization: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
        finally:
            logging.root.removeFilter(quiet)


class _QuantizerAdvice(logging.Filter):
    """Drops the warnings and infos that `onnxruntime.quantization` logs straight to the root
    logger; records from anywhere else, and ORT's errors, pass."""

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self._prefix = os.path.join(os.path.realpath(package_dir), "")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not os.path.realpath(record.pathname).startswith(self._prefix)


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol, streaming batches from any data form."""

    def __init__(self, model: onnx.ModelProto, data) -> None:
        from onnxprune.data import batch_size_for, iter_batches, model_inputs

        self._batches = iter_batches(data, model_inputs(model), batch_size_for(model))

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


@dataclass
class ModelFigures:
    """One column of the comparison: a model's size, speed and quality."""

    bytes: int
    params: int
    macs: int | None
    ops: int
    latency_ms: dict[str, float] | None = None
    max_abs_diff: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare_models(models: dict[str, onnx.ModelProto], feeds: list[Feeds], eval_data=None, labels: str = "label",
                   bench: bool = False) -> dict[str, ModelFigures]:
    """Figures for each model; the first is the reference whose outputs on `feeds` the others'
    error is measured against. Accuracy needs `eval_data` with a `labels` array."""
    names = list(models)
    reference = session(models[names[0]])
    reference_outputs = [reference.run(None, f)[0] for f in feeds]
    figures = {}
    for name, model in models.items():
        stats = count(model)
        quantized = any(n.op_type in _QUANT_OPS for n in model.graph.node)
        fig = ModelFigures(stats.bytes, stats.params, None if quantized else stats.macs, sum(stats.ops.values()))
        runner = reference if name == names[0] else session(model)
        outputs = reference_outputs if name == names[0] else [runner.run(None, f)[0] for f in feeds]
        fig.max_abs_diff, fig.cosine, fig.top1_agreement = agreement(reference_outputs, outputs)
        if eval_data is not None:
            fig.accuracy = accuracy(model, eval_data, labels, runner)
        figures[name] = fig
    if bench:
        for fig, lat in zip(figures.values(), interleaved_latency([models[n] for n in names], feeds[0])):
            fig.latency_ms = lat
    return figures


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float | None, float | None]:
    """Max abs difference, cosine similarity and arg-max agreement of the first output, over all
    samples of all batches (not the worst batch: every sample counts once), by the same
    `verify.compare_outputs` that verification uses."""
    a, b = (np.concatenate([np.atleast_1d(np.asarray(x)) for x in outputs]) for outputs in (reference, other))
    if a.shape != b.shape:
        raise InputError(f"output shapes differ: {a.shape} against {b.shape}")
    cmp = compare_outputs("output", a, b, DEFAULT_ATOL, DEFAULT_RTOL)
    return cmp.max_abs_diff, cmp.cosine, cmp.top1_agreement


_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
              "QLinearConv", "QLinearMatMul"}


def accuracy(model: onnx.ModelProto, eval_data, labels: str, sess=None) -> float:
    """Top-1 accuracy of the first output (class scores on the last axis), streamed batch by batch
    over `eval_data`, which holds the model inputs plus a `labels` array of class ids."""
    from onnxprune.data import batch_size_for, iter_batches, model_inputs

    names = model_inputs(model)
    sess = sess or session(model)
    correct = total = 0
    for batch in iter_batches(eval_data, names, batch_size_for(model), extra=(labels,)):
        if labels not in batch:
            raise InputError(f"evaluation data has no labels array {labels!r} (see --labels)")
        target = np.asarray(batch[labels]).reshape(-1)
        if not np.issubdtype(target.dtype, np.integer):
            raise InputError(f"labels array {labels!r} must hold integer class ids, got {target.dtype}")
        scores = sess.run(None, {n: batch[n] for n in names})[0]
        try:
            correct += top1_correct(scores, target)
        except InputError as exc:
            raise InputError(f"labels array {labels!r}: {exc}") from None
        total += target.size
    if total == 0:
        raise InputError("evaluation data is empty")
    return correct / total


def latency_report(figures: dict[str, ModelFigures], before: str, after: str) -> LatencyReport | None:
    """The original-vs-pruned latency taken from the same interleaved run as the quantized model."""
    a, b = figures[before].latency_ms, figures[after].latency_ms
    return LatencyReport(a, b, threads=1) if a and b else None


def hand_off(original: onnx.ModelProto, pruned: onnx.ModelProto, mode: str | None, data, feeds: list[Feeds],
             eval_data, labels: str, bench: bool
             ) -> tuple[onnx.ModelProto | None, dict[str, ModelFigures], LatencyReport | None]:
    """Quantize the pruned model (when `mode` is set) and measure original, pruned and quantized.

    `feeds` are the batches already read from `data` (or random ones when `data` is None). Static
    calibration uses them only when they come from user data: ranges calibrated on random inputs
    would be meaningless. Reusing the batches also serves one-shot sources (readers, generators).
    Error against the original is measured on `feeds`, accuracy on `eval_data`.
    """
    if mode is not None and mode not in QUANTIZE_MODES:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    quantized = quantize_model(pruned, mode, feeds if data is not None else None) if mode else None
    models = {"original": original, "pruned": pruned}
    if quantized is not None:
        models["quantized"] = quantized
    figures = compare_models(models, feeds, eval_data, labels, bench)
    return quantized, figures, latency_report(figures, "original", "pruned")
