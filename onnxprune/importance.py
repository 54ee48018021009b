"""Importance criteria: a criterion maps a channel group to one score per channel (higher = keep).

A channel's score aggregates every coupled member of its group (producer rows, consumer columns,
BatchNorm scales), each member normalised by its own mean so that no single large tensor dominates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import InputError
from onnxprune.passes.dependency import Analysis, ChannelGroup, Member


@dataclass
class ScoringContext:
    """What criteria may read: the analysis (weights included) and a seed for random choices."""

    analysis: Analysis
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def values(self, name: str) -> np.ndarray:
        tensor = self.analysis.graph.tensors()[name]
        if not isinstance(tensor, gs.Constant):
            raise KeyError(name)
        return np.asarray(tensor.values, dtype=np.float64)


Criterion = Callable[[ChannelGroup, ScoringContext], np.ndarray]


def _member_scores(member: Member, size: int, ctx: ScoringContext, power: int) -> np.ndarray:
    """Sum of |w|^power over each channel's slice of one member, per channel."""
    w = ctx.values(member.slot[0])
    per_elem = np.abs(np.moveaxis(w, member.slot[1], 0).reshape(w.shape[member.slot[1]], -1)) ** power
    per_elem = per_elem.sum(axis=1)
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


CRITERIA: dict[str, Criterion] = {"l1": l1, "l2": l2, "bn_scale": bn_scale, "random": random}


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


def score_groups(analysis: Analysis, criterion: "str | Criterion", seed: int = 0) -> dict[int, np.ndarray]:
    """Scores of every prunable group, validated (one finite number per channel)."""
    fn = resolve_criterion(criterion)
    ctx = ScoringContext(analysis, seed)
    scores = {}
    for group in analysis.prunable:
        s = np.asarray(fn(group, ctx), dtype=np.float64).reshape(-1)
        if s.shape != (group.size,) or not np.all(np.isfinite(s)):
            raise InputError(f"criterion returned {s.shape} scores for group {group.key} of {group.size} channels")
        scores[group.id] = s
    return scores
