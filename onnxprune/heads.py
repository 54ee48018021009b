"""Attention heads as a kind of channel group, with their own pruning ratio.

A group is a *head group* when one of its slots is a structural head axis (an attention score's
head axis, or the KV-head axis of a grouped-query repeat: the rules' `anchors`). Its units are
whole heads (whole KV groups under GQA). Heads and neurons differ in how much removing one costs,
so `prune(..., head_ratio=r)` removes a fraction `r` of every head group while the other groups
follow `ratio`.

A group is a *hidden group* when the Q/K/V projections of a head group read it: the residual
stream. A group holding an embedding table's columns is one too when its channels form a
residual stream (a skip `Add` of two of its tensors, or a normalisation statistic over them);
an embedding feeding a recurrent, convolutional or dense layer directly is an ordinary group.
Removing hidden units changes every LayerNorm/RMSNorm statistic of the model, so it is opt-in
(`prune(..., prune_hidden=True)`); by default `freeze_hidden` freezes it with a reason.
"""

from __future__ import annotations

from onnxprune.ops import Slot
from onnxprune.passes.dependency import Analysis, ChannelGroup, rule_for
from onnxprune.plan import GroupPlan, Plan, keep_count, lowest_units


def head_slots(analysis: Analysis) -> set[Slot]:
    """Slots the op rules anchor as attention head axes."""
    found: set[Slot] = set()
    for node in analysis.graph.nodes:
        rule = rule_for(node, analysis.opset)
        if rule is not None:
            found.update(rule.anchors(analysis.view(node)))
    return found


def group_kind(analysis: Analysis, group: ChannelGroup, heads: "set[Slot] | None" = None) -> str:
    """'heads' for groups of attention heads, 'channels' for every other group (neurons, filters)."""
    heads = head_slots(analysis) if heads is None else heads
    return "heads" if any(m.slot in heads for m in group.members) else "channels"


def hidden_groups(analysis: Analysis, heads: "set[Slot] | None" = None) -> list[ChannelGroup]:
    """Groups read by the projections (contraction inputs) of the weight layers of head groups,
    and groups holding an embedding table's columns (rules' `hidden` slots) that form a residual
    stream."""
    heads = head_slots(analysis) if heads is None else heads
    head_groups = [g for g in analysis.groups if group_kind(analysis, g, heads) == "heads"]
    layers = {name for g in head_groups for name in g.producers}
    inputs: set[Slot] = set()
    tables: set[Slot] = set()
    for node in analysis.graph.nodes:
        rule = rule_for(node, analysis.opset)
        if rule is None:
            continue
        tables.update(rule.hidden(analysis.view(node)))  # embedding columns, with or without heads
        slot = rule.contraction(analysis.view(node)) if node.name in layers else None
        if slot is not None:
            inputs.add(slot)
    return [g for g in analysis.groups if any(m.slot in inputs for m in g.members)
            or (any(m.slot in tables for m in g.members) and _residual_stream(analysis, g))]


def _residual_stream(analysis: Analysis, group: ChannelGroup) -> bool:
    """Whether a group's channels form a residual stream: a normalisation statistic reads them
    (the group is lossy-only) or an Add/Sum adds two of its tensors (a skip connection, or token
    and position embeddings summed into the stream)."""
    if group.lossy_only:
        return True
    names = {m.slot[0] for m in group.members if m.role == "activation"}
    return any(node.op in ("Add", "Sum") and sum(t.name in names for t in node.inputs) >= 2
               for node in analysis.graph.nodes)


def freeze_hidden(analysis: Analysis) -> None:
    """Freeze the hidden size (the residual stream) of transformers: it prunes on request only."""
    for group in hidden_groups(analysis):
        group.frozen.append("hidden size of a transformer (residual stream): "
                            "pass prune_hidden=True / --prune-hidden to prune it (lossy)")


def with_head_ratio(plan: Plan, analysis: Analysis, scores: dict, head_ratio: float) -> Plan:
    """`plan` with every head group's removals replaced by its `head_ratio` lowest-scored heads."""
    if not 0.0 <= head_ratio < 1.0:
        from onnxprune.errors import InputError

        raise InputError(f"head_ratio must be in [0, 1), got {head_ratio}")
    heads = head_slots(analysis)
    by_key = {g.key: g for g in analysis.prunable}
    out = Plan()
    for entry in plan.groups:
        group = by_key.get(entry.key)
        if group is not None and group_kind(analysis, group, heads) == "heads":
            drop = group.size - keep_count(group.size, head_ratio)
            entry = GroupPlan(entry.key, entry.size, lowest_units(scores[group.id], drop))
        out.groups.append(entry)
    return out
