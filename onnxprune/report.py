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
    """The before/after table printed by `prune` and `demo`."""
    b, a = report.before, report.after
    rows = [("params", b.params, a.params), ("MACs", b.macs, a.macs), ("size (bytes)", b.bytes, a.bytes),
            ("ops", sum(b.ops.values()), sum(a.ops.values()))]
    lines = [f"{'':<16}{'original':>12}{'pruned':>12}{'ratio':>9}"]
    lines += [f"{name:<16}{human(x):>12}{human(y):>12}{_ratio(x, y):>9}" for name, x, y in rows]
    if report.latency is not None:
        lat = report.latency
        lines.append(f"{'latency (ms)':<16}{lat.before_ms['median']:>12.3f}{lat.after_ms['median']:>12.3f}"
                     f"{lat.ratio:>9.3f}")
        lines.append(f"  (median of {lat.runs} interleaved runs, {lat.threads} thread(s), {lat.provider})")
    lines.append(f"groups: {report.analysis['groups_total']} total, {report.groups_pruned} pruned, "
                 f"{len(report.analysis['groups_frozen'])} frozen; {report.channels_removed} channels removed")
    if report.verify is not None:
        v = report.verify
        lines.append(f"verify: {'PASSED' if v.passed else 'FAILED'}  max abs diff {v.max_abs_diff:.3g}, "
                     f"max rel diff {v.max_rel_diff:.3g} (atol {v.atol:g}, rtol {v.rtol:g})")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def analysis_listing(analysis: Analysis) -> str:
    """One line per group: key, channels, producers, and why it is frozen if it is."""
    lines = [f"{len(analysis.groups)} channel groups, {len(analysis.prunable)} prunable"]
    for g in analysis.groups:
        state = "prunable" if g.prunable else ("frozen: " + "; ".join(sorted(set(g.frozen))) if g.frozen
                                                else "single channel")
        who = ", ".join(g.producers[:3]) + (" …" if len(g.producers) > 3 else "")
        lines.append(f"  [{g.id}] {g.key}  channels={g.size}  producers={who or '-'}  {state}")
    return "\n".join(lines)


def analysis_json(analysis: Analysis) -> dict:
    return {
        "groups_total": len(analysis.groups),
        "groups_prunable": len(analysis.prunable),
        "groups": [{"id": g.id, "key": g.key, "channels": g.size, "producers": g.producers,
                    "prunable": g.prunable, "frozen": sorted(set(g.frozen)),
                    "members": [{"tensor": m.slot[0], "axis": m.slot[1], "role": m.role,
                                 "elements": int(len(m.elem))} for m in g.members]}
                   for g in analysis.groups],
    }
