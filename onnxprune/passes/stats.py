"""Statistics pass: run the model on calibration data and keep only additive aggregates.

A temporary copy of the model exposes the prunable groups' activations where weight layers read
them as extra outputs; ONNX Runtime runs it batch by batch and, per element of each slot (one channel, or
one feature of a flattened channel), sums a, |a|, a² and zeros. For every weight layer that consumes
a prunable group (Conv, Gemm, MatMul) it also sums the Gram matrix XᵀX of its input rows, augmented
with a constant 1 (Conv: input patches at a fixed, data-independent grid of positions), which is all
that least-squares reconstruction needs. Every figure is a sum, so statistics over shards merge
exactly: a data owner can compute them anywhere and hand over aggregates, never samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxprune.data import DataSource, batch_size_for, count_samples, iter_batches, model_inputs
from onnxprune.errors import InputError
from onnxprune.ir import atomic_write_bytes, nested_graphs
from onnxprune.ops import Slot
from onnxprune.ops.base import per_element
from onnxprune.passes.dependency import Analysis
from onnxprune.passes.rewrite import contraction_slots
from onnxprune.progress import progress

STATS_FORMAT = "onnxprune-stats-1"
MAX_GRAM_DIM = 4096
"""Consumers whose input rows are wider than this get no Gram (memory is quadratic in the width)."""
STATS_BATCH = 16
"""Rows per run when the batch axis is free: every exposed activation of a batch is alive at once."""
MAX_POSITIONS = 64
"""Conv patches sampled per image: a fixed grid, so shards and single runs see the same positions."""


@dataclass
class SlotStats:
    """Per-element sums over every other axis of one channel slot."""

    count: float
    sum: np.ndarray
    abs: np.ndarray
    sq: np.ndarray
    zeros: np.ndarray

    @classmethod
    def of(cls, array: np.ndarray, axis: "int | tuple[int, int]") -> "SlotStats":
        a = per_element(np.asarray(array, dtype=np.float64), axis)
        return cls(float(a.shape[1]), a.sum(1), np.abs(a).sum(1), (a * a).sum(1), (a == 0).sum(1).astype(np.float64))

    def __add__(self, other: "SlotStats") -> "SlotStats":
        return SlotStats(self.count + other.count, self.sum + other.sum, self.abs + other.abs,
                         self.sq + other.sq, self.zeros + other.zeros)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1.0)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs / max(self.count, 1.0)

    @property
    def mean_sq(self) -> np.ndarray:
        return self.sq / max(self.count, 1.0)

    @property
    def apoz(self) -> np.ndarray:
        """Average percentage of zeros: the fraction of positions where the element is exactly 0."""
        return self.zeros / max(self.count, 1.0)


@dataclass
class GramStats:
    """Σ x̃ x̃ᵀ over a consumer's input rows x̃ = [x, 1], one matrix per convolution group."""

    gram: np.ndarray
    rows: float

    def __add__(self, other: "GramStats") -> "GramStats":
        if self.gram.shape != other.gram.shape:
            raise InputError("statistics disagree on a Gram matrix shape (different settings or models)")
        return GramStats(self.gram + other.gram, self.rows + other.rows)


@dataclass
class Statistics:
    """Aggregates of one model over some data: additive, saved as a plain .npz."""

    fingerprint: str
    samples: int = 0
    slots: dict[Slot, SlotStats] = field(default_factory=dict)
    grams: dict[str, GramStats] = field(default_factory=dict)

    def mean(self, slot: Slot) -> np.ndarray | None:
        return self.slots[slot].mean if slot in self.slots else None

    def merge(self, other: "Statistics") -> "Statistics":
        """The statistics of both shards together, as one run over both would give."""
        if other.fingerprint != self.fingerprint:
            raise InputError("statistics come from different models and cannot be merged")
        slots = dict(self.slots)
        for slot, value in other.slots.items():
            slots[slot] = slots[slot] + value if slot in slots else value
        grams = dict(self.grams)
        for name, value in other.grams.items():
            grams[name] = grams[name] + value if name in grams else value
        return Statistics(self.fingerprint, self.samples + other.samples, slots, grams)

    def save(self, path: "str | os.PathLike[str]") -> None:
        arrays: dict[str, np.ndarray] = {}
        slots = list(self.slots.items())
        for k, (_, s) in enumerate(slots):
            arrays.update({f"s{k}_count": np.array(s.count), f"s{k}_sum": s.sum, f"s{k}_abs": s.abs,
                           f"s{k}_sq": s.sq, f"s{k}_zeros": s.zeros})
        grams = list(self.grams.items())
        for k, (_, g) in enumerate(grams):
            arrays[f"g{k}"] = g.gram
            arrays[f"g{k}_rows"] = np.array(g.rows)
        meta = {"format": STATS_FORMAT, "fingerprint": self.fingerprint, "samples": self.samples,
                "slots": [[t, a] for (t, a), _ in slots], "grams": [n for n, _ in grams]}
        arrays["meta"] = np.array(json.dumps(meta))
        _atomic_savez(Path(path), arrays)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Statistics":
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                if meta.get("format") != STATS_FORMAT:
                    raise InputError(f"{path}: not an onnxprune statistics file")
                slots = {(t, tuple(a) if isinstance(a, list) else int(a)):  # a paired slot's axes: a list in JSON
                         SlotStats(float(npz[f"s{k}_count"]), npz[f"s{k}_sum"], npz[f"s{k}_abs"], npz[f"s{k}_sq"],
                                   npz[f"s{k}_zeros"])
                         for k, (t, a) in enumerate(meta["slots"])}
                grams = {n: GramStats(npz[f"g{k}"], float(npz[f"g{k}_rows"])) for k, n in enumerate(meta["grams"])}
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: cannot read statistics ({type(exc).__name__}: {exc})") from None
        return cls(meta["fingerprint"], int(meta["samples"]), slots, grams)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` through `ir.atomic_write_bytes`: one atomic-write path for every output file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


FINGERPRINT_PREFIX = "w1-"
"""Marks fingerprints that cover weight values; older files (structure only) lack it."""
_SAMPLE_BYTES = 4096


def fingerprint(model: onnx.ModelProto) -> str:
    """The model's identity: nodes, wiring, weight shapes and dtypes, and a strided sample of each
    weight's bytes, so statistics of another checkpoint of the same architecture do not match.
    The sample keeps it cheap on large models (at most 4 KiB read per initializer)."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(f"{node.name}|{node.op_type}|{','.join(node.input)}|{','.join(node.output)};".encode())
    for init in model.graph.initializer:
        h.update(f"{init.name}:{list(init.dims)}:{init.data_type};".encode())
        h.update(_value_sample(init))
    return FINGERPRINT_PREFIX + h.hexdigest()[:16]


def _value_sample(init: onnx.TensorProto) -> bytes:
    """A strided sample of a tensor's bytes (its external-data reference when not loaded)."""
    if init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data:
        return "|".join(f"{e.key}={e.value}" for e in init.external_data).encode()
    raw = init.raw_data if init.raw_data else numpy_helper.to_array(init).tobytes()
    step = max(1, len(raw) // _SAMPLE_BYTES)
    return len(raw).to_bytes(8, "little") + memoryview(raw)[::step].tobytes()


def merge_files(paths: list["str | os.PathLike[str]"]) -> Statistics:
    total = Statistics.load(paths[0])
    for path in paths[1:]:
        total = total.merge(Statistics.load(path))
    return total


# --- collection -------------------------------------------------------------------------------

def stat_slots(analysis: Analysis) -> list[Slot]:
    """Run-time channel slots of the prunable groups where weight layers read them (what criteria and
    recovery use); all of a group's activations only when no weight layer reads it. Fewer exposed
    tensors keep the per-batch memory of the statistics run close to inference."""
    io = {t.name for t in analysis.graph.inputs}
    tensors = analysis.graph.tensors()
    read = set(contraction_slots(analysis))
    slots: set[Slot] = set()
    for group in analysis.prunable:
        runtime = [m.slot for m in group.members if m.role == "activation" and m.slot[0] not in io
                   and m.slot[0] in tensors and not isinstance(tensors[m.slot[0]], gs.Constant)]
        slots.update([s for s in runtime if s in read] or runtime)
    return sorted(slots)


def consumers(analysis: Analysis) -> dict[str, "RowSource"]:
    """Weight layers reading a prunable group, with how to turn their input into Gram rows."""
    prunable = {m.slot for g in analysis.prunable for m in g.members}
    outer = {id(n) for n in analysis.graph.nodes}  # a Loop body's inputs cannot be exposed as outputs
    found = {}
    for slot, nodes in contraction_slots(analysis).items():
        if slot not in prunable:
            continue
        for node in nodes:
            if id(node) not in outer:
                continue
            source = RowSource.of(analysis.view(node))
            if source is not None and source.width + 1 <= MAX_GRAM_DIM:
                found[node.name] = source
    return found


@dataclass
class RowSource:
    """How a consumer's input tensor becomes rows x (one per output position and group)."""

    node: str
    op: str
    input: str
    width: int
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    trans_a: bool = False

    @classmethod
    def of(cls, v) -> "RowSource | None":
        w = v.const(v.inp(1))
        if w is None:
            return None
        if v.op == "Conv":
            nd = w.ndim - 2
            auto_pad = v.attr("auto_pad", "NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            return cls(v.name, "Conv", v.inputs[0], int(np.prod(w.shape[1:])), int(v.attr("group", 1)),
                       tuple(w.shape[2:]), tuple(v.attr("strides", [1] * nd)), tuple(v.attr("dilations", [1] * nd)),
                       tuple(v.attr("pads", [0] * 2 * nd)), auto_pad)
        if v.op == "Gemm":
            axis = 0 if v.attr("transB", 0) else 1
            return cls(v.name, "Gemm", v.inputs[0], int(w.shape[1 - axis]), trans_a=bool(v.attr("transA", 0)))
        if v.op == "MatMul" and w.ndim == 2:
            return cls(v.name, "MatMul", v.inputs[0], int(w.shape[0]))
        return None

    def rows(self, x: np.ndarray) -> np.ndarray:
        """[groups, rows, width] input rows for this batch."""
        x = np.asarray(x, dtype=np.float64)
        if self.op == "Gemm":
            return (x.T if self.trans_a else x)[None]
        if self.op == "MatMul":
            return x.reshape(-1, x.shape[-1])[None]
        return conv_patches(x, self)


def conv_patches(x: np.ndarray, src: RowSource) -> np.ndarray:
    """Input patches of a Conv at a fixed grid of output positions: [groups, N·P, cin/g·prod(k)]."""
    nd = len(src.kernel)
    spatial = x.shape[2:]
    span = [(k - 1) * d + 1 for k, d in zip(src.kernel, src.dilations)]
    pads = list(src.pads) if src.auto_pad == "NOTSET" else [0] * 2 * nd
    if src.auto_pad.startswith("SAME"):
        for i in range(nd):
            total = max((-(-spatial[i] // src.strides[i]) - 1) * src.strides[i] + span[i] - spatial[i], 0)
            lo = total // 2 if src.auto_pad == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + nd] = lo, total - lo
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in src.strides) \
        + tuple(slice(None, None, d) for d in src.dilations)
    win = win[index]  # [N, C, *out, *kernel]
    n, c = win.shape[:2]
    win = np.moveaxis(win.reshape(n, c, -1, int(np.prod(src.kernel))), 2, 1)  # [N, P, C, K]
    positions = win.shape[1]
    if positions > MAX_POSITIONS:
        win = win[:, np.linspace(0, positions - 1, MAX_POSITIONS).round().astype(int)]
    g = src.groups
    per = c // g
    rows = win.reshape(n * win.shape[1], g, per * win.shape[3])
    return np.ascontiguousarray(rows.transpose(1, 0, 2))


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model whose graph outputs also include `names`."""
    from onnxprune.ir import infer_shapes

    shapes = infer_shapes(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            elem = shapes.get(name, (onnx.TensorProto.FLOAT, None))[0] or onnx.TensorProto.FLOAT
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            present.add(name)
    return copy


def outputs_only(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model whose graph outputs are `names` and nothing else, with only the nodes
    they depend on: a layer-by-layer pass then runs the layers up to the one it reads, not the
    whole graph. Graph inputs all stay (callers feed every input); unused initializers go."""
    cut = expose_outputs(model, names)  # already a copy: trimmed in place, weights not copied again
    graph, wanted, needed = cut.graph, set(names), set()
    for k in reversed(range(len(graph.node))):
        if wanted.intersection(graph.node[k].output):
            needed.add(k)
            wanted.update(_reads(graph.node[k]))
    made = {name for k in needed for name in graph.node[k].output}
    inputs = {i.name for i in graph.input}
    _keep_only(graph.node, lambda k, _: k in needed)
    _keep_only(graph.value_info, lambda _, v: v.name in made)
    _keep_only(graph.initializer, lambda _, t: t.name in wanted or t.name in inputs)
    _keep_only(graph.output, lambda _, o: o.name in names)
    return cut


def _keep_only(field, keep) -> None:
    """Delete, in place, the items of a repeated protobuf field for which `keep(index, item)` is false."""
    for k in reversed(range(len(field))):
        if not keep(k, field[k]):
            del field[k]


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name `node` reads: its inputs and, through If/Loop/Scan bodies at any depth, the
    outer-scope names its subgraphs use (an over-approximation: names a body defines count too)."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
            names.update(name for g in (sub, *nested_graphs(sub)) for inner in g.node for name in inner.input)
    return names - {""}


@dataclass
class Recipe:
    """What a statistics run exposes and sums: small and picklable, so a worker on another machine
    can accumulate shards with only the model and this (no analysis there)."""

    fingerprint: str
    inputs: list[str]
    slots: list[Slot]
    sources: dict[str, RowSource]
    batch_size: int

    @classmethod
    def of(cls, model: onnx.ModelProto, analysis: Analysis, grams: bool = True,
           batch_size: int | None = None) -> "Recipe":
        return cls(fingerprint(model), model_inputs(model), stat_slots(analysis),
                   consumers(analysis) if grams else {}, batch_size or batch_size_for(model, STATS_BATCH))

    @property
    def exposed(self) -> list[str]:
        return sorted({s[0] for s in self.slots} | {s.input for s in self.sources.values()})


class Accumulator:
    """One ONNX Runtime session adding batches into a `Statistics`."""

    def __init__(self, model: onnx.ModelProto, recipe: Recipe) -> None:
        from onnxprune.verify import session

        self.recipe = recipe
        self.names = recipe.exposed  # once: every batch reads the same outputs
        self.session = session(expose_outputs(model, self.names))

    def add(self, stats: Statistics, batch: dict[str, np.ndarray]) -> None:
        try:
            values = dict(zip(self.names, self.session.run(self.names, batch)))
        except Exception as exc:  # ORT raises its own types for wrong shapes or dtypes
            raise InputError(f"data does not fit the model: {str(exc).splitlines()[0][:300]}") from None
        _accumulate(stats, values, self.recipe.slots, self.recipe.sources)
        stats.samples += int(np.shape(next(iter(batch.values())))[0]) if batch else 0


def collect(model: onnx.ModelProto, analysis: Analysis, data: DataSource, *, grams: bool = True,
            batch_size: int | None = None, limit: int | None = None, quiet: bool = False) -> Statistics:
    """Run the model over `data` and accumulate the statistics of every prunable group."""
    recipe = Recipe.of(model, analysis, grams, batch_size)
    accumulator = Accumulator(model, recipe)
    stats = Statistics(recipe.fingerprint)
    total, size = count_samples(data, recipe.inputs), recipe.batch_size
    batches = iter_batches(data, recipe.inputs, size, limit=limit)
    for batch in progress(batches, "statistics", quiet, unit="batch", total=None if total is None else -(-total // size)):
        accumulator.add(stats, batch)
    if stats.samples == 0:
        raise InputError("no calibration samples were read from the data")
    return stats


def augment(rows: np.ndarray) -> np.ndarray:
    """Rows x with a constant 1 appended, x̃ = [x, 1]: the bias is one more weight to fit."""
    return np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)


def _accumulate(stats: Statistics, values: dict[str, np.ndarray], slots: list[Slot],
                sources: dict[str, RowSource]) -> None:
    for slot in slots:
        part = SlotStats.of(values[slot[0]], slot[1])
        stats.slots[slot] = stats.slots[slot] + part if slot in stats.slots else part
    for name, src in sources.items():
        rows = src.rows(values[src.input])
        aug = augment(rows)
        part = GramStats(np.matmul(aug.transpose(0, 2, 1), aug), float(rows.shape[1]))
        stats.grams[name] = stats.grams[name] + part if name in stats.grams else part


def check_matches(stats: Statistics, model: onnx.ModelProto) -> None:
    """Refuse statistics of another model, or of another checkpoint of the same architecture."""
    if not stats.fingerprint.startswith(FINGERPRINT_PREFIX):
        raise InputError("statistics file predates weight fingerprints and cannot be checked against this "
                         "model's weights: recompute it with 'onnxprune stats'")
    if stats.fingerprint != fingerprint(model):
        raise InputError("statistics were computed on a different model or other weights (fingerprint mismatch)")
