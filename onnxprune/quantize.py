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
import platform
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.metrics import count
from onnxprune.scores import ClassScores, class_scores
from onnxprune.verify import (DEFAULT_ATOL, DEFAULT_RTOL, LatencyReport, compare_outputs, interleaved_latency, session,
                              top1_classes)

QUANTIZE_MODES = ("dynamic", "static")
QUANT_FORMATS = ("qdq", "qoperator")
INT8_TYPES = ("int8", "uint8")
CALIBRATIONS = ("minmax", "entropy", "percentile")
DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
"""Ops quantized dynamically: Conv is left out, ORT runs ConvInteger slower than the float Conv."""
Feeds = dict[str, np.ndarray]


@dataclass
class QuantOptions:
    """What the user fixed for quantization (None: onnxprune chooses)."""

    quant_format: str | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    per_channel: bool | None = None
    calibration: str | None = None

    def given(self) -> list[str]:
        return [name for name, value in self.__dict__.items() if value is not None]


@dataclass
class QuantChoice:
    """How the pruned model was quantized and why: recorded in the report."""

    mode: str
    quant_format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    preprocess: bool
    calibration: str | None
    op_types: list[str] | None
    """Op types quantized; None: ONNX Runtime's defaults for the mode."""
    isa: str
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    """With bench: each candidate's settings and median latency (ms) from one interleaved run."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        types = f"{'U' if self.activation_type == 'uint8' else 'S'}8{'U' if self.weight_type == 'uint8' else 'S'}8"
        parts = [self.mode, self.quant_format.upper() if self.mode == "static" else "integer ops", types,
                 "per-channel" if self.per_channel else "per-tensor"]
        parts += ["reduce-range"] * self.reduce_range + ["pre-processed"] * self.preprocess
        if self.calibration:
            parts.append(f"{self.calibration} calibration")
        return ", ".join(parts) + f" (chosen for {self.isa})"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of this machine (/proc/cpuinfo; `cpuinfo` gives the text instead, for
    tests); empty where the file does not exist."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def instruction_set(flags: set[str], machine: str | None = None) -> str:
    """The int8 instruction set ORT's kernels use here: 'avx512_vnni', 'avx_vnni', 'avx512',
    'avx2', 'arm64' or 'other'."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64") or "asimd" in flags:
        return "arm64"
    for isa, needs in (("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"), ("avx512", "avx512bw"),
                       ("avx2", "avx2")):
        if needs in flags:
            return isa
    return "other"


def choose_quantization(mode: str, options: QuantOptions | None = None, flags: set[str] | None = None,
                        machine: str | None = None) -> QuantChoice:
    """Settings for ORT's quantizer on this machine, following ORT's guidance per instruction set:
    on x86, unsigned activations with signed per-channel weights (U8S8) map to the int8 GEMM/Conv
    kernels (VPMADDUBSW / VNNI), while signed activations (S8S8, the quantizer's QDQ default) are
    the choice on ARM; without VNNI, weights use 7 bits (`reduce_range`) so that u8*s8 pair sums
    cannot saturate int16. Pre-processing (`quant_pre_process`: shape inference, BatchNorm and
    other fusions) runs first. Options the user fixed are kept; bad combinations are refused."""
    options = options or QuantOptions()
    check_quant_options(mode, options)
    isa = instruction_set(cpu_flags() if flags is None else flags, machine)
    reasons = []
    arm = isa == "arm64"
    activation = options.activation_type or ("uint8" if mode == "dynamic" or not arm else "int8")
    weight = options.weight_type or "int8"
    if options.activation_type is None:
        reasons.append("dynamic quantization computes uint8 activations at run time" if mode == "dynamic" else
                       f"{'S8S8 is ORT' if arm else 'U8S8 is ORT'}'s fast int8 path on {isa}")
    per_channel = options.per_channel if options.per_channel is not None else mode == "static"
    reduce_range = isa in ("avx2", "avx512") and activation == "uint8" and weight == "int8"
    if reduce_range:
        reasons.append(f"no VNNI on {isa}: 7-bit weights avoid u8*s8 saturation")
    fmt = options.quant_format or "qdq"
    calibration = (options.calibration or "minmax") if mode == "static" else None
    ops = DYNAMIC_OPS if mode == "dynamic" else None
    if mode == "dynamic":
        reasons.append("Conv stays float (ConvInteger is slower than float Conv in ORT)")
    return QuantChoice(mode, fmt, activation, weight, per_channel, reduce_range, True, calibration,
                       None if ops is None else list(ops), isa, reasons)


def check_quant_options(mode: str | None, options: QuantOptions) -> None:
    """Refuse quantization options that have no effect or no ORT kernels, with one line."""
    given = options.given()
    if mode is None:
        if given:
            raise InputError(f"{given[0]} applies to quantization: give quantize='static' or 'dynamic'")
        return
    if mode not in QUANTIZE_MODES:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    for name, value, allowed in (("quant_format", options.quant_format, QUANT_FORMATS),
                                 ("activation_type", options.activation_type, INT8_TYPES),
                                 ("weight_type", options.weight_type, INT8_TYPES),
                                 ("calibration", options.calibration, CALIBRATIONS)):
        if value is not None and value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if mode == "dynamic":
        fixed = [n for n in ("quant_format", "calibration") if getattr(options, n) is not None]
        if fixed:
            raise InputError(f"dynamic quantization takes no {fixed[0]} (it has no calibration and one format)")
        if options.activation_type == "int8":
            raise InputError("dynamic quantization quantizes activations to uint8 at run time; "
                             "activation_type int8 needs quantize='static'")
    if options.activation_type == "int8" and options.weight_type == "uint8":
        raise InputError("activation_type int8 with weight_type uint8 (S8U8) has no ONNX Runtime kernels")


def quantize_model(model: onnx.ModelProto, mode: str, calibration=None, choice: QuantChoice | None = None,
                   cache: "Path | None" = None) -> onnx.ModelProto:
    """Quantize with ONNX Runtime as `choice` says (default: `choose_quantization(mode)`):
    'dynamic' (int8 weights, activations scaled at run time) or 'static' (weights and activations,
    ranges calibrated on `calibration`, any data form `onnxprune.data` reads). `cache`: a
    calibration cache file shared by candidates of one run (ranges do not depend on the format)."""
    from onnxruntime import quantization as q

    if mode not in QUANTIZE_MODES:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "static" and calibration is None:
        raise InputError("static quantization needs calibration inputs (--data)")
    choice = choice or choose_quantization(mode)
    with tempfile.TemporaryDirectory(prefix="onnxprune-quant-") as tmp:
        source, target = Path(tmp) / "pruned.onnx", Path(tmp) / "quantized.onnx"
        source.write_bytes(model.SerializeToString())  # by path: given a ModelProto, ORT may move its weights out
        # ORT logs advice ("consider pre-processing") to the root logger: drop just those records,
        # not every logger's (logging.disable is process-wide and would silence other threads).
        quiet = _QuantizerAdvice(os.path.dirname(q.__file__))
        loggers = [logging.root, logging.getLogger("onnxruntime.quantization.shape_inference")]
        for logger in loggers:  # the pre-processor logs its progress to a logger of its own
            logger.addFilter(quiet)
        try:
            if choice.preprocess:
                source = _preprocessed(source, Path(tmp) / "preprocessed.onnx", choice)
            types = {"int8": q.QuantType.QInt8, "uint8": q.QuantType.QUInt8}
            if mode == "dynamic":
                q.quantize_dynamic(source, target, op_types_to_quantize=choice.op_types, per_channel=choice.per_channel,
                                   reduce_range=choice.reduce_range, weight_type=types[choice.weight_type])
            else:
                methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                           "percentile": q.CalibrationMethod.Percentile}
                formats = {"qdq": q.QuantFormat.QDQ, "qoperator": q.QuantFormat.QOperator}
                q.quantize_static(source, target, _Calibration(model, calibration),
                                  quant_format=formats[choice.quant_format], op_types_to_quantize=choice.op_types,
                                  per_channel=choice.per_channel, reduce_range=choice.reduce_range,
                                  activation_type=types[choice.activation_type], weight_type=types[choice.weight_type],
                                  calibrate_method=methods[choice.calibration], calibration_cache_path=cache)
            return onnx.load(str(target))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{mode} quantization failed in onnxruntime.quantization: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)


def _preprocessed(source: Path, target: Path, choice: QuantChoice) -> Path:
    """`quant_pre_process` of `source` (symbolic shape inference, then without it when it fails);
    the unprocessed model, noted in `choice`, when neither works."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=skip_symbolic)
            return target
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; its failure is noted
            continue
    choice.preprocess = False
    choice.reasons.append("quant_pre_process failed on this model: quantized without it")
    return source


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
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    """Macro-averaged over classes (`onnxprune.scores`), with labelled evaluation data."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare_models(models: dict[str, onnx.ModelProto], feeds: list[Feeds], eval_data=None,
                   labels: "str | None" = "label",
                   bench: bool = False) -> dict[str, ModelFigures]:
    """Figures for each model; the first is the reference whose outputs on `feeds` the others'
    error is measured against. Accuracy and macro P/R/F1 need `eval_data` with a `labels` array
    (`labels` None: none are computed).
    Latency comes from one interleaved run of all models (optimisations on)."""
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
        if eval_data is not None and labels is not None:
            scores = class_scores_of(model, eval_data, labels, runner)
            fig.accuracy, fig.precision = scores.accuracy, scores.precision
            fig.recall, fig.f1 = scores.recall, scores.f1
        figures[name] = fig
    if bench:
        for fig, lat in zip(figures.values(), interleaved_latency([models[n] for n in names], feeds[0])):
            fig.latency_ms = lat
    return figures


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float | None, float | None]:
    """Max abs difference, cosine similarity and arg-max agreement of the first output, over all
    samples of all batches (not the worst batch: every sample counts once), by the same
    `verify.compare_outputs` that verification uses."""
    a, b = _stacked(reference), _stacked(other)
    if a.shape != b.shape:
        raise InputError(f"output shapes differ: {a.shape} against {b.shape}")
    cmp = compare_outputs("output", a, b, DEFAULT_ATOL, DEFAULT_RTOL)
    return cmp.max_abs_diff, cmp.cosine, cmp.top1_agreement


def _stacked(outputs: list[np.ndarray]) -> np.ndarray:
    """One array of every batch's output. Batches whose shapes differ past the batch axis (token
    batches padded to different lengths) are joined as rows along the last axis when that agrees
    (arg-max agreement stays per position), else as flat vectors."""
    arrays = [np.atleast_1d(np.asarray(x)) for x in outputs]
    if len({a.shape[1:] for a in arrays}) > 1:
        rows = len({a.shape[-1] for a in arrays}) == 1 and all(a.ndim >= 2 for a in arrays)
        arrays = [a.reshape(-1, a.shape[-1]) if rows else a.ravel() for a in arrays]
    return np.concatenate(arrays)


_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
              "QLinearConv", "QLinearMatMul"}


def class_scores_of(model: onnx.ModelProto, eval_data, labels: str, sess=None) -> ClassScores:
    """Top-1 accuracy and macro precision / recall / F1 of the first output (class scores on the
    last axis), batch by batch over `eval_data`, which holds the model inputs plus a `labels`
    array of class ids."""
    from onnxprune.data import batch_size_for, iter_batches, model_inputs

    names = model_inputs(model)
    sess = sess or session(model)
    predicted, truth = [], []
    for batch in iter_batches(eval_data, names, batch_size_for(model), extra=(labels,)):
        if labels not in batch:
            raise InputError(f"evaluation data has no labels array {labels!r} (see --labels)")
        target = np.asarray(batch[labels]).reshape(-1)
        if not np.issubdtype(target.dtype, np.integer):
            raise InputError(f"labels array {labels!r} must hold integer class ids, got {target.dtype}")
        scores = sess.run(None, {n: batch[n] for n in names})[0]
        try:
            predicted.append(top1_classes(scores, target))
        except InputError as exc:
            raise InputError(f"labels array {labels!r}: {exc}") from None
        truth.append(target)
    if not truth or sum(t.size for t in truth) == 0:
        raise InputError("evaluation data is empty")
    return class_scores(np.concatenate(predicted), np.concatenate(truth))


def accuracy(model: onnx.ModelProto, eval_data, labels: str, sess=None) -> float:
    """Top-1 accuracy of the first output over `eval_data` (see `class_scores_of`)."""
    return class_scores_of(model, eval_data, labels, sess).accuracy


def latency_report(figures: dict[str, ModelFigures], before: str, after: str) -> LatencyReport | None:
    """The original-vs-pruned latency taken from the same interleaved run as the quantized model."""
    a, b = figures[before].latency_ms, figures[after].latency_ms
    return LatencyReport(a, b, threads=1) if a and b else None


CANDIDATE_RUNS = 20


def quantize_candidates(pruned: onnx.ModelProto, choice: QuantChoice, options: QuantOptions, calibration,
                        bench: bool, feeds: Feeds | None) -> tuple[onnx.ModelProto, QuantChoice]:
    """The quantized model per `choice`; with `bench` on a static model whose format the user left
    open, both formats (QDQ, QOperator) are quantized and timed in one interleaved run with the
    float model, and the faster one is kept (its figures recorded in `choice.candidates`)."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-calib-") as tmp:
        cache = Path(tmp) / "ranges.json" if choice.mode == "static" else None
        first = quantize_model(pruned, choice.mode, calibration, choice, cache)
        if not bench or choice.mode != "static" or options.quant_format is not None or feeds is None:
            return first, choice
        other = replace(choice, quant_format="qoperator" if choice.quant_format == "qdq" else "qdq",
                        reasons=list(choice.reasons), candidates=[])
        second = quantize_model(pruned, choice.mode, calibration, other, cache)
    float_ms, *quant_ms = interleaved_latency([pruned, first, second], feeds, runs=CANDIDATE_RUNS)
    choice.candidates = [{"quant_format": c.quant_format, "latency_ms": ms["median"],
                          "float_latency_ms": float_ms["median"]}
                         for c, ms in ((choice, quant_ms[0]), (other, quant_ms[1]))]
    if quant_ms[1]["median"] < quant_ms[0]["median"]:
        other.candidates = choice.candidates
        other.reasons.append(f"{other.quant_format.upper()} timed faster than {choice.quant_format.upper()} here")
        return second, other
    choice.reasons.append(f"{choice.quant_format.upper()} timed faster than {other.quant_format.upper()} here")
    return first, choice


def hand_off(original: onnx.ModelProto, pruned: onnx.ModelProto, mode: str | None, data, feeds: list[Feeds],
             eval_data, labels: "str | None", bench: bool, options: QuantOptions | None = None
             ) -> tuple[onnx.ModelProto | None, dict[str, ModelFigures], LatencyReport | None, QuantChoice | None,
                        list[str]]:
    """Quantize the pruned model (when `mode` is set) and measure original, pruned and quantized.

    `feeds` are the batches already read from `data` (or random ones when `data` is None). Static
    calibration uses them only when they come from user data: ranges calibrated on random inputs
    would be meaningless. Reusing the batches also serves one-shot sources (readers, generators).
    Error against the original is measured on `feeds`, accuracy on `eval_data`. Returns the
    quantized model, the figures, the original-vs-pruned latency, the quantization choice and
    warnings (an int8 model that is not faster than the float one).
    """
    options = options or QuantOptions()
    check_quant_options(mode, options)
    quantized = choice = None
    if mode:  # static without `data` is refused by `quantize_model` (no calibration inputs)
        choice = choose_quantization(mode, options)
        quantized, choice = quantize_candidates(pruned, choice, options, feeds if data is not None else None,
                                                bench, feeds[0] if feeds else None)
    models = {"original": original, "pruned": pruned}
    if quantized is not None:
        models["quantized"] = quantized
    figures = compare_models(models, feeds, eval_data, labels, bench)
    warnings = []
    if quantized is not None and bench:
        fast, slow = figures["quantized"].latency_ms["median"], figures["pruned"].latency_ms["median"]
        if fast >= slow:
            warnings.append(f"warning: the int8 model is not faster than the pruned float model ({fast:.3f} ms "
                            f"against {slow:.3f} ms): keep the float model, or try other --quant-format / types")
    return quantized, figures, latency_report(figures, "original", "pruned"), choice, warnings
