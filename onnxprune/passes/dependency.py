"""Dependency analysis: which channel elements must be removed together.

Starting from the channels that weights define (rule `seeds`), a breadth-first walk asks the rule of
every producer and consumer of each channel slot for its ties. The ties connect individual
elements, so concat offsets, flatten blocks, strided NHWC features and shuffles are all the same
mechanism. A vectorised union-find turns elements into components (one channel each); components
touching the same set of slots form a `ChannelGroup`, the unit a plan prunes.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import InputError
from onnxprune.ops import REGISTRY, Freeze, NodeView, OpRule, Slot, Tie
from onnxprune.ops.base import SUPPORTED_OPSETS, Defer, slot_axes
from onnxprune.ops.control_flow import BODY_OPS, all_nodes, all_tensors, body_owners


@dataclass
class Member:
    """One slot of a group: element `elem[k]` of the slot belongs to channel `unit[k]`."""

    slot: Slot
    elem: np.ndarray
    unit: np.ndarray
    role: str


@dataclass
class ChannelGroup:
    id: int
    key: str
    size: int
    members: list[Member]
    producers: list[str]
    frozen: list[str] = field(default_factory=list)
    lossy_only: list[str] = field(default_factory=list)
    """Reasons removing any channel changes the kept ones (normalisation statistics): lossless
    mode freezes the group with them."""
    parts: np.ndarray | None = None
    """Equal-count constraint: per channel, the part it belongs to (the direction of a bidirectional
    recurrent layer, read from a paired slot); every part must keep as many channels as the others
    (`hidden_size` is one attribute). None when the channels are free."""

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > self.part_count  # every part keeps a channel

    @property
    def part_count(self) -> int:
        """How many equal-count parts the channels form (1: no constraint)."""
        return 1 if self.parts is None else int(self.parts.max()) + 1

    def weight_members(self, roles: tuple[str, ...] = ("weight",)) -> list[Member]:
        return [m for m in self.members if m.role in roles]


@dataclass
class Analysis:
    """Result of the dependency pass over one graph."""

    graph: gs.Graph
    opset: int
    groups: list[ChannelGroup]
    slot_sizes: dict[Slot, int]
    node_ties: dict[str, list[Tie]]
    frozen_slots: dict[Slot, list[str]]
    gqa: str = "kv"
    """The grouped-query attention unit the analysis was made with (rules asked later see it too)."""

    def view(self, node: gs.Node) -> NodeView:
        # Rules read only the node's own tensors; graph.tensors() would walk the whole graph per call.
        return NodeView(node, {t.name: t for t in (*node.inputs, *node.outputs)}, self.opset, gqa=self.gqa)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def exclude(self, patterns: list[str]) -> None:
        """Freeze groups produced by nodes whose names match any glob in `patterns`.

        Only producers' names are matched (a layer's output channels are protected; its inputs
        may still shrink). A pattern matching no node at all is refused: a typo would otherwise
        leave the layer silently unprotected.
        """
        names = [node.name for node in all_nodes(self.graph)]
        unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
        if unmatched:
            raise InputError(", ".join(f"--exclude '{pat}'" for pat in unmatched) + " matches no node")
        for group in self.groups:
            hit = [p for p in group.producers if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
            if hit:
                group.frozen.append(f"excluded by user ({hit[0]})")

    def freeze_lossy(self) -> None:
        """Lossless mode: freeze groups whose removal would change the kept channels' values."""
        for group in self.groups:
            if group.lossy_only and not group.frozen:
                group.frozen.extend(f"{r} (lossy mode only)" for r in group.lossy_only)

    def summary(self) -> dict:
        frozen = [g for g in self.groups if g.frozen]
        return {
            "groups_total": len(self.groups),
            "groups_prunable": len(self.prunable),
            "groups_frozen": [{"group": g.key, "channels": g.size, "reasons": sorted(set(g.frozen))}
                              for g in frozen],
        }


def rule_for(node: gs.Node, opset: int) -> OpRule | None:
    return REGISTRY.lookup(node.op, node.domain or "", opset)


def analyze_graph(graph: gs.Graph, opset: int, gqa: str = "kv") -> Analysis:
    """Channel groups of a graph; `gqa` picks the unit of grouped-query attention (NodeView.gqa)."""
    tensors = all_tensors(graph)  # Loop/Scan bodies are walked with the graph
    walk = _Walk(graph, tensors, opset, gqa)
    walk.run()
    sizes = walk.sizes()
    labels, slots, offsets = _components(sizes, walk.ties)
    groups = _groups(labels, slots, offsets, sizes, walk)
    return Analysis(graph, opset, groups, sizes, dict(walk.node_ties), dict(walk.frozen), gqa)


class _Walk:
    """Breadth-first discovery of channel slots and their ties."""

    def __init__(self, graph: gs.Graph, tensors: dict[str, gs.Tensor], opset: int, gqa: str = "kv") -> None:
        self.graph, self.tensors, self.opset, self.gqa = graph, tensors, opset, gqa
        self.io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        self.implicit = _subgraph_reads(graph)
        self.owners = body_owners(graph)  # body inputs/outputs: their Loop/Scan binds them
        lo, hi = SUPPORTED_OPSETS
        self.opset_note = "" if lo <= opset <= hi else f"opset {opset} is outside the opsets the op rules know ({lo}..{hi})"
        self.order: list[Slot] = []
        self.seen: set[Slot] = set()
        self.ties: list[Tie] = []
        self.node_ties: dict[str, list[Tie]] = defaultdict(list)
        self.frozen: dict[Slot, list[str]] = defaultdict(list)
        self.seeded_by: dict[Slot, str] = {}
        self.roles: dict[str, str] = {}
        self.settled = False
        self.deferred: list[tuple[Slot, gs.Node]] = []
        self.lossy: dict[Slot, list[str]] = defaultdict(list)

    def run(self) -> None:
        queue: list[Slot] = []
        anchors: list[Slot] = []
        for node in all_nodes(self.graph):
            rule = rule_for(node, self.opset)
            if rule is None:
                continue
            view = NodeView(node, self.tensors, self.opset, gqa=self.gqa)
            for slot in rule.seeds(view):
                self.seeded_by.setdefault(slot, node.name)
                queue.append(slot)
            anchors.extend(rule.anchors(view))
            self.roles.update(rule.roles(view))
        self._explore(anchors)  # structural channel axes first: see OpRule.anchors
        self._explore(queue)
        while self.deferred:  # decide deferred rules one at a time, each seeing the others' outcome
            slot, node = self.deferred.pop(0)
            self.settled = True
            found = self._ask(slot, node)
            self.settled = False
            self.ties.extend(found)
            self._explore([s for tie in found for s in (tie.a, tie.b)])

    def _explore(self, queue: list[Slot]) -> None:
        head = 0
        while head < len(queue):
            slot = queue[head]
            head += 1
            if slot in self.seen:
                continue
            self.seen.add(slot)
            self.order.append(slot)
            for tie in self._visit(slot):
                queue.extend((tie.a, tie.b))

    def _visit(self, slot: Slot) -> list[Tie]:
        name = slot[0]
        tensor = self.tensors.get(name)
        if tensor is None:
            self.frozen[slot].append(f"tensor {name} not found")
            return []
        if name in self.io:
            self.frozen[slot].append(f"{name} is a graph input or output")
        if name in self.implicit:
            self.frozen[slot].append(f"{name} is read inside the subgraph of {self.implicit[name]}")
        if self.opset_note:
            self.frozen[slot].append(self.opset_note)
        found: list[Tie] = []
        owner = self.owners.get(name)
        for node in list(tensor.inputs) + list(tensor.outputs) + ([owner] if owner is not None else []):
            found.extend(self._ask(slot, node))
        self.ties.extend(found)
        return found

    def _ask(self, slot: Slot, node: gs.Node) -> list[Tie]:
        """The ties one node's rule gives for a slot; a freeze is recorded, a deferral queued."""
        rule = rule_for(node, self.opset)
        where = f"{node.op} '{node.name}'"
        if rule is None:
            domain = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx", None) else ""
            self.frozen[slot].append(f"{where}: no channel rule for {node.op}{domain}")
            return []
        view = NodeView(node, self.tensors, self.opset, self.seen, self.settled, self.gqa)
        try:
            result = rule.ties(view, slot)
        except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as exc:
            result = Freeze(f"rule could not read the node ({type(exc).__name__}: {exc})")
        if isinstance(result, Defer):
            self.deferred.append((slot, node))
            return []
        if isinstance(result, Freeze):
            self.frozen[slot].append(f"{where}: {result.reason}")
            return []
        self.node_ties[node.name].extend(result)
        # Asked even when no tie comes back: channels may end at a normalisation statistic.
        reason = rule.lossy_reason(view, slot)
        if reason:
            self.lossy[slot].append(f"{where}: {reason}")
        return list(result)

    def sizes(self) -> dict[Slot, int]:
        sizes: dict[Slot, int] = {}
        extent: dict[Slot, int] = defaultdict(int)
        for tie in self.ties:
            if len(tie.a_idx):
                extent[tie.a] = max(extent[tie.a], int(tie.a_idx.max()) + 1)
                extent[tie.b] = max(extent[tie.b], int(tie.b_idx.max()) + 1)
        for slot in self.order:
            shape = self.tensors[slot[0]].shape if slot[0] in self.tensors else None
            dims = [shape[a] if shape is not None and a < len(shape) else None for a in slot_axes(slot)]
            dim = int(np.prod(dims)) if all(isinstance(d, (int, np.integer)) for d in dims) else None
            if dim is not None and dim >= extent[slot]:
                sizes[slot] = int(dim)
            else:
                sizes[slot] = extent[slot]
                self.frozen[slot].append(f"size of axis {slot[1]} of {slot[0]} is unknown")
        return sizes


def _subgraph_reads(graph: gs.Graph) -> dict[str, str]:
    """Outer-scope tensor names read inside subgraphs the walk does not enter (If branches),
    mapped to the reading node; Loop/Scan bodies are walked (ops/control_flow.py)."""
    reads: dict[str, str] = {}

    def visit(sub: gs.Graph, owner: str) -> None:
        for node in sub.nodes:
            for t in node.inputs:
                reads.setdefault(t.name, owner)
            for attr in node.attrs.values():
                if isinstance(attr, gs.Graph):
                    visit(attr, owner)

    for node in all_nodes(graph):
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph) and node.op not in BODY_OPS:
                visit(attr, f"{node.op} '{node.name}'")
    return reads


def _components(sizes: dict[Slot, int], ties: list[Tie]):
    """Union-find over all channel elements; returns (label per element, slots, offsets)."""
    slots = list(sizes)
    offsets = {}
    total = 0
    for slot in slots:
        offsets[slot] = total
        total += sizes[slot]
    if ties:
        u = np.concatenate([t.a_idx + offsets[t.a] for t in ties]).astype(np.int64)
        v = np.concatenate([t.b_idx + offsets[t.b] for t in ties]).astype(np.int64)
    else:
        u = v = np.zeros(0, dtype=np.int64)
    return connected_components(total, u, v), slots, offsets


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Label each of n nodes with the smallest node id of its component (hook and compress)."""
    label = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return label
    while True:
        lu, lv = label[u], label[v]
        # An edge whose ends share a root stays so (roots only merge): later rounds skip it, and a
        # round with no edge left changes nothing, which is when the loop ended before.
        active = lu != lv
        if not active.any():
            return label
        u, v, lu, lv = u[active], v[active], lu[active], lv[active]
        low = np.minimum(lu, lv)
        new = label.copy()
        np.minimum.at(new, lu, low)
        np.minimum.at(new, lv, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values. np.unique's hash path (numpy >= 2.3) is ~100x slower than a sort
    on the million-element label arrays of transformer models."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def _groups(labels: np.ndarray, slots: list[Slot], offsets: dict[Slot, int], sizes: dict[Slot, int],
            walk: _Walk) -> list[ChannelGroup]:
    slot_id = np.repeat(np.arange(len(slots)), [sizes[s] for s in slots])
    n_slots = max(len(slots), 1)
    pairs = unique_sorted(labels * n_slots + slot_id)
    comp, comp_slot = pairs // n_slots, pairs % n_slots
    starts = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1]]) if len(comp) else comp  # no slots at all
    gid_of, first_slot = _signature_groups(comp_slot, starts, n_slots)
    counts = np.bincount(gid_of, minlength=len(first_slot))
    group_of = np.full(len(labels), -1, dtype=np.int64)
    unit_of = np.full(len(labels), -1, dtype=np.int64)
    by_group = np.argsort(gid_of, kind="stable")  # components of each group, smallest label first
    group_of[comp[starts]] = gid_of
    unit_of[comp[starts][by_group]] = np.arange(len(by_group)) - np.repeat(np.cumsum(counts) - counts, counts)
    members: dict[int, list[Member]] = defaultdict(list)
    for slot in slots:
        if sizes[slot] == 0:  # an axis of unknown size that nothing tied: no elements, no member
            continue
        lab = labels[offsets[slot]:offsets[slot] + sizes[slot]]
        gids, units = group_of[lab], unit_of[lab]
        order = np.argsort(gids, kind="stable")
        bounds = np.flatnonzero(np.r_[True, gids[order][1:] != gids[order][:-1]])
        for k, start in enumerate(bounds):
            end = bounds[k + 1] if k + 1 < len(bounds) else len(order)
            sel = order[start:end]
            role = walk.roles.get(slot[0], "activation" if not isinstance(walk.tensors.get(slot[0]), gs.Constant) else "param")
            members[int(gids[sel[0]])].append(Member(slot, sel.astype(np.int64), units[sel], role))
    groups = []
    for gid, count in enumerate(counts.tolist()):
        group_members = members[gid]
        anchor = slots[first_slot[gid]]
        first = int(min(m.elem.min() for m in group_members if m.slot == anchor))
        axis = "+".join(map(str, anchor[1])) if isinstance(anchor[1], tuple) else anchor[1]  # paired: '1+3'
        key = f"{anchor[0]}:{axis}" + (f"@{first}" if first else "")
        frozen = sorted({r for m in group_members for r in walk.frozen.get(m.slot, [])})
        producers = sorted({walk.seeded_by[m.slot] for m in group_members if m.slot in walk.seeded_by})
        lossy = sorted({r for m in group_members for r in walk.lossy.get(m.slot, [])})
        group = ChannelGroup(gid, key, count, group_members, producers, frozen, lossy)
        group.parts = _parts(group, walk.tensors)
        groups.append(group)
    return groups


def _parts(group: ChannelGroup, tensors: dict[str, gs.Tensor]) -> np.ndarray | None:
    """Per channel, the outer index of the paired slots it lives in (a recurrent direction), or None
    when the group has no paired slot or a channel spans several outer indices (directions tied)."""
    part = np.full(group.size, -1, dtype=np.int64)
    for m in group.members:
        if not isinstance(m.slot[1], tuple):
            continue
        outer = m.elem // int(tensors[m.slot[0]].shape[m.slot[1][1]])
        seen = part[m.unit]
        if np.any((seen >= 0) & (seen != outer)):
            return None
        part[m.unit] = outer
        if np.any(part[m.unit] != outer):
            return None  # one channel at two outer indices of the same slot
    if np.any(part < 0) or len(np.unique(part)) < 2:
        return None
    counts = np.bincount(part)
    if np.any(counts[counts > 0] != counts.max()):
        group.frozen.append("the parts of an equal-count group (directions) hold different numbers of channels")
    return part


def _signature_groups(comp_slot: np.ndarray, starts: np.ndarray, n_slots: int) -> tuple[np.ndarray, list[int]]:
    """Number the components by the set of slots they touch (their signature), in the order of each
    signature's first component; returns (group of each component, first slot of each group).

    Vectorised: a transformer has ~10^5 components, too many for a tuple per component. Each
    signature is summarised by its length and two random sums; components with equal summaries
    are then compared slot by slot, and a collision falls back to exact tuples.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64), []
    lengths = np.diff(np.r_[starts, len(comp_slot)])
    salt = np.random.default_rng(0).integers(0, 1 << 62, size=(2, n_slots), dtype=np.int64)
    sums = [np.add.reduceat(s[comp_slot], starts) for s in salt]  # int64 sums wrap: still a hash
    order = np.lexsort((sums[1], sums[0], lengths))
    new = np.r_[True, (np.diff(lengths[order]) != 0) | (np.diff(sums[0][order]) != 0)
                | (np.diff(sums[1][order]) != 0)]
    key = np.empty(len(starts), dtype=np.int64)
    key[order] = np.cumsum(new) - 1
    first = np.full(int(key.max()) + 1, len(starts), dtype=np.int64)
    np.minimum.at(first, key, np.arange(len(starts)))
    owner = np.repeat(first[key], lengths)  # each element's representative component
    position = np.arange(len(comp_slot)) - np.repeat(starts, lengths)
    if not np.array_equal(comp_slot, comp_slot[starts[owner] + position]):
        return _signature_groups_exact(comp_slot, starts)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[key], [int(comp_slot[starts[f]]) for f in np.sort(first)]


def _signature_groups_exact(comp_slot: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """`_signature_groups` with one tuple per component (the hash summary collided)."""
    ends = np.r_[starts[1:], len(comp_slot)]
    ids: dict[tuple, int] = {}
    gid_of = np.array([ids.setdefault(tuple(comp_slot[a:b]), len(ids)) for a, b in zip(starts, ends)], dtype=np.int64)
    return gid_of, [sig[0] for sig in ids]
