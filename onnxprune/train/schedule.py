"""Iterative schedules (`prune --steps N`): reach the pruning target in N rounds.

One-shot pruning scores every channel on the unpruned model; after a large cut the survivors'
importance changes. A schedule removes an equal share of the target per round, re-scores the
smaller model before each round (with the chosen criterion: gradient criteria see the model as it
is now), and with `distill` trains it back from the *original* model between rounds, which is
pruning during training as the literature does it (Molchanov et al. 2019, Zhu & Gupta 2017).

Round k of N keeps, of the original model:
- with `ratio` r: 1 - r·k/N of every group's channels (each round's ratio is taken relative to the
  current model, so rounding may keep a channel more per group than one-shot);
- with `target_macs` / `target_params` T: 1 - (1 - T)·k/N of the original MACs / parameters; the
  last round asks for exactly T of the original, so it lands where one-shot does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import onnx

from onnxprune.errors import InputError
from onnxprune.quantize import QuantOptions

if TYPE_CHECKING:
    from onnxprune.api import PruneResult

QUANT_OPTIONS = ("quant_format", "activation_type", "weight_type", "per_channel", "calibration")
MEASURED = ("verify", "bench", "quantize", "eval_data") + QUANT_OPTIONS
"""Options applied once, to the final model against the original, not in every round."""
AMOUNTS = ("ratio", "head_ratio", "target_macs", "target_params")
"""Options that each round sets relative to the model it prunes."""


@dataclass
class Round:
    """Figures of the model after one round (after its distillation, when distilling)."""

    step: int
    params: int
    macs: int
    params_ratio: float
    """Of the original model."""
    macs_ratio: float
    channels_removed: int
    cosine: float | None
    """Mean cosine of the first output to the original's, on the evaluation data (else `data`)."""
    agreement: float | None
    """Arg-max agreement of the first output with the original's (class outputs)."""
    accuracy: float | None
    """Top-1 accuracy on labelled evaluation data."""
    loss: float | None
    """The round's final distillation loss."""
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def kept_fractions(steps: int, removed: float) -> list[float]:
    """Fraction of the original kept after each round when `removed` goes in `steps` equal shares."""
    return [1.0 - removed * k / steps for k in range(1, steps + 1)]


def run_steps(model, *, steps: int, **options) -> "PruneResult":
    """`onnxprune.prune(model, steps=N, ...)`: N rounds of prune (+ distill), one final report."""
    from onnxprune.api import _distill, _load_checked, _measured_result, prune
    from onnxprune.metrics import count

    _check(steps, options)
    original = _load_checked(model)
    data, eval_data, labels = options.get("data"), options.get("eval_data"), options.get("labels", "label")
    distill = options.get("distill", False)
    base = count(original)
    measure_on = eval_data if eval_data is not None else data
    labelled = eval_data is not None and _has_labels(eval_data, original, labels)
    per_round = {k: v for k, v in options.items() if k not in MEASURED + AMOUNTS + ("distill",)}
    ratio, targets = options.get("ratio", 0.5), _targets(options)
    current, rounds, notes, removed, result, history = original, [], [], 0, None, None
    for step in range(1, steps + 1):
        start = time.perf_counter()
        now = count(current)
        result = prune(current, **per_round, **_round_amount(step, steps, ratio, targets, options, base, now))
        current = result.model
        removed += result.report.channels_removed
        if distill:
            current, history = _distill(original, current, distill, data, eval_data, labels,
                                        options.get("seed", 0), options.get("quiet", False))
        notes.extend(n for n in result.report.notes if n not in notes)
        after = count(current)
        quality = _quality(original, current, measure_on, eval_data if labelled else None, labels)
        rounds.append(Round(step, after.params, after.macs, after.params / base.params if base.params else 1.0,
                            after.macs / base.macs if base.macs else 1.0, result.report.channels_removed,
                            quality.cosine, quality.top1_agreement, quality.accuracy,
                            None if history is None else history.get("final_loss"),
                            time.perf_counter() - start))
    report = result.report
    report.before, report.after, report.channels_removed = base, count(current), removed
    report.notes = notes + [f"{steps} rounds: channels re-scored on the smaller model before each round"
                            + (", distilled from the original after each" if distill else "")]
    report.rounds = [r.to_dict() for r in rounds]
    report.distill = history
    get = options.get  # verification, latency and figures: once, final model against the original
    return _measured_result(current, result.plan, report, original, data=data, seed=get("seed", 0),
                            verify=bool(get("verify")), bench=bool(get("bench")), atol=get("atol"), rtol=get("rtol"),
                            lossless=False, quantize=get("quantize"), eval_data=eval_data, labels=labels,
                            quant_options=QuantOptions(*(get(name) for name in QUANT_OPTIONS)))


def _check(steps: int, options: dict) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    refused = [name for name, on in (("lossless", options.get("lossless")), ("plan", options.get("plan") is not None),
                                     ("target_latency", options.get("target_latency") is not None),
                                     ("round_to 'auto'", options.get("round_to") == "auto")) if on]
    if refused:
        raise InputError(f"steps > 1 re-plans every round from a ratio or MACs/params target; it takes no "
                         f"{', '.join(refused)}")


def _targets(options: dict) -> dict[str, float]:
    return {k: options[k] for k in ("target_macs", "target_params") if options.get(k) is not None}


def _round_amount(step: int, steps: int, ratio: float, targets: dict[str, float], options: dict, base, now) -> dict:
    """This round's ratio or targets, relative to the current model."""
    if targets:
        totals = {"target_macs": (base.macs, now.macs), "target_params": (base.params, now.params)}
        out = {}
        for name, target in targets.items():
            original, current = totals[name]
            wanted = kept_fractions(steps, 1.0 - target)[step - 1] * original
            out[name] = min(1.0, wanted / current) if current else 1.0
        return out
    out = {"ratio": _relative(ratio, step, steps)}
    if options.get("head_ratio") is not None:
        out["head_ratio"] = _relative(options["head_ratio"], step, steps)
    return out


def _relative(ratio: float, step: int, steps: int) -> float:
    """The ratio of the current model's channels that round `step` removes."""
    before = 1.0 - ratio * (step - 1) / steps
    return 1.0 - (1.0 - ratio * step / steps) / before if before > 0 else 0.0


def _has_labels(eval_data, model: onnx.ModelProto, labels: str) -> bool:
    from onnxprune.data import iter_batches, model_inputs

    first = next(iter(iter_batches(eval_data, model_inputs(model), 1, extra=(labels,), limit=1)), {})
    return labels in first


def _quality(original: onnx.ModelProto, current: onnx.ModelProto, measure_on, eval_data, labels: str):
    """Agreement with the original on `measure_on` (and accuracy on labelled `eval_data`)."""
    from onnxprune.api import load_feeds
    from onnxprune.quantize import ModelFigures, compare_models

    if measure_on is None:
        return ModelFigures(0, 0, None, 0)
    figures = compare_models({"original": original, "pruned": current}, load_feeds(measure_on, original),
                             eval_data, labels)
    return figures["pruned"]
