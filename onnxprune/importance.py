"""Importance criteria: a criterion maps a channel group to one score per channel (higher = keep).

A channel's score aggregates every coupled member of its group (producer rows, consumer columns,
BatchNorm scales), each member normalised by its own mean so that no single large tensor dominates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import InputError
from onnxprune.ir import constant_array
from onnxprune.ops.base import per_element
from onnxprune.ops.control_flow import all_tensors
from onnxprune.passes.dependency import Analysis, ChannelGroup, Member

if TYPE_CHECKING:
    from onnxprune.passes.stats import Statistics


@dataclass
class ScoringContext:
    """What criteria may read: the analysis (weights included) and a seed for random choices."""

    analysis: Analysis
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    stats: "Statistics | None" = None
    """Calibration statistics (`onnxprune.passes.stats`), for data-driven criteria."""
    gradients: "dict[str, np.ndarray] | None" = None
    """Loss gradients keyed by initializer name, for the taylor criterion."""
    _consumers: "dict | None" = None

    @property
    def consumers(self) -> dict:
        """Contraction slot -> weight layers reading it (computed once)."""
        if self._consumers is None:
            from onnxprune.passes.rewrite import contraction_slots

            self._consumers = contraction_slots(self.analysis)
        return self._consumers

    _tensors: "dict | None" = None

    def array(self, name: str) -> np.ndarray:
        """An initializer in its own dtype, decoded afresh (not cached: weights stay single)."""
        if self._tensors is None:
            self._tensors = all_tensors(self.analysis.graph)  # weights may live in Loop/Scan bodies
        tensor = self._tensors[name]
        if not isinstance(tensor, gs.Constant):
            raise KeyError(name)
        return constant_array(tensor)

    def values(self, name: str) -> np.ndarray:
        return np.asarray(self.array(name), dtype=np.float64)

    _sums: "dict | None" = None
    _axes: "dict | None" = None

    def magnitude_sums(self, slot: tuple[str, int], power: int) -> np.ndarray:
        """Sum of |w|**power over every axis of weight `slot[0]` but `slot[1]`, per index (float64).

        A Conv or MatMul weight is scored by its output group and by its input group: both axes are
        reduced from one decoded |w|, and the small sums are kept for the rest of the scoring.
        """
        if self._sums is None or self._axes is None:
            self._sums, self._axes = {}, {}
            for group in self.analysis.prunable:
                for member in group.members:
                    self._axes.setdefault(member.slot[0], set()).add(member.slot[1])
        name = slot[0]
        if (slot, power) not in self._sums:
            w = self.array(name)
            if power != 1 or w.dtype != np.float32:  # float32 |w| is exact; squares and ints go to float64
                w = w.astype(np.float64)
            magnitude = np.abs(w) if power == 1 else np.square(w)
            for axis in self._axes.get(name, set()) | {slot[1]}:
                if isinstance(axis, tuple):  # a paired slot: (direction, unit) positions
                    self._sums[((name, axis), power)] = per_element(magnitude, axis).sum(1, dtype=np.float64)
                elif axis < w.ndim:
                    self._sums[((name, axis), power)] = _sum_but(magnitude, axis)
        return self._sums[(slot, power)]


Criterion = Callable[[ChannelGroup, ScoringContext], np.ndarray]


def _sum_but(magnitude: np.ndarray, axis: int) -> np.ndarray:
    """float64 sum over every axis but `axis`, without a transposed copy.

    An inner axis of a Conv weight is summed over the leading axes first (whole rows added at
    once), then over the window: numpy's direct sum of [O, I, kh, kw] over (0, 2, 3) iterates
    the short window innermost and is ~3x slower on ResNet-50's 3x3 kernels. Only the order of
    the float64 additions differs (bit-equal on the models hashed for issue 7; tests check 1e-13).
    """
    lead, trail = tuple(range(axis)), tuple(range(axis + 1, magnitude.ndim))
    if not lead or not trail:
        return magnitude.sum(axis=lead + trail, dtype=np.float64)
    return magnitude.sum(axis=lead, dtype=np.float64).sum(axis=tuple(range(1, len(trail) + 1)))


def _member_scores(member: Member, size: int, ctx: ScoringContext, power: int) -> np.ndarray:
    """Sum of |w|^power over each channel's slice of one member, per channel."""
    per_elem = ctx.magnitude_sums(member.slot, power)
    return np.bincount(member.unit, weights=per_elem[member.elem], minlength=size)


def _norm_scores(group: ChannelGroup, ctx: ScoringContext, power: int, roles: tuple[str, ...]) -> np.ndarray:
    total = np.zeros(group.size)
    for member in group.weight_members(roles):
        scores = _member_scores(member, group.size, ctx, power)
        if power == 2:
            scores = np.sqrt(scores)
        mean = scores.mean()
        total += scores / mean if mean > 0 else scores
    return total


def l1(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Sum of absolute weights of every coupled weight slice."""
    return _norm_scores(group, ctx, 1, ("weight",))


def l2(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Euclidean norm of every coupled weight slice."""
    return _norm_scores(group, ctx, 2, ("weight",))


def bn_scale(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """|gamma| of the group's BatchNormalization layers (network slimming); l1 where there is none."""
    if not group.weight_members(("scale",)):
        return l1(group, ctx)
    return _norm_scores(group, ctx, 1, ("scale",))


def random(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Seeded uniform scores: a baseline for comparing criteria."""
    return np.random.default_rng([ctx.seed, group.id]).random(group.size)


def _per_unit(member: Member, per_elem: np.ndarray, size: int) -> np.ndarray:
    """Mean of per-element values over each channel's elements in one member."""
    sums = np.bincount(member.unit, weights=per_elem[member.elem], minlength=size)
    counts = np.bincount(member.unit, minlength=size)
    return sums / np.maximum(counts, 1)


def _normalised_sum(parts: list[np.ndarray], size: int) -> np.ndarray:
    total = np.zeros(size)
    for part in parts:
        mean = np.abs(part).mean()
        total += part / mean if mean > 0 else part
    return total


def _observed(group: ChannelGroup, ctx: ScoringContext, name: str) -> list[Member]:
    """Activation members with statistics: the weight layers' inputs where there are any."""
    if ctx.stats is None:
        raise InputError(f"criterion {name!r} needs calibration data or statistics (--data or --stats)")
    seen = [m for m in group.members if m.slot in ctx.stats.slots]
    consumed = [m for m in seen if m.slot in ctx.consumers]
    if not seen:
        raise InputError(f"criterion {name!r}: the statistics hold nothing for group {group.key}")
    return consumed or seen


def activation(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Mean |a| of the channel where weight layers read it: channels that carry little signal go."""
    return _normalised_sum([_per_unit(m, ctx.stats.slots[m.slot].mean_abs, group.size)
                            for m in _observed(group, ctx, "activation")], group.size)


def apoz(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """1 - average percentage of zeros (Hu et al. 2016): mostly-zero channels after ReLU go."""
    members = _observed(group, ctx, "apoz")
    return sum(1.0 - _per_unit(m, ctx.stats.slots[m.slot].apoz, group.size) for m in members) / len(members)


def _weight_name(node: gs.Node) -> str:
    """Name of a consumer's weight: input 1, or the initializer behind `Transpose` (a tied LM head
    reading the embedding table)."""
    w = node.inputs[1]
    if len(w.inputs) == 1 and w.inputs[0].op == "Transpose" and isinstance(w.inputs[0].inputs[0], gs.Constant):
        return w.inputs[0].inputs[0].name
    return w.name


def _consumer_weight_members(group: ChannelGroup, ctx: ScoringContext, slot) -> list[Member]:
    names = {_weight_name(node) for node in ctx.consumers.get(slot, [])}
    return [m for m in group.weight_members() if m.slot[0] in names]


def wanda(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Σ |consumer weights| × activation RMS (Wanda, Sun et al. 2023, per channel)."""
    parts = []
    for m in _observed(group, ctx, "wanda"):
        rms = np.sqrt(_per_unit(m, ctx.stats.slots[m.slot].mean_sq, group.size))
        for w in _consumer_weight_members(group, ctx, m.slot):
            parts.append(_member_scores(w, group.size, ctx, 1) * rms)
    if not parts:
        raise InputError(f"criterion 'wanda': group {group.key} reaches no weight layer with statistics")
    return _normalised_sum(parts, group.size)


def _unit_rows(member: Member, size: int, ctx: ScoringContext) -> np.ndarray | None:
    """[channel, features] slices of a weight member, or None when channels own unequal slices."""
    w = ctx.values(member.slot[0])
    per_elem = per_element(w, member.slot[1])
    counts = np.bincount(member.unit, minlength=size)
    if np.any(counts != counts[0]) or counts[0] == 0:
        return None
    order = np.lexsort((member.elem, member.unit))
    return per_elem[member.elem[order]].reshape(size, -1)


def fpgm(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Summed distance to the other filters (He et al. 2019): filters near the geometric median are
    replaceable by the rest, so they score low."""
    parts = []
    producers = set(group.producers)
    own = {n.inputs[1].name for n in ctx.analysis.graph.nodes if n.name in producers and len(n.inputs) > 1}
    for m in group.weight_members():
        rows = _unit_rows(m, group.size, ctx) if m.slot[0] in own else None
        if rows is None:
            continue
        sq = (rows * rows).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0))
        parts.append(dist.sum(1))
    return _normalised_sum(parts, group.size) if parts else l2(group, ctx)


GRADIENT_ROLES = ("weight", "bias", "scale")
"""Members whose w·∂L/∂w sums make a channel's first-order change of the loss when it is removed."""


def channel_sums(group: ChannelGroup, per_slot: "dict[tuple[str, int], np.ndarray]") -> tuple[np.ndarray, int]:
    """Per channel, the sum over the group's weight, bias and scale members of per-index values
    along each member's axis (`per_slot[(tensor, axis)]`), and how many members had values.

    The taylor criterion and the gradient criteria of `onnxprune.train` share it, so a channel
    covers the same coupled weights (producer rows, consumer columns, norm scales) in both."""
    total, used = np.zeros(group.size), 0
    for m in group.weight_members(GRADIENT_ROLES):
        values = per_slot.get(m.slot)
        if values is None:
            continue
        total += np.bincount(m.unit, weights=values[m.elem], minlength=group.size)
        used += 1
    return total, used


def taylor(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """|Σ w·∂L/∂w| over every parameter of the channel (Molchanov et al. 2019, first order)."""
    if ctx.gradients is None:
        raise InputError("criterion 'taylor' needs --data (gradients computed with the train extra) or a "
                         "gradients .npz keyed by initializer name (--gradients)")
    per_slot = {}
    for m in group.weight_members(GRADIENT_ROLES):
        grad = ctx.gradients.get(m.slot[0])
        if grad is None:
            continue
        w = ctx.values(m.slot[0])
        if grad.shape != w.shape:
            raise InputError(f"gradient of {m.slot[0]} has shape {grad.shape}, the weight {w.shape}")
        per_slot[m.slot] = per_element(w * grad, m.slot[1]).sum(1)
    total, used = channel_sums(group, per_slot)
    if not used:
        names = ", ".join(sorted({m.slot[0] for m in group.weight_members()}))
        raise InputError(f"criterion 'taylor': no gradient for any weight of group {group.key} ({names})")
    return np.abs(total)


def fisher(group: ChannelGroup, ctx: ScoringContext) -> np.ndarray:
    """Mean over samples of (Σ w·∂L/∂w)² per channel (Kwon et al. 2022): needs per-sample gradients,
    which `prune` computes itself from `data` (onnxprune.train.gradients); a gradients file cannot
    hold them."""
    raise InputError("criterion 'fisher' is computed from data: give --data (needs the train extra: "
                     "pip install 'onnxprune[train]')")


CRITERIA: dict[str, Criterion] = {"l1": l1, "l2": l2, "bn_scale": bn_scale, "random": random, "fpgm": fpgm,
                                  "activation": activation, "apoz": apoz, "wanda": wanda, "taylor": taylor,
                                  "fisher": fisher}
DATA_CRITERIA = ("activation", "apoz", "wanda")
GRADIENT_CRITERIA = ("taylor", "fisher")
"""Criteria that `prune` computes from a loss on `data` when no gradients file is given."""


def resolve_criterion(criterion: "str | Criterion") -> Criterion:
    """A name from CRITERIA, a callable, or 'module:function'."""
    if callable(criterion):
        return criterion
    if criterion in CRITERIA:
        return CRITERIA[criterion]
    if isinstance(criterion, str) and ":" in criterion:
        import importlib

        module, _, func = criterion.partition(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"criterion {criterion!r}: cannot import ({exc})") from None
    raise InputError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)} or module:function")


def score_groups(analysis: Analysis, criterion: "str | Criterion", seed: int = 0, *,
                 stats: "Statistics | None" = None, gradients: "dict[str, np.ndarray] | None" = None
                 ) -> dict[int, np.ndarray]:
    """Scores of every prunable group, validated (one finite number per channel)."""
    fn = resolve_criterion(criterion)
    ctx = ScoringContext(analysis, seed, stats=stats, gradients=gradients)
    scores = {}
    for group in analysis.prunable:
        s = np.asarray(fn(group, ctx), dtype=np.float64).reshape(-1)
        if s.shape != (group.size,) or not np.all(np.isfinite(s)):
            raise InputError(f"criterion returned {s.shape} scores for group {group.key} of {group.size} channels")
        scores[group.id] = s
    return scores


def load_gradients(path: "str | os.PathLike[str]") -> dict[str, np.ndarray]:
    """A gradients .npz keyed by initializer name (any framework can write one)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read gradients ({exc})") from None
