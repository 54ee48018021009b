"""The Python API: analyze, prune, verify. Each accepts a path or a ModelProto and never
modifies its input."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

import numpy as np
import onnx

from onnxprune.calibration import Calibration
from onnxprune.data import is_one_shot, spool
from onnxprune.errors import InputError, VerificationError
from onnxprune.heads import freeze_hidden, with_head_ratio
from onnxprune.importance import GRADIENT_CRITERIA, Criterion, score_groups
from onnxprune.ir import ModelMeta, check_model, from_graph, load_model, opset_version, save_model
from onnxprune.metrics import ModelStats, count
from onnxprune.passes.dead_channels import find_dead_channels
from onnxprune.passes.dependency import Analysis, analyze_graph
from onnxprune.passes.fold_constants import folded_graph
from onnxprune.passes.recover import RecoverMethod
from onnxprune.passes.rewrite import attach_inferred_shapes, rewrite
from onnxprune.plan import GroupPlan, Plan, RoundTo, global_plan, uniform_plan
from onnxprune.validate import check_shapes_fit
from onnxprune.verify import (DEFAULT_ATOL, DEFAULT_RTOL, LatencyReport, VerifyReport, benchmark, compare,
                              random_inputs)

if TYPE_CHECKING:
    from onnxprune.passes.stats import Statistics
    from onnxprune.quantize import ModelFigures, QuantChoice, QuantOptions
    from onnxprune.train.distill import DistillOptions

ModelLike = "str | os.PathLike[str] | onnx.ModelProto"
REPORT_VERSION = 1
LOSSLESS_TOL = 1e-5


GQA_UNITS = ("kv", "query")


def analyze(model: "str | os.PathLike[str] | onnx.ModelProto", exclude: Iterable[str] = (),
            prune_hidden: bool = False, gqa: Literal["kv", "query"] = "kv") -> Analysis:
    """Dependency analysis: channel groups, which are prunable, and why the others are frozen."""
    return _analysis(_load_checked(model), exclude, prune_hidden, gqa)


def _load_checked(model: "str | os.PathLike[str] | onnx.ModelProto") -> onnx.ModelProto:
    """The model, loaded and refused with one line if it is not a valid, prunable graph."""
    sizes: list[int | None] = []  # payload sizes seen by the reader: the check need not copy them
    proto = load_model(model, sizes)
    _check_graph(proto, _label(model), sizes)
    return proto


def _analysis(proto: onnx.ModelProto, exclude: Iterable[str], prune_hidden: bool, gqa: str = "kv") -> Analysis:
    if gqa not in GQA_UNITS:
        raise InputError(f"gqa must be one of {', '.join(GQA_UNITS)}, got {gqa!r}")
    analysis = analyze_graph(folded_graph(proto), opset_version(proto), gqa)
    if exclude:
        analysis.exclude(list(exclude))
    if not prune_hidden:
        freeze_hidden(analysis)
    return analysis


@dataclass
class PruneReport:
    """Figures of one prune run; `to_dict` is the documented JSON report."""

    before: ModelStats
    after: ModelStats
    analysis: dict
    groups_pruned: int
    channels_removed: int
    verify: VerifyReport | None = None
    latency: LatencyReport | None = None
    notes: list[str] = field(default_factory=list)
    quantize: str | None = None
    quantization: "QuantChoice | None" = None
    """What the quantization hand-off chose (types, format, per-channel, pre-processing) and why."""
    models: "dict[str, ModelFigures]" = field(default_factory=dict)
    """Side-by-side figures (original, pruned, quantized) when quantizing or given eval data."""
    layers: list[dict] = field(default_factory=list)
    """Per channel group: key, producers, channels, removed, frozen reasons (charts, dashboards)."""
    distill: dict | None = None
    """The distillation that followed pruning (`prune(..., distill=...)`): `DistillHistory.to_dict()`."""
    rounds: list[dict] = field(default_factory=list)
    """Per round of an iterative schedule (`steps` > 1): `onnxprune.train.schedule.Round.to_dict()`."""

    def to_dict(self) -> dict:
        out = {
            "report_version": REPORT_VERSION,
            "params_before": self.before.params, "params_after": self.after.params,
            "macs_before": self.before.macs, "macs_after": self.after.macs,
            "bytes_before": self.before.bytes, "bytes_after": self.after.bytes,
            "ops_before": sum(self.before.ops.values()), "ops_after": sum(self.after.ops.values()),
            "groups_total": self.analysis["groups_total"],
            "groups_pruned": self.groups_pruned,
            "groups_frozen": self.analysis["groups_frozen"],
            "channels_removed": self.channels_removed,
            "notes": self.notes,
        }
        if self.verify is not None:
            out["verify"] = self.verify.to_dict()
        if self.latency is not None:
            out["latency_ms"] = self.latency.to_dict()
        if self.quantize is not None:
            out["quantize"] = self.quantize
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        if self.models:
            out["models"] = {name: figures.to_dict() for name, figures in self.models.items()}
        out["layers"] = self.layers
        if self.distill is not None:
            out["distill"] = self.distill
        if self.rounds:
            out["rounds"] = self.rounds
        return out


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: PruneReport
    quantized: onnx.ModelProto | None = None
    """The pruned model after ONNX Runtime quantization, when `quantize` was given."""

    def save(self, path: "str | os.PathLike[str]", external_data: "bool | str" = False) -> None:
        save_model(self.model, path, external_data)

    def save_quantized(self, path: "str | os.PathLike[str]", external_data: "bool | str" = False) -> None:
        """Write the quantized model; only after `prune(..., quantize=...)`."""
        if self.quantized is None:
            raise InputError("no quantized model: prune was called without quantize='dynamic' or 'static'")
        save_model(self.quantized, path, external_data)


def prune(
    model: "str | os.PathLike[str] | onnx.ModelProto",
    *,
    ratio: float = 0.5,
    criterion: "str | Criterion" = "l1",
    scope: Literal["local", "global"] = "local",
    round_to: "int | Literal['auto'] | None" = None,
    exclude: Iterable[str] = (),
    lossless: bool = False,
    plan: "Plan | str | os.PathLike[str] | None" = None,
    seed: int = 0,
    verify: bool = False,
    data: "str | os.PathLike[str] | dict[str, np.ndarray] | None" = None,
    atol: float | None = None,
    rtol: float | None = None,
    bench: bool = False,
    target_latency: float | None = None,
    latency_table: "str | os.PathLike[str] | None" = None,
    quantize: Literal["dynamic", "static"] | None = None,
    quant_format: Literal["qdq", "qoperator"] | None = None,
    activation_type: Literal["int8", "uint8"] | None = None,
    weight_type: Literal["int8", "uint8"] | None = None,
    per_channel: bool | None = None,
    calibration: Literal["minmax", "entropy", "percentile"] | None = None,
    eval_data: "str | os.PathLike[str] | dict[str, np.ndarray] | None" = None,
    labels: str = "label",
    stats: "Statistics | str | os.PathLike[str] | None" = None,
    gradients: "str | os.PathLike[str] | dict[str, np.ndarray] | None" = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    max_ratio: float = 0.9,
    recover: RecoverMethod | None = None,
    quiet: bool = False,
    head_ratio: float | None = None,
    prune_hidden: bool = False,
    gqa: Literal["kv", "query"] = "kv",
    distill: "bool | DistillOptions" = False,
    steps: int = 1,
) -> PruneResult:
    """Prune a model and return the new model, the plan used and a report.

    `quant_format`, `activation_type`, `weight_type`, `per_channel` and `calibration` override what
    the hand-off chooses for this machine (`onnxprune.quantize.choose_quantization`; with `bench`,
    the faster of QDQ and QOperator is measured); the choice is in `report.quantization`.

    `lossless` removes only channels proven constant (outputs unchanged); otherwise `ratio` of each
    group (scope 'local') or of all channels (scope 'global') is removed, lowest `criterion` score
    first. Kept counts are latency-friendly by default (`round_to=None`): Conv groups keep multiples
    of ONNX Runtime's NCHWc block measured on this machine, or the top of their measured latency
    step when a `latency_table` is given; `round_to=1` keeps exact counts, an integer N multiples
    of N, 'auto' the latency steps (table measured now when none is given). A saved `plan`
    replays an earlier run exactly (its counts as recorded). With `verify`, a failed comparison raises
    `VerificationError`. `quantize` hands the pruned model to ONNX Runtime's quantizer (static
    calibrates on `data`); with it or `eval_data` (inputs plus a `labels` array) the report compares
    original, pruned and quantized side by side (`report.models`).

    Data-driven pruning: `data` (any form `onnxprune.data` reads) or saved `stats` feed the
    activation/apoz/wanda criteria, `plan="auto"` and recovery; `gradients` feed taylor. Without
    `gradients`, criterion 'taylor' or 'fisher' with `data` computes them on a loss over `data`
    (the `labels` array when present; needs the `train` extra; `onnxprune.train.gradients`).
    `target_macs` / `target_params` (fractions to keep) replace `ratio` with a global ranking, no
    group losing more than `max_ratio`. `recover` (default: bias when data or stats are given)
    compensates removed channels in the next layer's bias or re-fits it by least squares.
    `head_ratio` gives attention-head groups their own ratio; `prune_hidden` lets the hidden size
    of transformers (the residual stream) be pruned too, which is lossy (`onnxprune.heads`).
    `gqa` is the unit of grouped-query attention: 'kv' a KV head with its query heads, 'query'
    query position j of every KV group (K/V projections kept, the repeat count shrinks).
    Options that the chosen mode would ignore (a ratio with a target, head_ratio with a target,
    criterion options with a replayed plan, ...) are refused with `InputError`.

    `distill` (True, or `onnxprune.train.DistillOptions`) distils the pruned model from the
    original on `data` right after pruning (needs the `train` extra); `eval_data` and `labels` then
    also drive early stopping, and every figure of the report is the distilled model's.
    `steps` N > 1 removes the ratio or target in N rounds, re-scoring (and distilling from the
    original) between them; `report.rounds` holds each round's figures (`onnxprune.train.schedule`).

    A `data` source that can be read only once (a generator, a `get_next()` reader) is copied once,
    batch by batch, into a temporary .npz directory that every step re-reads.
    """
    if data is not None and is_one_shot(data):
        options = {k: v for k, v in locals().items() if k not in ("model", "data")}
        with tempfile.TemporaryDirectory(prefix="onnxprune-data-") as tmp:
            return prune(model, data=spool(data, tmp), **options)
    if distill:
        _check_distill(data)
    if steps != 1:
        options = {k: v for k, v in locals().items() if k != "model"}
        from onnxprune.train.schedule import run_steps

        return run_steps(model, **options)
    _check_options(ratio=ratio, criterion=criterion, scope=scope, round_to=round_to, lossless=lossless, plan=plan,
                   target_macs=target_macs, target_params=target_params, target_latency=target_latency,
                   max_ratio=max_ratio, head_ratio=head_ratio)
    from onnxprune.quantize import QuantOptions, check_quant_options

    quant_options = QuantOptions(quant_format, activation_type, weight_type, per_channel, calibration)
    check_quant_options(quantize, quant_options)
    original = _load_checked(model)
    meta = ModelMeta.of(original)
    analysis = _analysis(original, exclude, prune_hidden, gqa)
    if lossless:
        analysis.freeze_lossy()
    summary = analysis.summary()
    calib = Calibration.prepare(original, analysis, data=data, stats=stats, gradients=gradients, criterion=criterion,
                                recover="none" if lossless else recover, auto_plan=plan == "auto", quiet=quiet)
    if not lossless and criterion in GRADIENT_CRITERIA:
        from onnxprune.train.gradients import gradient_criterion

        criterion, notes = gradient_criterion(original, analysis, criterion, data, gradients=calib.gradients,
                                              labels=labels, seed=seed, quiet=quiet)
        calib.notes.extend(notes)
    latency_notes: list[str] = []
    replay = plan is not None and plan != "auto"
    if not lossless and not replay and target_latency is not None:
        units, values, chosen = _choose_for_latency(original, analysis, calib, criterion, seed, target_latency,
                                                    latency_table, max_ratio, latency_notes)
    else:
        rounded = 1 if lossless or replay else _rounding(round_to, original, analysis, latency_table, latency_notes)
        if not lossless and (plan == "auto" or target_macs is not None or target_params is not None):
            units, values, chosen = _choose_for_target(original, analysis, calib, criterion, plan, target_macs,
                                                       target_params, max_ratio, rounded, data, labels, seed, quiet)
        else:
            units, values, chosen = _choose(analysis, ratio, criterion, scope, rounded, lossless, plan, seed, calib,
                                            head_ratio, max_ratio)
    values, fits = calib.recovery(analysis, units, values)
    result = rewrite(analysis, units, values)
    calib.apply(analysis.graph, original, fits)
    analysis.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    before = count(original)
    # A model read from a file is ours: the export reuses its proto so weights are never held twice.
    # Steps that need the original afterwards (verify, bench, quantize) get the copying export.
    reuse = not isinstance(model, onnx.ModelProto) and not (verify or bench or quantize or eval_data is not None
                                                            or distill)
    pruned = from_graph(analysis.graph, meta, into=original if reuse else None)
    if reuse:
        original = None  # its storage now holds the pruned model
    attach_inferred_shapes(pruned)
    try:
        _check_output(pruned)
    except VerificationError:  # an input whose shapes never fitted is refused, not reported as our bug
        check_shapes_fit(original if original is not None else load_model(model), _label(model))
        raise
    distilled = None
    if distill:
        pruned, distilled = _distill(original, pruned, distill, data, eval_data, labels, seed, quiet)
        if eval_data is not None and not _holds(eval_data, labels):
            labels = None  # unlabelled held-out data stopped the training early; outputs are compared, no accuracy
    report = PruneReport(before, count(pruned), summary, sum(1 for u in units.values() if len(u)),
                         result.removed_channels, distill=distilled)
    report.layers = _layers(analysis, units)
    report.notes.extend(calib.notes)
    report.notes.extend(latency_notes)
    if result.inexact_nodes:
        report.notes.append(f"bias compensation is approximate at {len(result.inexact_nodes)} padded consumers")
    return _measured_result(pruned, chosen, report, original, data=data, seed=seed, verify=verify, bench=bench,
                            atol=atol, rtol=rtol, lossless=lossless, quantize=quantize, eval_data=eval_data,
                            labels=labels, quant_options=quant_options)


def _measured_result(pruned: onnx.ModelProto, chosen: Plan, report: PruneReport, original: onnx.ModelProto, *,
                     data, seed: int, verify: bool, bench: bool, atol: float | None, rtol: float | None,
                     lossless: bool, quantize: "str | None", eval_data, labels: "str | None",
                     quant_options: "QuantOptions | None" = None) -> PruneResult:
    """The result, after verification, latency and side-by-side figures against `original` when
    asked for (one-shot prune and the last round of `steps`); a failed comparison raises
    `VerificationError` carrying the result."""
    quantized = None
    if verify or bench or quantize is not None or eval_data is not None:
        tolerance = (atol if atol is not None else (LOSSLESS_TOL if lossless else DEFAULT_ATOL),
                     rtol if rtol is not None else (LOSSLESS_TOL if lossless else DEFAULT_RTOL))
        quantized = _measure(report, original, pruned, data=data, seed=seed, verify=verify, bench=bench,
                             tolerance=tolerance, quantize=quantize, eval_data=eval_data, labels=labels,
                             options=quant_options)
    result = PruneResult(pruned, chosen, report, quantized)
    if report.verify is not None and not report.verify.passed:
        raise VerificationError(
            f"pruned model differs from the original: max abs diff {report.verify.max_abs_diff:.3g} "
            f"(atol {report.verify.atol:g}, rtol {report.verify.rtol:g})", result)
    return result


def _measure(report: PruneReport, original: onnx.ModelProto, pruned: onnx.ModelProto, *, data, seed: int,
             verify: bool, bench: bool, tolerance: tuple[float, float], quantize: "str | None", eval_data,
             labels: "str | None", options: "QuantOptions | None" = None) -> onnx.ModelProto | None:
    """Fill the report's verification, latency and side-by-side figures; return the quantized model.

    Data is streamed for a plain verification (large data never sits in memory) and read once
    when the quantization hand-off needs the same batches again."""
    hand_over = quantize is not None or eval_data is not None
    feeds = load_feeds(data, original, seed) if hand_over else None
    if verify:
        report.verify = compare(original, pruned, feeds if feeds is not None else iter_feeds(data, original, seed),
                                *tolerance)
    if not hand_over:
        if bench:
            report.latency = benchmark(original, pruned, next(iter_feeds(data, original, seed)))
        return None
    from onnxprune.quantize import hand_off

    quantized, report.models, latency, report.quantization, warnings = hand_off(
        original, pruned, quantize, data, feeds, eval_data, labels, bench, options)
    report.quantize, report.latency = quantize, latency or report.latency
    report.notes.extend(warnings)
    return quantized


def _check_distill(data) -> None:
    """Refuse `distill` without data or without torch before any pruning work is done."""
    from onnxprune.train import require_torch

    if data is None:
        raise InputError("distill needs data: the pruned model is trained on it to imitate the original")
    require_torch("distill")


def _distill(original: onnx.ModelProto, pruned: onnx.ModelProto, options: "bool | DistillOptions", data,
             eval_data, labels: str, seed: int, quiet: bool) -> tuple[onnx.ModelProto, dict]:
    """The pruned model distilled from the original, and the history for the report. Given
    `True`, default options with prune's seed, quiet flag and evaluation labels."""
    from onnxprune.train.distill import DistillOptions, run_distillation

    if not isinstance(options, DistillOptions):
        options = DistillOptions(seed=seed, quiet=quiet, eval_labels=labels)
    model, history = run_distillation(pruned, original, data, options, eval_data)
    return model, history.to_dict()


def _holds(data, name: str) -> bool:
    """Whether `data` has an array `name` (read from its first batch; a one-shot source, which a
    peek would consume, is taken to have it)."""
    from onnxprune.data import is_one_shot, iter_batches

    if is_one_shot(data):
        return True
    return name in next(iter_batches(data, [], 1, extra=(name,), limit=1), {})


def _check_options(*, ratio: float, criterion: "str | Criterion", scope: str, round_to: "int | str", lossless: bool,
                   plan: "Plan | str | os.PathLike[str] | None", target_macs: float | None,
                   target_params: float | None, target_latency: float | None, max_ratio: float,
                   head_ratio: float | None) -> None:
    """Refuse option combinations where one option would be silently ignored: the user asked for
    something the run would not do. Defaults count as "not given" (the CLI passes them all); ratio 0
    agrees with lossless (nothing removed by criterion)."""
    replay = plan is not None and not (isinstance(plan, str) and plan == "auto")
    targets = [name for name, value in (("target_macs", target_macs), ("target_params", target_params),
                                        ("target_latency", target_latency)) if value is not None]
    if lossless:
        given = [n for n, on in (("ratio", ratio not in (0.0, 0.5)), ("head_ratio", head_ratio is not None),
                                 ("plan 'auto'", plan == "auto"), ("round_to 'auto'", round_to == "auto"),
                                 *((t, True) for t in targets)) if on]
        if given:
            raise InputError(f"lossless removes only provably constant channels; it takes no {', '.join(given)}")
    if replay:
        given = [n for n, on in (("ratio", ratio != 0.5), ("criterion", criterion != "l1"),
                                 ("scope", scope != "local"), ("round_to", round_to is not None),
                                 ("max_ratio", max_ratio != 0.9), ("head_ratio", head_ratio is not None),
                                 *((t, True) for t in targets)) if on]
        if given:
            raise InputError(f"a replayed plan fixes the removed channels; it takes no {', '.join(given)}")
    if targets and ratio != 0.5:
        raise InputError(f"ratio {ratio:g} and {targets[0]} both set how much to remove: give one of them")
    if head_ratio is not None and (targets or plan == "auto" or round_to == "auto"):
        what = targets[0] if targets else "plan 'auto'" if plan == "auto" else "round_to 'auto'"
        raise InputError(f"head_ratio applies to ratio plans only, not with {what}")
    if round_to is not None and round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                                        or round_to < 1):
        raise InputError(f"round_to must be an integer >= 1, 'auto' or None (latency-friendly default), "
                         f"got {round_to!r}")
    if round_to is not None and target_latency is not None:
        raise InputError("target_latency plans on the measured latency steps itself; it takes no round_to")
    if scope not in ("local", "global"):
        raise InputError(f"scope must be 'local' or 'global', got {scope!r}")


def _layers(analysis: Analysis, units: dict[int, np.ndarray]) -> list[dict]:
    """Per-group channels kept and removed, in analysis order: the report's per-layer view."""
    return [{"group": g.key, "producers": list(g.producers), "channels": g.size,
             "removed": int(len(units.get(g.id, ()))), "frozen": sorted(set(g.frozen))} for g in analysis.groups]


def _choose_for_latency(original: onnx.ModelProto, analysis: Analysis, calib: Calibration,
                        criterion: "str | Criterion", seed: int, target_latency: float,
                        latency_table: "str | os.PathLike[str] | None", max_ratio: float, notes: list[str]
                        ) -> "tuple[dict[int, np.ndarray], None, Plan]":
    """Removed units planned on measured latency to meet `target_latency`."""
    from onnxprune.latency import latency_plan, table_for

    table = table_for(original, analysis, latency_table)
    scores = score_groups(analysis, criterion, seed, stats=calib.stats, gradients=calib.gradients)
    chosen, estimated = latency_plan(analysis, scores, table, target_latency, max_ratio)
    notes.append(f"latency plan: estimated latency ratio {estimated:.3f} ({table.setting})")
    return chosen.resolve(analysis), None, chosen


def _rounding(round_to: "int | str | None", original: onnx.ModelProto, analysis: Analysis,
              latency_table: "str | os.PathLike[str] | None", notes: list[str]) -> "RoundTo":
    """What kept counts are rounded by: an integer multiple as given, the latency steps of a table
    ('auto', or the default when a table is given), else (the default) ORT's NCHWc block on this
    machine for Conv groups. Rounding is noted in the report."""
    if isinstance(round_to, int):
        return round_to
    from onnxprune.latency import BLOCK, block_rounding, conv_group_keys, layout_block, table_for, table_rounding

    if round_to == "auto" or latency_table is not None:
        table = table_for(original, analysis, latency_table)
        notes.append(f"channel counts rounded to latency steps ({table.setting})")
        return table_rounding(table, block_rounding(analysis, table.layout_block or BLOCK))
    block = layout_block() or BLOCK
    if conv_group_keys(analysis):
        notes.append(f"Conv channel counts kept at multiples of {block} (ONNX Runtime's NCHWc block on this "
                     "machine; round_to=1 keeps exact counts)")
    return block_rounding(analysis, block)


def _choose_for_target(original: onnx.ModelProto, analysis: Analysis, calib: Calibration, criterion: "str | Criterion",
                       plan: "Plan | str | os.PathLike[str] | None", target_macs: float | None,
                       target_params: float | None, max_ratio: float, round_to: "RoundTo", data, labels: str, seed: int,
                       quiet: bool) -> "tuple[dict[int, np.ndarray], None, Plan]":
    """Removed units meeting MACs/params targets: global ranking, or measured sensitivity (`auto`)."""
    from onnxprune.plan import target_plan

    scores = score_groups(analysis, criterion, seed, stats=calib.stats, gradients=calib.gradients)
    if plan == "auto":
        from onnxprune.sensitivity import auto_plan

        chosen, _ = auto_plan(original, analysis, scores, calib, data, target_macs=target_macs,
                              target_params=target_params, max_ratio=max_ratio, criterion=criterion, labels=labels,
                              seed=seed, quiet=quiet, round_to=round_to)
    else:
        chosen = target_plan(analysis, scores, target_macs=target_macs, target_params=target_params,
                             max_ratio=max_ratio, round_to=round_to)
    return chosen.resolve(analysis), None, chosen


def _choose(analysis: Analysis, ratio: float, criterion: "str | Criterion", scope: str, round_to: "RoundTo",
            lossless: bool,
            plan: "Plan | str | os.PathLike[str] | None", seed: int, calib: Calibration | None = None,
            head_ratio: float | None = None, max_ratio: float = 0.9
            ) -> "tuple[dict[int, np.ndarray], dict | None, Plan]":
    """Decide the removed units per group: from a plan, the dead channels, or a criterion."""
    values = None
    if plan is not None:
        chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
        units = chosen.resolve(analysis)
        if lossless:
            values = find_dead_channels(analysis).values
        return units, values, chosen
    if lossless:
        dead = find_dead_channels(analysis)
        units, values = dead.units, dead.values
    else:
        scores = score_groups(analysis, criterion, seed, stats=calib and calib.stats,
                              gradients=calib and calib.gradients)
        planned = (uniform_plan(analysis, scores, ratio, round_to) if scope == "local"
                   else global_plan(analysis, scores, ratio, round_to, max_ratio))
        if head_ratio is not None:
            planned = with_head_ratio(planned, analysis, scores, head_ratio)
        units = planned.resolve(analysis)
    chosen = Plan()
    for group in analysis.prunable:
        chosen.groups.append(GroupPlan(group.key, group.size, [int(u) for u in units.get(group.id, [])]))
    return units, values, chosen


def load_feeds(data: object, model: onnx.ModelProto, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """All verification batches in a list, for callers that read them more than once (quantization
    hand-off); `iter_feeds` streams them."""
    return list(iter_feeds(data, model, seed))


def iter_feeds(data: object, model: onnx.ModelProto, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Inputs for verification, batch by batch so memory does not grow with the data: any data form
    `onnxprune.data` reads, a dict, or (None) two seeded random batches."""
    if data is None:
        yield random_inputs(model, seed)
        yield random_inputs(model, seed + 1, batch=2)
        return
    if isinstance(data, dict):
        yield data
        return
    from onnxprune.data import batch_size_for, iter_batches, model_inputs

    empty = True
    for batch in iter_batches(data, model_inputs(model), batch_size_for(model)):
        empty = False
        yield batch
    if empty:
        raise InputError(f"{data}: no input data")


def verify(
    original: "str | os.PathLike[str] | onnx.ModelProto",
    pruned: "str | os.PathLike[str] | onnx.ModelProto",
    data: "str | os.PathLike[str] | dict[str, np.ndarray] | None" = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> VerifyReport:
    """Compare two models' outputs in ONNX Runtime (optimisations off) on the same inputs.

    `data` is any form `onnxprune.data` reads (an .npz path, a `{name: array}` dict, ...), or None
    for seeded random inputs. The report is truthy when every output passes
    |a-b| <= atol + rtol*|a|; a difference is reported, never raised.
    """
    a, b = load_model(original), load_model(pruned)
    return compare(a, b, iter_feeds(data, a, seed), atol, rtol)


def _label(source) -> str:
    """How errors name the model: its path, or "model" for one given in memory."""
    return "model" if isinstance(source, onnx.ModelProto) else str(source)


def _check_graph(model: onnx.ModelProto, label: str = "model", raw_sizes: "list[int | None] | None" = None
                 ) -> None:
    """Refuse graphs the checker rejects (dangling inputs, cycles, duplicate names), and shapes that
    do not fit together (a weight that does not match its layer would mislead the analysis).
    `raw_sizes`: the payload sizes `load_model` saw for `model`."""
    try:
        # by path on a weight-free copy: no weight copy, no 2 GB limit
        check_model(model, full_check=True, raw_sizes=raw_sizes)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InputError(f"{label}: invalid model: {first[:300]}") from None
    except ValueError as exc:  # models above 2 GB are checked by path elsewhere
        if "2GB" not in str(exc):
            raise InputError(f"{label}: invalid model: {str(exc)[:300]}") from None


def _check_output(model: onnx.ModelProto) -> None:
    try:
        check_model(model, full_check=True, payloads=False)  # its tensors: the checked input's or ours
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise VerificationError(f"pruned model fails the ONNX checker (a bug, please report): {first[:300]}") from None
