"""The Python API: analyze, prune, verify. Each accepts a path or a ModelProto and never
modifies its input."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import onnx

from onnxprune.errors import InputError, VerificationError
from onnxprune.importance import Criterion, score_groups
from onnxprune.ir import ModelMeta, from_graph, load_model, opset_version, save_model, to_graph
from onnxprune.metrics import ModelStats, count
from onnxprune.passes.dead_channels import find_dead_channels
from onnxprune.passes.dependency import Analysis, analyze_graph
from onnxprune.passes.rewrite import attach_inferred_shapes, rewrite
from onnxprune.plan import Plan, global_plan, uniform_plan
from onnxprune.verify import (DEFAULT_ATOL, DEFAULT_RTOL, LatencyReport, VerifyReport, benchmark, compare,
                              random_inputs)

ModelLike = "str | os.PathLike[str] | onnx.ModelProto"
REPORT_VERSION = 1
LOSSLESS_TOL = 1e-5


def analyze(model: "str | os.PathLike[str] | onnx.ModelProto", exclude: Iterable[str] = ()) -> Analysis:
    """Dependency analysis: channel groups, which are prunable, and why the others are frozen."""
    proto = load_model(model)
    _check_graph(proto)
    analysis = analyze_graph(to_graph(proto), opset_version(proto))
    if exclude:
        analysis.exclude(list(exclude))
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
        return out


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    report: PruneReport

    def save(self, path: "str | os.PathLike[str]", external_data: "bool | str" = False) -> None:
        save_model(self.model, path, external_data)


def prune(
    model: "str | os.PathLike[str] | onnx.ModelProto",
    *,
    ratio: float = 0.5,
    criterion: "str | Criterion" = "l1",
    scope: Literal["local", "global"] = "local",
    round_to: int = 1,
    exclude: Iterable[str] = (),
    lossless: bool = False,
    plan: "Plan | str | os.PathLike[str] | None" = None,
    seed: int = 0,
    verify: bool = False,
    data: "str | os.PathLike[str] | dict[str, np.ndarray] | None" = None,
    atol: float | None = None,
    rtol: float | None = None,
    bench: bool = False,
) -> PruneResult:
    """Prune a model and return the new model, the plan used and a report.

    `lossless` removes only channels proven constant (outputs unchanged); otherwise `ratio` of each
    group (scope 'local') or of all channels (scope 'global') is removed, lowest `criterion` score
    first. A saved `plan` replays an earlier run exactly. With `verify`, a failed comparison raises
    `VerificationError`.
    """
    if round_to < 1:
        raise InputError(f"round_to must be >= 1, got {round_to}")
    if scope not in ("local", "global"):
        raise InputError(f"scope must be 'local' or 'global', got {scope!r}")
    original = load_model(model)
    _check_graph(original)
    meta = ModelMeta.of(original)
    analysis = analyze_graph(to_graph(original), opset_version(original))
    if exclude:
        analysis.exclude(list(exclude))
    summary = analysis.summary()
    units, values, chosen = _choose(analysis, ratio, criterion, scope, round_to, lossless, plan, seed)
    result = rewrite(analysis, units, values)
    analysis.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    pruned = from_graph(analysis.graph, meta)
    attach_inferred_shapes(pruned)
    _check_output(pruned)
    report = PruneReport(count(original), count(pruned), summary, sum(1 for u in units.values() if len(u)),
                         result.removed_channels)
    if result.inexact_nodes:
        report.notes.append(f"bias compensation is approximate at {len(result.inexact_nodes)} padded consumers")
    if verify or bench:
        tol_a = atol if atol is not None else (LOSSLESS_TOL if lossless else DEFAULT_ATOL)
        tol_r = rtol if rtol is not None else (LOSSLESS_TOL if lossless else DEFAULT_RTOL)
        feeds = load_feeds(data, original, seed)
        if verify:
            report.verify = compare(original, pruned, feeds, tol_a, tol_r)
        if bench:
            report.latency = benchmark(original, pruned, feeds[0])
    result = PruneResult(pruned, chosen, report)
    if report.verify is not None and not report.verify.passed:
        raise VerificationError(
            f"pruned model differs from the original: max abs diff {report.verify.max_abs_diff:.3g} "
            f"(atol {report.verify.atol:g}, rtol {report.verify.rtol:g})", result)
    return result


def _choose(analysis: Analysis, ratio, criterion, scope, round_to, lossless, plan, seed):
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
        scores = score_groups(analysis, criterion, seed)
        make = uniform_plan if scope == "local" else global_plan
        planned = make(analysis, scores, ratio, round_to)
        units = planned.resolve(analysis)
    by_id = {g.id: g for g in analysis.groups}
    chosen = Plan()
    from onnxprune.plan import GroupPlan

    for group in analysis.prunable:
        chosen.groups.append(GroupPlan(group.key, group.size, [int(u) for u in units.get(group.id, [])]))
    del by_id
    return units, values, chosen


def load_feeds(data, model: onnx.ModelProto, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs for verification: an .npz keyed by input name, a dict, or seeded random data."""
    if data is None:
        return [random_inputs(model, seed), random_inputs(model, seed + 1, batch=2)]
    if isinstance(data, dict):
        return [data]
    path = Path(data)
    try:
        with np.load(path, allow_pickle=False) as npz:
            feeds = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read input data ({exc})") from None
    names = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    missing = names - set(feeds)
    if missing:
        raise InputError(f"{path}: no data for model input(s) {', '.join(sorted(missing))}")
    return [{k: v for k, v in feeds.items() if k in names}]


def verify(
    original: "str | os.PathLike[str] | onnx.ModelProto",
    pruned: "str | os.PathLike[str] | onnx.ModelProto",
    data: "str | os.PathLike[str] | dict[str, np.ndarray] | None" = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
) -> VerifyReport:
    """Compare two models' outputs in ONNX Runtime on the same inputs."""
    a, b = load_model(original), load_model(pruned)
    return compare(a, b, load_feeds(data, a, seed), atol, rtol)


def _check_graph(model: onnx.ModelProto) -> None:
    """Refuse graphs the checker rejects (dangling inputs, cycles, duplicate names)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InputError(f"invalid model: {first[:300]}") from None
    except ValueError as exc:  # models above 2 GB are checked by path elsewhere
        if "2GB" not in str(exc):
            raise InputError(f"invalid model: {str(exc)[:300]}") from None


def _check_output(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise VerificationError(f"pruned model fails the ONNX checker (a bug, please report): {first[:300]}") from None
