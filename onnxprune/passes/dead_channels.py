"""Find channels that are provably constant, for lossless removal.

Constants start where weights make them: a producer whose weight rows for a channel are all zero
emits its bias there; a BatchNorm with gamma = 0 emits beta. Rules propagate those per-channel
constants through activations, normalisations, residual adds and layout ops in graph order. A
channel is removable without changing the outputs when, at every weight layer that consumes it,
its value is known and folding it into that layer's bias is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops import Slot, ValueTable
from onnxprune.ops.control_flow import BODY_OPS, propagate_loop
from onnxprune.passes.dependency import Analysis, rule_for
from onnxprune.passes.rewrite import contraction_slots


@dataclass
class DeadChannels:
    units: dict[int, np.ndarray]
    """Per group id, the channels that can be removed exactly."""
    values: dict[Slot, np.ndarray]
    """Per slot, the constant value of each element (NaN where not constant)."""


def constant_values(analysis: Analysis) -> dict[Slot, np.ndarray]:
    """Per-element constant values of every channel slot, propagated in graph order."""
    table = ValueTable(dict(analysis.slot_sizes))
    _propagate(analysis, list(analysis.graph.nodes), table)
    return {slot: vals for slot, vals in table.values.items()}


def _propagate(analysis: Analysis, nodes: list[gs.Node], table: ValueTable) -> None:
    for node in nodes:
        ties = analysis.node_ties.get(node.name)
        rule = rule_for(node, analysis.opset)
        if ties is None or rule is None:  # asked by no slot (an empty list: asked, no tie, as a fill)
            continue
        if node.op in BODY_OPS:  # the body runs here, to a fixed point of its carried state
            view = analysis.view(node)
            propagate_loop(node, table, lambda body: _propagate(analysis, body, table), view)
            continue
        if rule.value_preserving:
            _copy_along_ties(node, ties, table)
        rule.propagate(analysis.view(node), table)  # a fill's one value reaches its slots with no tie


def _copy_along_ties(node, ties, table: ValueTable) -> None:
    constants = {t.name: t for t in node.inputs if isinstance(t, gs.Constant)}
    inputs = {t.name for t in node.inputs}
    outputs = {t.name for t in node.outputs}
    for tie in ties:
        if tie.a[0] in inputs and tie.b[0] in outputs:
            src, dst, si, di = tie.a, tie.b, tie.a_idx, tie.b_idx
        elif tie.b[0] in inputs and tie.a[0] in outputs:
            src, dst, si, di = tie.b, tie.a, tie.b_idx, tie.a_idx
        else:
            continue
        vals = _uniform_slices(constants[src[0]], src[1]) if src[0] in constants else table.get(src)
        out = table.get(dst)
        if vals is not None and out is not None:
            out[di] = vals[si]
            if len(np.unique(di)) < len(di):  # many elements onto one (a head's D features): all must agree
                lo, hi = np.full(len(out), np.inf), np.full(len(out), -np.inf)
                with np.errstate(invalid="ignore"):  # NaN (not constant) propagates into lo/hi
                    np.minimum.at(lo, di, vals[si])
                    np.maximum.at(hi, di, vals[si])
                out[np.unique(di[lo[di] != hi[di]])] = np.nan


def _uniform_slices(const: gs.Constant, axis: int) -> np.ndarray:
    """Per element of `axis`, the value its whole slice of a constant holds (NaN where it varies):
    an embedding table's all-zero column is a channel that is zero for every token."""
    array = np.asarray(const.values)
    if array.size == 0:
        return np.full(array.shape[axis], np.nan)
    others = tuple(a for a in range(array.ndim) if a != axis)
    first = array[tuple(slice(None) if a == axis else slice(0, 1) for a in range(array.ndim))]
    same = np.all(array == first, axis=others)  # compared in place: no float64 copy of a large table
    return np.where(same, first.reshape(-1).astype(np.float64), np.nan)


def find_dead_channels(analysis: Analysis) -> DeadChannels:
    """Channels of prunable groups whose removal (with bias folding) is exact."""
    values = constant_values(analysis)
    consumers = contraction_slots(analysis)
    units: dict[int, np.ndarray] = {}
    for group in analysis.prunable:
        removable = np.ones(group.size, dtype=bool)
        for member in group.members:
            if member.slot not in consumers:
                continue
            vals = values.get(member.slot, np.full(analysis.slot_sizes[member.slot], np.nan))[member.elem]
            known = ~np.isnan(vals)
            bad_units = member.unit[~known]
            removable[bad_units] = False
            for node in consumers[member.slot]:
                rule, view = rule_for(node, analysis.opset), analysis.view(node)
                for unit in np.unique(member.unit[known]):
                    if removable[unit] and not rule.compensation_exact(view, vals[member.unit == unit]):
                        removable[unit] = False
        if not any(m.slot in consumers for m in group.members):
            removable[:] = False  # channels that reach no weight layer: nothing proves them unused
        dead = _equal_parts(group, removable) if group.parts is not None else np.flatnonzero(removable)
        if len(dead) == group.size:
            dead = dead[1:]  # a tensor keeps at least one channel
        if len(dead):
            units[group.id] = dead
    return DeadChannels(units, values)


def _equal_parts(group, removable: np.ndarray) -> np.ndarray:
    """Dead channels of an equal-count group: as many in each part (direction) as the part with the
    fewest has, each part's own dead ones, and at least one channel kept per part."""
    parts = [np.flatnonzero(removable & (group.parts == p)) for p in range(group.part_count)]
    per_part = min(min(len(d) for d in parts), group.size // group.part_count - 1)
    return np.sort(np.concatenate([d[:per_part] for d in parts]))
