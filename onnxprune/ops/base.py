"""The contract every op rule follows, and the read-only node view rules see.

A rule is a declaration of channel ties, not a procedure over the graph: asked about one channel
slot (a tensor and one of its axes) at one node, it returns the element-wise ties from that slot
to other slots of the same node, or a `Freeze` with the reason it cannot prove removal safe. The
generic machinery in `onnxprune.passes.dependency` does the traversal and the union-find; the
rewrite pass calls `update` so a rule can fix the attributes and shape constants it owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs
from onnx.defs import onnx_opset_version

if TYPE_CHECKING:
    from onnxprune.passes.rewrite import Edit

Slot = "tuple[str, int] | tuple[str, tuple[int, int]]"
"""A channel slot: (tensor name, non-negative axis). A *paired* slot names two axes (outer, inner):
its elements are the flattened positions outer * inner_size + inner (a bidirectional recurrent
layer's (direction, unit): each direction's units are channels of their own)."""


def slot_axes(slot: Slot) -> tuple[int, ...]:
    """The axes a slot spans: one, or two for a paired slot."""
    return slot[1] if isinstance(slot[1], tuple) else (slot[1],)


def per_element(array: np.ndarray, axis: "int | tuple[int, ...]") -> np.ndarray:
    """[elements, rest]: the slot's axes moved to the front and flattened (a paired slot's outer
    axis first), the other axes flattened behind them."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    moved = np.moveaxis(array, axes, tuple(range(len(axes))))
    return moved.reshape(int(np.prod([array.shape[a] for a in axes], dtype=np.int64)), -1)


@dataclass(frozen=True)
class Tie:
    """Element `a_idx[k]` of slot `a` must be removed together with element `b_idx[k]` of slot `b`."""

    a: Slot
    b: Slot
    a_idx: np.ndarray
    b_idx: np.ndarray


@dataclass(frozen=True)
class Freeze:
    """The queried slot cannot be pruned at this node; `reason` is shown by `analyze`."""

    reason: str


@dataclass(frozen=True)
class Defer:
    """The answer depends on channel axes not discovered yet (a reshape splitting one axis into
    several, seen from its merged side first): the walk asks again, with `NodeView.settled` set,
    once the rest of the graph is explored, so both sides of a channel shuffle choose alike."""


TieResult = "list[Tie] | Freeze"


def identity(a: Slot, b: Slot, n: int) -> Tie:
    """Tie element i of `a` to element i of `b` for i < n."""
    idx = np.arange(n, dtype=np.int64)
    return Tie(a, b, idx, idx)


def _dim(d: object) -> "int | np.integer | str | None":
    """One dim as `NodeView.shape` gives it: a non-negative int, a symbol, or None (unknown)."""
    if isinstance(d, (int, np.integer)) and d >= 0:
        return d
    return d if isinstance(d, str) else None


@dataclass
class NodeView:
    """What a rule may read about its node: names, attributes, static shapes and constants."""

    node: gs.Node
    tensors: dict[str, gs.Tensor]
    opset: int
    known: "set[Slot] | frozenset[Slot]" = frozenset()
    """Channel slots discovered so far; lets a rule resolve an ambiguous direction (a reshape that
    splits one axis into several) the way the rest of the graph already decided."""
    settled: bool = True
    """False during the walk's first pass: a rule may answer `Defer` instead of guessing."""
    gqa: str = "kv"
    """Unit of grouped-query attention: 'kv' (a KV head with its query heads) or 'query' (query
    position j of every KV group; K/V repeats shrink instead, see ops/repeat.py)."""

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    def attr(self, key: str, default=None):
        return self.node.attrs.get(key, default)

    def inp(self, i: int) -> str | None:
        """Name of input i, or None when absent or empty (an omitted optional input)."""
        if i < len(self.node.inputs) and self.node.inputs[i].name:
            return self.node.inputs[i].name
        return None

    def out(self, i: int) -> str | None:
        if i < len(self.node.outputs) and self.node.outputs[i].name:
            return self.node.outputs[i].name
        return None

    @property
    def inputs(self) -> list[str]:
        return [t.name for t in self.node.inputs]

    @property
    def outputs(self) -> list[str]:
        return [t.name for t in self.node.outputs]

    def shape(self, name: str | None) -> tuple | None:
        """Dims of a tensor: ints, strings for symbolic dims, None for unknown; None if rank unknown."""
        if name is None or name not in self.tensors:
            return None
        tensor = self.tensors[name]
        if tensor.shape is None:
            return None
        # The rules ask for shapes ~10 times per node: plain non-negative ints (nearly every dim)
        # take one type test here, the rest the general rule.
        return tuple(d if type(d) is int and d >= 0 else _dim(d) for d in tensor.shape)

    def rank(self, name: str | None) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def dim(self, slot: Slot) -> int | None:
        """Static size of the slot's axis, or None."""
        shape = self.shape(slot[0])
        if shape is None or max(slot_axes(slot)) >= len(shape):
            return None
        dims = [shape[a] for a in slot_axes(slot)]
        return int(np.prod(dims)) if all(isinstance(d, (int, np.integer)) for d in dims) else None

    def is_const(self, name: str | None) -> bool:
        return name is not None and isinstance(self.tensors.get(name), gs.Constant)

    def const(self, name: str | None) -> np.ndarray | None:
        """Value of an initializer input, or None when it is computed at run time."""
        if not self.is_const(name):
            return None
        return np.asarray(self.tensors[name].values)

    def int_list(self, attr: str, input_index: int) -> list[int] | None:
        """An int list given as attribute (older opsets) or constant input (newer ones)."""
        if attr in self.node.attrs:
            return [int(v) for v in self.node.attrs[attr]]
        name = self.inp(input_index)
        if name is None:
            return None
        value = self.const(name)
        return None if value is None else [int(v) for v in value.reshape(-1)]

    def where(self) -> str:
        return f"{self.op} node '{self.name}'"


class OpRule:
    """Base rule: knows nothing, so every slot it is asked about is frozen.

    Subclasses override `ties` (analysis), and where needed `seeds` (weights that define channels),
    `update` (attributes and shape constants after slicing), `roles` (what each initializer is, for
    importance), `propagate` (per-channel constants, for lossless removal) and `compensate`
    (fold removed input channels into a bias).
    """

    value_preserving = False
    """True when tied elements carry identical values (pure layout ops such as Concat, Transpose)."""

    def seeds(self, v: NodeView) -> list[Slot]:
        return []

    def anchors(self, v: NodeView) -> list[Slot]:
        """Activation slots whose axis is a channel axis by structure (an attention head axis).

        The walk explores them before the weight seeds, so a reshape that splits a projection into
        (heads, head_dim) ties it to the head axis rather than guessing the inner axis.
        """
        return []

    def hidden(self, v: NodeView) -> list[Slot]:
        """Slots that carry a model's hidden size by structure (an embedding table's columns).

        Their groups are the residual stream: `onnxprune.heads.freeze_hidden` freezes them unless
        the caller opts in to hidden-size pruning, even in models without attention heads.
        """
        return []

    def ties(self, v: NodeView, slot: Slot) -> "list[Tie] | Freeze":
        return Freeze(f"no channel rule for {v.op}")

    def lossy_reason(self, v: NodeView, slot: Slot) -> str | None:
        """Why removing elements of this (tied) slot changes the values of the kept ones even when
        the removed ones are constant, e.g. a normalisation over the axis; such groups are pruned
        in lossy mode only and frozen, with this reason, by lossless mode."""
        return None

    def update(self, v: NodeView, edit: "Edit") -> None:
        return None

    def roles(self, v: NodeView) -> dict[str, str]:
        return {}

    def propagate(self, v: NodeView, values: "ValueTable") -> None:
        return None

    def contraction(self, v: NodeView) -> Slot | None:
        """The input slot this node's weights contract over (where channels leave their group)."""
        return None

    def compensation_exact(self, v: NodeView, values: np.ndarray) -> bool:
        """Whether folding constant inputs of these values into a bias reproduces the output exactly."""
        return True

    def compensate(self, v: NodeView, slot: Slot, removed: np.ndarray, values: np.ndarray, edit: "Edit") -> None:
        """Fold removed input elements (with the given per-element values) into a bias."""
        raise TypeError(f"{v.op} has no bias to compensate into")


@dataclass
class ValueTable:
    """Per-element constant values of channel slots (NaN: not provably constant)."""

    sizes: dict[Slot, int]
    values: dict[Slot, np.ndarray] = field(default_factory=dict)

    def get(self, slot: Slot) -> np.ndarray | None:
        if slot not in self.sizes:
            return None
        if slot not in self.values:
            self.values[slot] = np.full(self.sizes[slot], np.nan)
        return self.values[slot]

    def set(self, slot: Slot, vals: np.ndarray) -> None:
        if slot in self.sizes and len(vals) == self.sizes[slot]:
            self.values[slot] = np.asarray(vals, dtype=np.float64)


@dataclass(frozen=True)
class RuleKey:
    op: str
    domain: str = ""


class Registry:
    """Op type → rule. Registering the same (domain, op, opset range) twice is an error."""

    def __init__(self) -> None:
        self._rules: dict[RuleKey, list[tuple[int, int, OpRule]]] = {}

    def register(self, *ops: str, domain: str = "", opsets: tuple[int, int] = (1, 10**6)) -> Callable:
        def decorate(cls: type[OpRule]) -> type[OpRule]:
            rule = cls()
            for op in ops:
                key = RuleKey(op, domain)
                entries = self._rules.setdefault(key, [])
                for lo, hi, _ in entries:
                    if lo <= opsets[1] and opsets[0] <= hi:
                        raise ValueError(f"op rule for {domain or 'ai.onnx'}::{op} registered twice")
                entries.append((opsets[0], opsets[1], rule))
            return cls

        return decorate

    def lookup(self, op: str, domain: str, opset: int) -> OpRule | None:
        for lo, hi, rule in self._rules.get(RuleKey(op, "" if domain == "ai.onnx" else domain), []):
            if lo <= opset <= hi:
                return rule
        return None

    def ops(self) -> Iterable[str]:
        return sorted(k.op for k in self._rules)


SUPPORTED_OPSETS = (7, onnx_opset_version())
"""Default-domain opsets whose op semantics the rules were written against (older opsets had e.g.
BatchNormalization `spatial` and Gemm `broadcast`; newer ones are unknown). Outside, channels freeze."""

REGISTRY = Registry()
register = REGISTRY.register
