"""Sensitivity analysis: how much each channel group matters, measured by pruning it alone.

Each prunable group (coupled channels as one unit) is pruned at several ratios with the chosen
criterion and recovery, and the model's outputs on evaluation data are compared with the original's
(relative L2 error; top-1 accuracy when labels are given). The curves rank the weak and the strong
groups, and `auto_plan` spends a MACs budget where it costs the least measured error.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from onnxprune.calibration import Calibration
from onnxprune.data import batch_size_for, is_one_shot, iter_batches, model_inputs, spool
from onnxprune.errors import InputError
from onnxprune.ir import atomic_write_bytes
from onnxprune.passes.dependency import Analysis
from onnxprune.plan import GroupPlan, Plan, RoundTo, group_keep, planned_units, rounding
from onnxprune.progress import progress
from onnxprune.verify import random_inputs, session, top1_accuracy

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
AUTO_RATIOS = (0.2, 0.4, 0.6, 0.8)
EVAL_SAMPLES = 512


@dataclass
class GroupCurve:
    key: str
    producers: list[str]
    channels: int
    ratios: list[float]
    error: list[float]
    accuracy: list[float] | None = None
    macs: list[float] = field(default_factory=list)
    """Fraction of the model's MACs kept when this group alone is pruned at each ratio."""

    def error_at(self, ratio: float) -> float:
        """Measured error interpolated (0 at ratio 0), made non-decreasing."""
        xs, ys = [0.0] + self.ratios, [0.0] + list(np.maximum.accumulate(self.error))
        if ratio <= xs[-1]:
            return float(np.interp(ratio, xs, ys))
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)  # extrapolate the last segment
        return float(ys[-1] + (ratio - xs[-1]) * slope)


@dataclass
class SensitivityResult:
    groups: list[GroupCurve]
    criterion: str
    recover: str
    samples: int
    baseline_accuracy: float | None = None

    def ranked(self) -> list[GroupCurve]:
        """Most sensitive first: by error at the middle ratio."""
        mid = len(self.groups[0].ratios) // 2 if self.groups else 0
        return sorted(self.groups, key=lambda g: -g.error[mid])

    def to_json(self) -> dict:
        return {"format": "onnxprune-sensitivity", "criterion": self.criterion, "recover": self.recover,
                "samples": self.samples, "baseline_accuracy": self.baseline_accuracy,
                "groups": [{k: v for k, v in g.__dict__.items() if v is not None} | {"group": g.key}
                           for g in self.ranked()]}

    def table(self) -> str:
        if not self.groups:
            return "no prunable groups"
        ratios = self.groups[0].ratios
        head = f"{'group':<24}{'producer':<20}{'ch':>5}" + "".join(f"{f'err@{r:g}':>11}" for r in ratios)
        if self.baseline_accuracy is not None:
            head += "".join(f"{f'acc@{r:g}':>10}" for r in ratios)
        lines = [f"sensitivity ({self.criterion}, recover {self.recover}, {self.samples} samples), "
                 "most sensitive first", head]
        for g in self.ranked():
            row = f"{g.key[:23]:<24}{(g.producers[0] if g.producers else '-')[:19]:<20}{g.channels:>5}"
            row += "".join(f"{e:>11.4f}" for e in g.error)
            if g.accuracy is not None:
                row += "".join(f"{a:>10.4f}" for a in g.accuracy)
            lines.append(row)
        if self.baseline_accuracy is not None:
            lines.append(f"baseline accuracy {self.baseline_accuracy:.4f}")
        return "\n".join(lines)

    def plot(self, path: "str | os.PathLike[str]") -> bool:
        """Write a PNG of the curves; False (nothing written) when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        panels = 2 if self.baseline_accuracy is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
        for g in self.ranked():
            label = g.producers[0] if g.producers else g.key
            axes[0][0].plot([0] + g.ratios, [0] + g.error, marker="o", label=label)
            if panels == 2:
                axes[0][1].plot([0] + g.ratios, [self.baseline_accuracy] + g.accuracy, marker="o", label=label)
        axes[0][0].set(xlabel="fraction of the group's channels removed", ylabel="relative output error")
        if panels == 2:
            axes[0][1].set(xlabel="fraction of the group's channels removed", ylabel="top-1 accuracy")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=100, format="png")
        plt.close(fig)
        atomic_write_bytes(path, buffer.getvalue())
        return True


class _Evaluator:
    """Fixed evaluation batches (at most `limit` samples) and the original model's outputs on them."""

    def __init__(self, model: onnx.ModelProto, data, labels: str, limit: int, seed: int) -> None:
        names = model_inputs(model)
        if data is None:
            self.batches = [random_inputs(model, seed, batch=8)]
        else:
            self.batches = list(iter_batches(data, names, batch_size_for(model), extra=(labels,), limit=limit))
        self.labels = [b.pop(labels) for b in self.batches if labels in b]
        if self.labels and len(self.labels) != len(self.batches):
            raise InputError(f"labels array {labels!r} is missing from part of the data")
        self.reference = self._outputs(model, self.batches)
        self.samples = sum(int(np.shape(next(iter(b.values())))[0]) for b in self.batches)

    def _outputs(self, model: onnx.ModelProto, batches) -> list[list[np.ndarray]]:
        sess = session(model)
        return [[np.asarray(o, dtype=np.float64) for o in sess.run(None, b)] for b in batches]

    def error(self, outputs: list[list[np.ndarray]]) -> float:
        num = sum(float(np.sum((o - r) ** 2)) for out, ref in zip(outputs, self.reference) for o, r in zip(out, ref))
        den = sum(float(np.sum(r ** 2)) for ref in self.reference for r in ref)
        return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))

    def accuracy(self, outputs: list[list[np.ndarray]]) -> float | None:
        if not self.labels:
            return None
        return top1_accuracy([out[0] for out in outputs], self.labels)

    def measure(self, model: onnx.ModelProto) -> tuple[float, float | None]:
        outputs = self._outputs(model, self.batches)
        return self.error(outputs), self.accuracy(outputs)


PlanRunner = Callable[[onnx.ModelProto, list[Plan], Calibration, "_Evaluator", bool],
                      list[tuple[float, float | None]]]
"""Evaluates plans (each prunes one group at one ratio) and returns (error, accuracy) per plan, in
order; the last argument is `quiet`. `run_serially` here, or Ray tasks (`onnxprune.ray`)."""


def sensitivity(model, data=None, *, ratios=DEFAULT_RATIOS, criterion="l1", recover: str | None = "none",
                stats=None, labels: str = "label", samples: int = EVAL_SAMPLES, exclude=(), seed: int = 0,
                quiet: bool = False, runner: PlanRunner | None = None) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and measure the damage on `data`.

    A one-shot `data` (generator, `get_next()` reader) is spooled once to a temporary .npz
    directory: statistics and the evaluation both read it. `runner` decides where the
    (group, ratio) evaluations run (default: one after another in this process)."""
    from onnxprune.api import analyze
    from onnxprune.importance import score_groups
    from onnxprune.ir import load_model

    if data is not None and is_one_shot(data):
        with tempfile.TemporaryDirectory(prefix="onnxprune-data-") as tmp:
            return sensitivity(model, spool(data, tmp), ratios=ratios, criterion=criterion, recover=recover,
                               stats=stats, labels=labels, samples=samples, exclude=exclude, seed=seed, quiet=quiet,
                               runner=runner)
    original = load_model(model)
    analysis = analyze(original, exclude=exclude)
    calib = Calibration.prepare(original, analysis, data=data, stats=stats, criterion=criterion, recover=recover,
                                quiet=quiet)
    scores = score_groups(analysis, criterion, seed, stats=calib.stats, gradients=calib.gradients)
    return _measure(original, analysis, scores, calib, data, list(ratios), criterion, labels, samples, seed, quiet,
                    runner)


def evaluate_plan(original: onnx.ModelProto, plan: Plan, calib: Calibration, evaluator: "_Evaluator"
                  ) -> tuple[float, float | None]:
    """(relative output error, top-1 accuracy or None) of the original pruned by `plan`: one point
    of a curve, a pure function of its arguments, so it can run in any process."""
    from onnxprune.api import prune

    # lstsq-seq re-reads the calibration data layer by layer, so it must travel along
    pruned = prune(original, plan=plan, stats=calib.stats, recover=calib.recover,
                   data=calib.data if calib.recover == "lstsq-seq" else None,
                   gradients=calib.gradients, quiet=True).model
    return evaluator.measure(pruned)


def run_serially(original: onnx.ModelProto, plans: list[Plan], calib: Calibration, evaluator: "_Evaluator",
                 quiet: bool = True) -> list[tuple[float, float | None]]:
    """The default `PlanRunner`: one plan after another in this process."""
    return [evaluate_plan(original, plan, calib, evaluator)
            for plan in progress(plans, "sensitivity", quiet, unit="point")]


def _measure(original, analysis: Analysis, scores, calib, data, ratios, criterion, labels, samples, seed, quiet,
             runner: PlanRunner | None = None) -> SensitivityResult:
    from onnxprune.cost import CostModel

    if any(not 0.0 < r < 1.0 for r in ratios):
        raise InputError(f"sensitivity ratios must be in (0, 1), got {ratios}")
    evaluator = _Evaluator(original, data, labels, samples, seed)
    base = evaluator.accuracy(evaluator.reference)
    cost = CostModel(analysis)
    points = [(group, ratio, planned_units(group, scores[group.id], group_keep(group, ratio)))
              for group in analysis.prunable for ratio in ratios]
    plans = [Plan([GroupPlan(group.key, group.size, remove)]) for group, _, remove in points]
    measured = (runner or run_serially)(original, plans, calib, evaluator, quiet)
    curves = {}
    for (group, _, remove), (err, acc) in zip(points, measured):
        curve = curves.setdefault(group.id, GroupCurve(group.key, list(group.producers), group.size, list(ratios),
                                                       [], [] if base is not None else None))
        curve.error.append(err)
        curve.macs.append(cost.evaluate({group.id: np.array(remove, dtype=np.int64)})[0])
        if acc is not None:
            curve.accuracy.append(acc)
    name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")
    return SensitivityResult(list(curves.values()), name, calib.recover, evaluator.samples, base)


def auto_plan(original: onnx.ModelProto, analysis: Analysis, scores: dict[int, np.ndarray], calib, data, *,
              target_macs: float | None, target_params: float | None, max_ratio: float = 0.9,
              criterion="l1", labels: str = "label", seed: int = 0, quiet: bool = False, round_to: RoundTo = 1
              ) -> tuple[Plan, SensitivityResult]:
    """Non-uniform per-group ratios meeting the targets with the least measured error.

    Greedy on the sensitivity curves: repeatedly take the step (a few more channels of one group)
    with the smallest error increase per MAC saved, until the cost model meets every target; the
    last step is then trimmed channel by channel so the result lands on the target. With
    `round_to` the kept counts are then rounded up (a multiple, or a rounding function), as
    `target_plan` does.
    """
    from onnxprune.cost import CostModel

    if target_macs is None and target_params is None:
        raise InputError("plan 'auto' needs a target: target_macs and/or target_params")
    sens = _measure(original, analysis, scores, calib, data, list(AUTO_RATIOS), criterion, labels,
                    EVAL_SAMPLES, seed, quiet)
    groups = analysis.prunable
    curves = {c.key: c for c in sens.groups}
    cost = CostModel(analysis)
    counts = {g.id: 0 for g in groups}
    caps = {g.id: g.size - group_keep(g, max_ratio) for g in groups}

    def units(c: dict[int, int]) -> dict[int, np.ndarray]:
        return {g.id: np.array(planned_units(g, scores[g.id], g.size - c[g.id]), dtype=np.int64)
                for g in groups if c[g.id]}

    def meets(c: dict[int, int]) -> bool:
        macs, params = cost.evaluate(units(c))
        return (target_macs is None or macs <= target_macs + 1e-9) and \
            (target_params is None or params <= target_params + 1e-9)

    def objective(c: dict[int, int]) -> float:
        macs, params = cost.evaluate(units(c))
        return (macs if target_macs is not None else 0.0) + (params if target_params is not None else 0.0)

    last = None
    while not meets(counts):
        best, best_rate = None, np.inf
        now_obj = objective(counts)
        for g in groups:
            step = max(1, int(round(g.size * 0.05)))
            if counts[g.id] >= caps[g.id]:
                continue
            trial = dict(counts)
            trial[g.id] = min(caps[g.id], counts[g.id] + step)
            curve = curves[g.key]
            d_err = curve.error_at(trial[g.id] / g.size) - curve.error_at(counts[g.id] / g.size)
            saved = now_obj - objective(trial)
            rate = d_err / saved if saved > 0 else np.inf
            if rate < best_rate:
                best, best_rate = g, rate
        if best is None:
            raise InputError(f"targets cannot be met with max_ratio {max_ratio}")
        step = max(1, int(round(best.size * 0.05)))
        last = (best, counts[best.id])
        counts[best.id] = min(caps[best.id], counts[best.id] + step)
    if last is not None:  # trim the final step: one channel short of the target, then the
        group, before = last  # single channel (of any group) that lands closest to it
        for n in range(before + 1, counts[group.id] + 1):
            trial = dict(counts)
            trial[group.id] = n
            if meets(trial):
                counts = trial
                break
        short = dict(counts)
        short[group.id] -= 1
        steps = [short | {g.id: short[g.id] + 1} for g in groups if short[g.id] < caps[g.id]]
        fitting = [step for step in steps if meets(step)]
        if fitting:
            counts = max(fitting, key=objective)
    rnd = rounding(round_to)
    counts = {g.id: g.size - rnd(g, group_keep(g, counts[g.id] / g.size)) for g in groups}
    chosen = units(counts)
    plan = Plan([GroupPlan(g.key, g.size, [int(u) for u in chosen.get(g.id, [])]) for g in groups])
    return plan, sens


def save_json(result: SensitivityResult, path: "str | os.PathLike[str]") -> None:
    from onnxprune.ir import atomic_write_json

    atomic_write_json(path, result.to_json())
