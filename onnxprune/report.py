"""Human-readable output: the before/after table and the analysis listing."""

from __future__ import annotations

from onnxprune.api import PruneReport
from onnxprune.passes.dependency import Analysis


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}" if a else "-"


def table(report: PruneReport) -> str:
    """The before/after table printed by `prune` and `demo`; with a quantized model or an
    evaluation set, one column per model (see `models_table`)."""
    if report.models:
        return models_table(report)
    b, a = report.before, report.after
    rows = [("params", b.params, a.params), ("MACs", b.macs, a.macs), ("size (bytes)", b.bytes, a.bytes),
            ("ops", sum(b.ops.values()), sum(a.ops.values()))]
    lines = [f"{'':<16}{'original':>12}{'pruned':>12}{'ratio':>9}"]
    lines += [f"{name:<16}{human(x):>12}{human(y):>12}{_ratio(x, y):>9}" for name, x, y in rows]
    if report.latency is not None:
        lat = report.latency
        lines.append(f"{'latency (ms)':<16}{lat.before_ms['median']:>12.3f}{lat.after_ms['median']:>12.3f}"
                     f"{lat.ratio:>9.3f}")
        lines.append(f"{'speedup':<16}{'1.00x':>12}{1 / lat.ratio:>11.2f}x")
        lines.append(f"  (median of {lat.runs} interleaved runs, optimisations on, {lat.threads} thread(s), "
                     f"{lat.provider})")
    return "\n".join(lines + _footer(report))


MODEL_TITLES = {"original": "original", "pruned": "pruned", "quantized": "pruned+int8"}


def models_table(report: PruneReport) -> str:
    """One column per model (original, pruned, pruned+quantized): size, speed and quality."""
    names = list(report.models)
    figs = [report.models[n] for n in names]
    rows = [("params", [human(f.params) for f in figs]),
            ("MACs", ["-" if f.macs is None else human(f.macs) for f in figs]),
            ("size (bytes)", [human(f.bytes) for f in figs]),
            ("ops", [str(f.ops) for f in figs])]
    if all(f.latency_ms for f in figs):
        rows.append(("latency (ms)", [f"{f.latency_ms['median']:.3f}" for f in figs]))
        rows.append(speedup_row(figs))
    rows.append(("max abs diff", [f"{f.max_abs_diff:.3g}" for f in figs]))
    rows += score_rows(figs)
    lines = [f"{'':<16}" + "".join(f"{MODEL_TITLES.get(n, n):>13}" for n in names)]
    lines += [f"{label:<16}" + "".join(f"{v:>13}" for v in values) for label, values in rows]
    if all(f.latency_ms for f in figs):
        lines.append("  (latency: median of one interleaved run of all models, optimisations on, 1 thread, thread "
                     "CPU time, CPUExecutionProvider; speedup against the original; diff and agreement against "
                     "the original's outputs)")
    return "\n".join(lines + _footer(report))


def speedup_row(figs: list) -> tuple[str, list[str]]:
    """Each model's speedup over the first (the original), from the same interleaved run."""
    base = figs[0].latency_ms["median"]
    return ("speedup", [f"{base / f.latency_ms['median']:.2f}x" if f.latency_ms["median"] else "-" for f in figs])


def score_rows(figs: list) -> list[tuple[str, list[str]]]:
    """Top-1 agreement with the original, accuracy and macro precision / recall / F1 rows, each
    when every model has it (the text and HTML tables share them)."""
    return [(label, [f"{getattr(f, key):.4f}" for f in figs])
            for label, key in (("top-1 agreement", "top1_agreement"), ("accuracy", "accuracy"),
                               ("macro precision", "precision"), ("macro recall", "recall"), ("macro F1", "f1"))
            if all(getattr(f, key, None) is not None for f in figs)]


def _footer(report: PruneReport) -> list[str]:
    lines = [f"groups: {report.analysis['groups_total']} total, {report.groups_pruned} pruned, "
             f"{len(report.analysis['groups_frozen'])} frozen; {report.channels_removed} channels removed"]
    if report.verify is not None:
        v = report.verify
        lines.append(f"verify: {'PASSED' if v.passed else 'FAILED'}  max abs diff {v.max_abs_diff:.3g}, "
                     f"max rel diff {v.max_rel_diff:.3g} (atol {v.atol:g}, rtol {v.rtol:g})")
    if report.quantization is not None:
        lines.append(f"quantize: {report.quantization.summary()} (onnxruntime.quantization)")
        lines.extend(f"  because: {reason}" for reason in report.quantization.reasons)
    elif report.quantize is not None:
        lines.append(f"quantize: {report.quantize} (onnxruntime.quantization)")
    if report.distill is not None:
        lines.append(distill_line(report.distill))
    lines.extend(rounds_table(report.rounds))
    lines.extend(f"note: {n}" for n in report.notes)
    return lines


def rounds_table(rounds: list[dict]) -> list[str]:
    """One line per round of an iterative schedule (`--steps`): size kept and quality after it."""
    if not rounds:
        return []

    def fig(value, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'round':<7}{'params':>10}{'MACs':>10}{'params %':>10}{'MACs %':>8}{'accuracy':>10}"
             f"{'agreement':>11}{'cosine':>9}{'loss':>9}{'s':>7}"]
    for r in rounds:
        lines.append(f"{r['step']:<7}{human(r['params']):>10}{human(r['macs']):>10}{r['params_ratio']:>10.1%}"
                     f"{r['macs_ratio']:>8.1%}{fig(r['accuracy']):>10}{fig(r['agreement']):>11}"
                     f"{fig(r['cosine']):>9}{fig(r['loss'], '.4g'):>9}{r['seconds']:>7.1f}")
    return lines


EVAL_FIGURES = ("accuracy", "agreement", "cosine", "loss")
"""The evaluation figures of a distillation (`DistillHistory.before/after/epochs[].eval`), in table order."""


def distill_line(history: dict) -> str:
    """One line on the distillation that followed pruning: epochs, why it stopped, the watched
    figure (accuracy or agreement with the original) before -> after, final loss, time."""
    metric = history["metric"]
    before, after = history["before"].get(metric), history["after"].get(metric)
    change = f"; {metric} on {history['evaluated_on']} {before:.4f} -> {after:.4f}" if before is not None else ""
    loss = f"; final loss {history['final_loss']:.4g}" if history.get("final_loss") is not None else ""
    # a learning rate too large for the model makes every epoch worse than the student it was given
    hint = ("; no epoch improved on the given student, which is returned unchanged: try a lower --lr"
            if history["epochs"] and not history["best_epoch"] else "")
    return (f"distill: {len(history['epochs'])} epoch(s) ({history['stopped']}; weights of epoch "
            f"{history['best_epoch']} kept){change}{loss}; {history['seconds']:.1f} s{hint}")


def analysis_listing(analysis: Analysis) -> str:
    """One line per group: key, channels, producers, and why it is frozen if it is."""
    lines = [f"{len(analysis.groups)} channel groups, {len(analysis.prunable)} prunable"]
    for g in analysis.groups:
        state = "prunable" if g.prunable else ("frozen: " + "; ".join(sorted(set(g.frozen))) if g.frozen
                                                else "single channel")
        if g.prunable and g.lossy_only:  # frozen by --lossless
            state += " (lossy only: " + "; ".join(g.lossy_only) + ")"
        who = ", ".join(g.producers[:3]) + (" …" if len(g.producers) > 3 else "")
        size = f"{g.size}" if g.parts is None else f"{g.size} ({g.part_count} parts of {g.size // g.part_count}, equal counts)"
        lines.append(f"  [{g.id}] {g.key}  channels={size}  producers={who or '-'}  {state}")
    return "\n".join(lines)


def analysis_json(analysis: Analysis) -> dict:
    return {
        "groups_total": len(analysis.groups),
        "groups_prunable": len(analysis.prunable),
        "groups": [{"id": g.id, "key": g.key, "channels": g.size, "parts": g.part_count, "producers": g.producers,
                    "prunable": g.prunable, "frozen": sorted(set(g.frozen)),
                    "members": [{"tensor": m.slot[0], "axis": m.slot[1], "role": m.role,
                                 "elements": int(len(m.elem))} for m in g.members]}
                   for g in analysis.groups],
    }
