"""The HTML report: one self-contained page to attach to a CI run or a review.

Inline CSS and inline SVG only: no scripts, fonts or images from anywhere, so the page opens the
same offline, in a mail client or a CI artifact viewer. It shows the side-by-side figures, a
per-layer chart of channels kept and removed, the verification figures and, when given, the
sensitivity curves (read defensively: the sensitivity JSON is another tool's output and an
unrecognised shape is reported on the page, never a crash).
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass

from onnxprune.api import PruneReport
from onnxprune.report import EVAL_FIGURES, MODEL_TITLES, human, score_rows, speedup_row

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22")
MAX_CURVES = len(PALETTE)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:60rem;padding:0 1rem;color:#222;background:#fff}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.5rem 0}
th,td{padding:.25rem .7rem;text-align:right;border-bottom:1px solid #eee}#frozen td,#frozen th{text-align:left}th:first-child,td:first-child{text-align:left}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.legend span{display:inline-block;margin-right:1rem}.sw{display:inline-block;width:.8rem;height:.8rem;
margin-right:.3rem;vertical-align:middle}svg text{font-size:11px;fill:#333}.note{color:#666}
"""


@dataclass
class Curve:
    """One group's sensitivity: a metric measured after pruning it alone at several ratios."""

    name: str
    ratios: list[float]
    values: list[float]
    metric: str


def html_page(report: PruneReport, sensitivity: "list[Curve] | None" = None, title: str = "model") -> str:
    """The whole report page as one string."""
    if sensitivity is None and getattr(report, "sensitivity", None) is not None:
        sensitivity = sensitivity_curves(report.sensitivity)
    producers = {layer["group"]: layer["producers"][0] for layer in report.layers if layer.get("producers")}
    for curve in sensitivity or []:
        curve.name = producers.get(curve.name, curve.name)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>onnxprune report: {_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>onnxprune report: {_e(title)}</h1>",
        f'<p class="sub">{report.channels_removed} channels removed in {report.groups_pruned} of '
        f"{report.analysis['groups_total']} channel groups ({len(report.analysis['groups_frozen'])} frozen)"
        + (f"; quantized ({_e(report.quantize)})" if report.quantize else "") + "</p>",
        "<h2>Size, speed and quality</h2>", _figures_table(report), _quantization(report),
        "<h2>Verification</h2>", _verification(report),
        "<h2>Channels per layer</h2>", _layer_chart(report.layers),
        "<h2>Sensitivity</h2>", _sensitivity_section(sensitivity),
    ]
    if report.distill is not None:
        parts += ["<h2>Distillation</h2>", _distill_section(report.distill)]
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _row(cells, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _figures_table(report: PruneReport) -> str:
    if report.models:
        names = list(report.models)
        figs = [report.models[n] for n in names]
        rows = [["params"] + [human(f.params) for f in figs],
                ["MACs"] + ["-" if f.macs is None else human(f.macs) for f in figs],
                ["size (bytes)"] + [human(f.bytes) for f in figs],
                ["ops"] + [str(f.ops) for f in figs]]
        if all(f.latency_ms for f in figs):
            rows.append(["latency median (ms)"] + [f"{f.latency_ms['median']:.3f}" for f in figs])
            label, values = speedup_row(figs)
            rows.append([label] + values)
        rows.append(["max abs diff vs original"] + [f"{f.max_abs_diff:.3g}" for f in figs])
        rows += [[label] + values for label, values in score_rows(figs)]
        head = [""] + [_e(MODEL_TITLES.get(n, n)) for n in names]
    else:
        b, a = report.before, report.after
        pairs = [("params", b.params, a.params), ("MACs", b.macs, a.macs), ("size (bytes)", b.bytes, a.bytes),
                 ("ops", sum(b.ops.values()), sum(a.ops.values()))]
        rows = [[n, human(x), human(y), f"{y / x:.3f}" if x else "-"] for n, x, y in pairs]
        if report.latency is not None:
            lat = report.latency
            rows.append(["latency median (ms)", f"{lat.before_ms['median']:.3f}", f"{lat.after_ms['median']:.3f}",
                         f"{lat.ratio:.3f}"])
        head = ["", "original", "pruned", "ratio"]
    return '<table id="figures">' + _row(head, True) + "".join(_row(r) for r in rows) + "</table>"


def _quantization(report: PruneReport) -> str:
    """What the quantization hand-off chose and why, and the candidates it timed."""
    choice = report.quantization
    if choice is None:
        return ""
    items = [f"<p id=\"quantization\">Quantization: {_e(choice.summary())}</p><ul>"]
    items += [f"<li>{_e(reason)}</li>" for reason in choice.reasons]
    items += [f"<li>candidate {_e(c['quant_format'].upper())}: {c['latency_ms']:.3f} ms (pruned float "
              f"{c['float_latency_ms']:.3f} ms)</li>" for c in choice.candidates]
    return "".join(items) + "</ul>"


def _verification(report: PruneReport) -> str:
    v = report.verify
    if v is None:
        return '<p class="note">Not requested (run prune with --verify).</p>'
    verdict = '<span class="pass">PASSED</span>' if v.passed else '<span class="fail">FAILED</span>'
    rows = [[_e(o.name), f"{o.max_abs_diff:.3g}", f"{o.max_rel_diff:.3g}", f"{o.cosine:.6f}",
             "-" if o.top1_agreement is None else f"{o.top1_agreement:.4f}", f"{o.min_atol:.3g}",
             '<span class="pass">pass</span>' if o.passed else '<span class="fail">fail</span>'] for o in v.outputs]
    head = ["output", "max abs diff", "max rel diff", "cosine", "top-1 agreement", "passes at atol &ge;", ""]
    return (f"<p>{verdict} with atol {v.atol:g}, rtol {v.rtol:g} (|a&minus;b| &le; atol + rtol&middot;|a|, "
            "ONNX Runtime, optimisations off).</p>"
            '<table id="verification">' + _row(head, True) + "".join(_row(r) for r in rows) + "</table>")


def _layer_chart(layers: list[dict]) -> str:
    """Horizontal bars, one per channel group: kept (blue), removed (orange), frozen (grey)."""
    if not layers:
        return '<p class="note">No channel groups.</p>'
    label_w, bar_w, row_h = 230, 520, 20
    widest = max(max(int(layer["channels"]), 1) for layer in layers)
    height = row_h * len(layers) + 10
    out = [f'<svg id="layer-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" '
           f'height="{height}" role="img" aria-label="channels kept and removed per layer">']
    for i, layer in enumerate(layers):
        y = 5 + i * row_h
        total, removed = int(layer["channels"]), int(layer["removed"])
        name = (layer.get("producers") or [layer["group"]])[0]
        full = bar_w * total / widest
        cut = full * removed / total if total else 0.0
        frozen = bool(layer.get("frozen"))
        why = "; ".join(layer.get("frozen") or [])
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{_e(_short(name, 34))}</text>')
        tip = f"{name}: {total - removed} of {total} kept" + (f" (frozen: {why})" if frozen else "")
        kept_cls, color = ("frozen", "#bbb") if frozen else ("kept", PALETTE[0])
        out.append(f'<rect class="{kept_cls}" x="{label_w}" y="{y + 3}" width="{full - cut:.1f}" height="{row_h - 6}" '
                   f'fill="{color}"><title>{_e(tip)}</title></rect>')
        if cut:
            out.append(f'<rect class="removed" x="{label_w + full - cut:.1f}" y="{y + 3}" width="{cut:.1f}" '
                       f'height="{row_h - 6}" fill="#ff7f0e"><title>{_e(tip)}</title></rect>')
        out.append(f'<text x="{label_w + full + 6:.1f}" y="{y + 13}">{total - removed}/{total}'
                   f'{" frozen" if frozen else ""}</text>')
    out.append("</svg>")
    legend = ('<p class="legend"><span><i class="sw" style="background:#1f77b4"></i>kept</span>'
              '<span><i class="sw" style="background:#ff7f0e"></i>removed</span>'
              '<span><i class="sw" style="background:#bbb"></i>frozen (reasons below)</span></p>')
    return "".join(out) + legend + _frozen_table(layers)


def _frozen_table(layers: list[dict]) -> str:
    """Why each frozen group was left alone, readable without hovering (printouts, screenshots)."""
    rows = [[_e((layer.get("producers") or ["-"])[0]), _e(layer["group"]), str(layer["channels"]),
             _e("; ".join(layer["frozen"]))] for layer in layers if layer.get("frozen")]
    if not rows:
        return ""
    head = ["producer", "group", "channels", "frozen because"]
    return '<table id="frozen">' + _row(head, True) + "".join(_row(r) for r in rows) + "</table>"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _sensitivity_section(curves: "list[Curve] | None") -> str:
    if curves is None:
        return ('<p class="note">No sensitivity data (run <code>onnxprune sensitivity</code> and pass its JSON '
                "with --sensitivity).</p>")
    if not curves:
        return '<p class="note">The sensitivity data holds no curves this report can read.</p>'
    shown = curves[:MAX_CURVES]
    extra = f" (first {MAX_CURVES} of {len(curves)} groups)" if len(curves) > MAX_CURVES else ""
    caption = f"{_e(shown[0].metric)} against the fraction of the group removed{extra}"
    return _curve_chart(shown) + f'<p class="note">{caption}.</p>'


def _curve_chart(curves: list[Curve], x_label: str = "pruning ratio", chart_id: str = "sensitivity-chart",
                 label: str = "sensitivity curves", tick_format: str = ".2f") -> str:
    """A line per curve: metric (y) against pruning ratio or epoch (x), on shared axes."""
    left, top, w, h = 55, 10, 560, 260
    xs = [r for c in curves for r in c.ratios]
    ys = [v for c in curves for v in c.values]
    x0, x1 = min(0.0, min(xs)), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda x: left + (x - x0) / (x1 - x0) * w  # noqa: E731
    sy = lambda y: top + h - (y - y0) / (y1 - y0) * h  # noqa: E731
    out = [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{left + w + 20}" '
           f'height="{top + h + 40}" role="img" aria-label="{_e(label)}">',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{top + h + 16}" text-anchor="middle">{xv:{tick_format}}</text>')
        out.append(f'<text x="{left - 5}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{top + h + 34}" text-anchor="middle">{_e(x_label)}</text>')
    legend = []
    for i, c in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(c.ratios, c.values))
        out.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="2" points="{points}">'
                   f"<title>{_e(c.name)}</title></polyline>")
        legend.append(f'<span><i class="sw" style="background:{color}"></i>{_e(_short(c.name, 40))}</span>')
    out.append("</svg>")
    return "".join(out) + '<p class="legend">' + "".join(legend) + "</p>"


def _distill_section(history: dict) -> str:
    """The distillation after pruning: before/after figures against the original, and the loss
    curve (training loss per epoch; evaluation loss too when measured)."""
    keys = [k for k in EVAL_FIGURES if k in history["before"]]
    rows = [[_e(k), f"{history['before'][k]:.4f}", f"{history['after'].get(k, float('nan')):.4f}"] for k in keys]
    table = ('<table id="distill">' + _row(["on " + _e(history["evaluated_on"]), "before distillation",
                                               "after"], True) + "".join(_row(r) for r in rows) + "</table>")
    summary = (f"<p>{len(history['epochs'])} epoch(s) in {history['seconds']:.1f} s, {_e(history['stopped'])} "
               f"(weights of epoch {history['best_epoch']} kept); losses: "
               + _e(", ".join(f"{k}: {v}" for k, v in history["losses"].items())) + ".</p>")
    epochs = history["epochs"]
    if len(epochs) < 2:
        return summary + table
    curves = [Curve("training loss", [e["epoch"] for e in epochs], [e["loss"] for e in epochs], "loss")]
    if all("loss" in e["eval"] for e in epochs):  # from epoch 0: the pruned model before any training
        curves.append(Curve(f"loss on {history['evaluated_on']}", [0] + [e["epoch"] for e in epochs],
                            [history["before"]["loss"]] + [e["eval"]["loss"] for e in epochs], "loss"))
    chart = _curve_chart(curves, x_label="epoch", chart_id="loss-chart", label="distillation loss per epoch",
                         tick_format=".3g")
    return summary + table + chart


_LIST_KEYS = ("groups", "results", "curves", "layers", "sensitivity")
_NAME_KEYS = ("group", "key", "name", "layer", "producer", "node")
_METRIC_KEYS = ("accuracy", "top1", "top1_accuracy", "error", "errors", "output_error", "mse", "max_abs_diff",
                "loss", "metric", "score", "values")


def load_sensitivity(path: "str | os.PathLike[str]") -> list[Curve]:
    """Read a sensitivity JSON file; unreadable files are an InputError, unknown shapes give []."""
    from onnxprune.ir import read_json

    return sensitivity_curves(read_json(path, "sensitivity JSON"))


def sensitivity_curves(data) -> list[Curve]:
    """Curves from the shapes a sensitivity result plausibly takes: a list of per-group entries
    (`ratios` + a metric list, or `points` of {ratio, metric}), or a mapping of group name to
    {ratio: value}. Entries that fit none are skipped."""
    entries = data
    if isinstance(data, dict):
        entries = next((data[k] for k in _LIST_KEYS if k in data), data)
    items = list(entries.items()) if isinstance(entries, dict) else (
        [(None, e) for e in entries] if isinstance(entries, list) else [])
    curves = []
    for i, (name, entry) in enumerate(items):
        curve = _curve(name, entry)
        if curve is not None:
            curve.name = curve.name or f"group {i}"
            curves.append(curve)
    _start_at_zero(curves, data)
    return curves


def _start_at_zero(curves: list[Curve], data) -> None:
    """Prepend the unpruned point where its value is known: onnxprune's own format measures error
    relative to the original (0 at ratio 0) and records the baseline accuracy."""
    if not isinstance(data, dict) or data.get("format") != "onnxprune-sensitivity":
        return
    baseline = data.get("baseline_accuracy")
    for curve in curves:
        start = 0.0 if curve.metric == "error" else baseline if curve.metric == "accuracy" else None
        if isinstance(start, (int, float)) and curve.ratios[0] > 0:
            curve.ratios.insert(0, 0.0)
            curve.values.insert(0, float(start))


def _curve(name, entry) -> Curve | None:
    if isinstance(entry, dict):
        name = name or next((str(entry[k]) for k in _NAME_KEYS if isinstance(entry.get(k), (str, int))), None)
        if "points" in entry:
            return _from_points(name, entry["points"])
        if isinstance(entry.get("ratios"), list):
            metric = next((k for k in _METRIC_KEYS if isinstance(entry.get(k), list)), None)
            return _finite(name, entry["ratios"], entry[metric], metric) if metric else None
        pairs = [(k, v) for k, v in entry.items() if k not in _NAME_KEYS]
        return _finite(name, [k for k, _ in pairs], [v for _, v in pairs], "metric")
    if isinstance(entry, list):
        return _from_points(name, entry)
    return None


def _from_points(name, points) -> Curve | None:
    if not isinstance(points, list):
        return None
    if all(isinstance(p, dict) for p in points) and points:
        metric = next((k for k in _METRIC_KEYS if all(k in p for p in points)), None)
        if metric is None or not all("ratio" in p for p in points):
            return None
        return _finite(name, [p["ratio"] for p in points], [p[metric] for p in points], metric)
    if all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
        return _finite(name, [p[0] for p in points], [p[1] for p in points], "metric")
    return None


def _finite(name, ratios, values, metric: str) -> Curve | None:
    """Keep the (ratio, value) pairs that are finite numbers, sorted by ratio; None if under two."""
    pairs = []
    for r, v in zip(ratios, values):
        try:
            r, v = float(r), float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(r) and math.isfinite(v):
            pairs.append((r, v))
    if len(pairs) < 2 or len(ratios) != len(values):
        return None
    pairs.sort()
    return Curve(str(name) if name is not None else "", [p[0] for p in pairs], [p[1] for p in pairs], metric)
