"""Plans: which channels of which group to remove. A plan is data: saved to JSON and replayed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np

from onnxprune.errors import InputError
from onnxprune.passes.dependency import Analysis, ChannelGroup

PLAN_FORMAT = "onnxprune-plan"
PLAN_VERSION = 1


@dataclass
class GroupPlan:
    key: str
    size: int
    remove: list[int]


@dataclass
class Plan:
    groups: list[GroupPlan] = field(default_factory=list)

    @property
    def removed_channels(self) -> int:
        return sum(len(g.remove) for g in self.groups)

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                "groups": [{"key": g.key, "size": g.size, "remove": list(g.remove)} for g in self.groups]}

    def save(self, path: "str | Path") -> None:
        from onnxprune.ir import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        from onnxprune.ir import check_document

        check_document(data, PLAN_FORMAT, PLAN_VERSION, "plan")
        try:
            groups = [GroupPlan(str(g["key"]), int(g["size"]), sorted(int(i) for i in g["remove"]))
                      for g in data["groups"]]
        except (KeyError, TypeError, ValueError):
            raise InputError("plan file has a malformed group entry") from None
        return cls(groups)

    @classmethod
    def load(cls, path: "str | Path") -> "Plan":
        from onnxprune.ir import read_json

        return cls.from_json(read_json(path, "plan"))

    def resolve(self, analysis: Analysis) -> dict[int, np.ndarray]:
        """Map the plan onto an analysis: {group id: removed units}. Mismatches are errors."""
        by_key = {g.key: g for g in analysis.groups}
        resolved = {}
        for entry in self.groups:
            group = by_key.get(entry.key)
            if group is None:
                raise InputError(f"plan group {entry.key} does not exist in this model")
            if group.size != entry.size:
                raise InputError(f"plan group {entry.key} has {entry.size} channels, the model has {group.size}")
            if not entry.remove:
                continue
            if group.frozen:
                raise InputError(f"plan prunes group {entry.key}, which is frozen: {group.frozen[0]}")
            remove = np.array(entry.remove, dtype=np.int64)
            if remove.min() < 0 or remove.max() >= group.size or len(set(entry.remove)) == group.size:
                raise InputError(f"plan group {entry.key}: channel indices out of range or nothing kept")
            _check_parts(group, remove)
            resolved[group.id] = remove
        return resolved


Rounding = Callable[[ChannelGroup, int], int]
"""(group, planned kept count) -> the kept count used: at least the planned count (never 0), at most
the group's size, and non-decreasing in the planned count, so target searches stay monotone."""
RoundTo = Union[int, Rounding]


def round_up(size: int, keep: int, multiple: int) -> int:
    """`keep` rounded up to a multiple of `multiple`, for groups larger than one multiple (a smaller
    group keeps its exact count: rounding it up would keep every channel)."""
    if multiple > 1 and size > multiple:
        keep = max(multiple, int(math.ceil(keep / multiple)) * multiple)
    return min(size, keep)


def rounding(round_to: RoundTo) -> Rounding:
    """A rounding function from an integer multiple (1: exact counts) or a rounding function. An
    equal-count group (a bidirectional layer's directions) is rounded per part."""
    if callable(round_to):
        return round_to
    return lambda group, keep: _round_parts(group, keep, round_to)


def _round_parts(group: ChannelGroup, keep: int, multiple: int) -> int:
    parts = group.part_count
    return parts * round_up(group.size // parts, -(-keep // parts), multiple)


def keep_count(size: int, ratio: float, round_to: int = 1, min_keep: int = 1) -> int:
    """Channels to keep when removing `ratio` of `size`, as a multiple of `round_to` where possible."""
    return round_up(size, max(min_keep, size - int(math.floor(size * ratio + 1e-9))), round_to)


def _check_parts(group: ChannelGroup, remove: np.ndarray) -> None:
    """An equal-count group (a bidirectional layer's directions) must lose as many channels in
    each part and keep at least one in each."""
    if group.parts is None:
        return
    per_part = np.bincount(group.parts[remove], minlength=group.part_count)
    if np.any(per_part != per_part[0]) or per_part[0] >= group.size // group.part_count:
        raise InputError(f"plan group {group.key} removes {per_part.tolist()} channels from its "
                         f"{group.part_count} parts (directions): every part must lose the same number "
                         "and keep at least one")


def group_keep(group: ChannelGroup, ratio: float) -> int:
    """Channels a group keeps when removing `ratio` of them (exact counts: `rounding` rounds them);
    an equal-count group keeps `keep_count` of each part, so the total is a multiple of the parts."""
    parts = group.part_count
    return parts * keep_count(group.size // parts, ratio)


def planned_units(group: ChannelGroup, scores: np.ndarray, keep: int) -> list[int]:
    """The lowest-scored channels of a group, leaving `keep`. An equal-count group keeps
    ceil(keep / parts) channels in each part and removes each part's own lowest-scored ones."""
    if group.parts is None:
        return lowest_units(scores, group.size - keep)
    per_part = -(-keep // group.part_count)
    removed: list[int] = []
    for part in range(group.part_count):
        members = np.flatnonzero(group.parts == part)
        removed.extend(int(members[i]) for i in lowest_units(scores[members], max(len(members) - per_part, 0)))
    return sorted(removed)


def lowest_units(scores: np.ndarray, count: int) -> list[int]:
    """The `count` lowest-scored units, sorted; ties go to the lower index."""
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:count])


def normalise_scores(scores: np.ndarray) -> np.ndarray:
    """A group's scores divided by their mean magnitude, so groups of different scale compete in one
    global ranking. The absolute mean keeps the order when a custom criterion's scores are negative
    on average (dividing by a negative mean would reverse it); an all-zero group is left as is."""
    scale = float(np.abs(scores).mean()) if len(scores) else 0.0
    return scores / scale if scale > 0 and np.isfinite(scale) else np.asarray(scores, dtype=np.float64)


def uniform_plan(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: RoundTo = 1) -> Plan:
    """Remove the same fraction of every prunable group (kept counts rounded by `round_to`)."""
    _check_ratio(ratio)
    rnd = rounding(round_to)
    plan = Plan()
    for group in analysis.prunable:
        keep = rnd(group, group_keep(group, ratio))
        plan.groups.append(GroupPlan(group.key, group.size, planned_units(group, scores[group.id], keep)))
    return plan


def global_plan(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: RoundTo = 1,
                max_ratio: float = 0.9) -> Plan:
    """Remove `ratio` of all prunable channels, lowest normalised score first, across groups."""
    _check_ratio(ratio)
    groups = analysis.prunable
    if not groups:
        return Plan()
    normed = [normalise_scores(scores[g.id]) for g in groups]
    owner = np.concatenate([np.full(g.size, k) for k, g in enumerate(groups)])
    flat = np.concatenate(normed)
    budget = int(math.floor(len(flat) * ratio + 1e-9))
    caps = [group.size - group_keep(group, max_ratio) for group in groups]
    removed = [0] * len(groups)
    for idx in np.argsort(flat, kind="stable"):
        if budget <= 0:
            break
        k = owner[idx]
        if removed[k] < caps[k]:
            removed[k] += 1
            budget -= 1
    rnd = rounding(round_to)
    plan = Plan()
    for k, group in enumerate(groups):
        keep = rnd(group, group_keep(group, removed[k] / group.size))
        plan.groups.append(GroupPlan(group.key, group.size, planned_units(group, scores[group.id], keep)))
    return plan


def _global_order(groups, scores: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(owner group index, channel) of every prunable channel, lowest normalised score first."""
    normed = [normalise_scores(scores[g.id]) for g in groups]
    owner = np.concatenate([np.full(g.size, k) for k, g in enumerate(groups)])
    channel = np.concatenate([np.arange(g.size) for g in groups])
    order = np.argsort(np.concatenate(normed), kind="stable")
    return owner[order], channel[order]


def target_plan(analysis: Analysis, scores: dict[int, np.ndarray], *, target_macs: float | None = None,
                target_params: float | None = None, max_ratio: float = 0.9, round_to: RoundTo = 1) -> Plan:
    """Remove channels in global order of normalised score until the kept MACs / params fractions
    reach the targets (fractions to keep); no group loses more than `max_ratio` of its channels.

    Scores are divided by their group's mean so groups of different scale compete fairly; the
    smallest prefix of the global order that meets every target is found by bisection on a cost
    model (exact for weight layers), so the result lands within one channel of the target (one
    rounding step with `round_to`: counts are rounded before the cost is evaluated, so a rounded
    plan still meets the targets).
    """
    from onnxprune.cost import CostModel

    for name, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise InputError(f"{name} is the fraction to keep, in (0, 1]; got {value}")
    _check_ratio(max_ratio)
    groups = analysis.prunable
    cost = CostModel(analysis)
    owner, channel = _global_order(groups, scores)
    caps = np.array([g.size - group_keep(g, max_ratio) for g in groups], dtype=np.int64)
    rnd = rounding(round_to)

    def counts_for(k: int) -> np.ndarray:
        used = np.zeros(len(groups), dtype=np.int64)
        left = k
        for j in owner:  # the first k admissible channels in global order
            if left <= 0:
                break
            if used[j] < caps[j]:
                used[j] += 1
                left -= 1
        return used

    def units_of(used: np.ndarray) -> dict[int, np.ndarray]:
        keeps = [rnd(g, group_keep(g, used[j] / g.size)) for j, g in enumerate(groups)]
        return {g.id: np.array(planned_units(g, scores[g.id], keeps[j]), dtype=np.int64)
                for j, g in enumerate(groups) if keeps[j] < g.size}

    def kept(used: np.ndarray) -> tuple[float, float]:
        return cost.evaluate(units_of(used))

    def closeness(used: np.ndarray) -> float:
        macs, params = kept(used)
        return (macs if target_macs is not None else 0.0) + (params if target_params is not None else 0.0)

    def meets(used: np.ndarray) -> bool:
        macs, params = kept(used)
        return (target_macs is None or macs <= target_macs + 1e-9) and \
            (target_params is None or params <= target_params + 1e-9)

    lo, hi = 0, int(caps.sum())
    if not meets(counts_for(hi)):
        macs, params = kept(counts_for(hi))
        raise InputError(f"targets cannot be met with max_ratio {max_ratio}: the prunable groups can go down to "
                         f"{macs:.1%} of the MACs and {params:.1%} of the parameters")
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(counts_for(mid)):
            hi = mid
        else:
            lo = mid + 1
    used = counts_for(lo)
    if lo > 0:  # the last channel may overshoot: take the cheapest one-channel step that still meets
        before = counts_for(lo - 1)
        steps = [before + np.eye(len(groups), dtype=np.int64)[j] for j in range(len(groups)) if before[j] < caps[j]]
        fitting = [step for step in steps if meets(step)]
        if fitting:
            used = max(fitting, key=closeness)
    units = units_of(_give_back(used, groups, caps, rnd, meets, closeness,
                                  (target_macs or 0.0) + (target_params or 0.0)))
    return Plan([GroupPlan(g.key, g.size, [int(u) for u in units.get(g.id, [])]) for g in groups])


SWAP_GROUPS = 32
CLOSE_ENOUGH = 0.01
SWAP_STEPS = 4
"""Up to this many groups, target search also tries trading up to SWAP_STEPS rounding steps of one
group for channels of another."""


def _give_back(used: np.ndarray, groups, caps: np.ndarray, rnd: Rounding, meets, closeness, goal: float
               ) -> np.ndarray:
    """Move a plan that meets the targets closer to them: with rounding, the last step of the global
    order can remove a whole block more than needed. Each round every group gets back as many
    channels as the targets allow (bisection: meeting is monotone in the count). Only when that
    leaves the plan more than CLOSE_ENOUGH below `goal` (the targets' sum) and the model is small
    (coarse steps), up to SWAP_STEPS rounding steps of one group are traded for channels of another,
    since a trade overrides the criterion's order. Every move meets the targets by construction."""
    best = closeness(used)
    for _ in range(2 * len(groups)):
        score, top = _closest([_most_back(used, j, meets) for j in range(len(groups)) if used[j] > 0], closeness)
        if score > best + 1e-12:  # giving back only ever keeps more
            used, best = top, score
            continue
        if best >= goal - CLOSE_ENOUGH or len(groups) > SWAP_GROUPS:  # trades go against the criterion
            break
        trades = []
        for a, g in enumerate(groups):
            up = used.copy()
            for _ in range(SWAP_STEPS):
                keep = rnd(g, g.size - int(up[a]))
                if up[a] == 0 or keep >= g.size:
                    break
                up[a] = max(0, g.size - keep - 1)
                trades += [_least_more(up, b, int(caps[b]), meets) for b in range(len(groups)) if b != a]
        score, top = _closest(trades, closeness)
        if score <= best + 1e-12:
            break
        used, best = top, score
    return used


def _closest(moves: "list[np.ndarray | None]", closeness) -> "tuple[float, np.ndarray | None]":
    """The first move of highest closeness and its closeness (-inf: no move)."""
    best, top = -math.inf, None
    for move in moves:
        score = closeness(move) if move is not None else -math.inf
        if score > best:
            best, top = score, move
    return best, top


def _most_back(used: np.ndarray, j: int, meets) -> np.ndarray:
    """`used` with group j's removed count as small as the targets allow."""
    return _fewest_meeting(used, j, 0, int(used[j]), meets)


def _least_more(used: np.ndarray, j: int, cap: int, meets) -> np.ndarray | None:
    """`used` with group j's removed count raised just enough to meet the targets (None: cannot)."""
    top = used.copy()
    top[j] = cap
    if cap < used[j] or not meets(top):
        return None
    return _fewest_meeting(used, j, int(used[j]), cap, meets)


def _fewest_meeting(used: np.ndarray, j: int, lo: int, hi: int, meets) -> np.ndarray:
    """`used` with group j's removed count the smallest in [lo, hi] that meets the targets
    (bisection: meeting is monotone in the count; `hi` is known to meet)."""
    while lo < hi:
        mid = (lo + hi) // 2
        trial = used.copy()
        trial[j] = mid
        if meets(trial):
            hi = mid
        else:
            lo = mid + 1
    out = used.copy()
    out[j] = lo
    return out


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"ratio must be in [0, 1), got {ratio}")
