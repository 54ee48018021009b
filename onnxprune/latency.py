"""Latency tables: measured ONNX Runtime latency of each prunable layer at candidate channel counts.

Fewer MACs do not always mean less time: ONNX Runtime's CPU kernels work on blocks of channels
(8 or 16 wide), so latency is a staircase in the channel count, and an odd count can be slower
than the next block-aligned one. A table records, per weight layer (Conv, Gemm, MatMul with a
constant weight) and per prunable axis (its output and input channels), the latency of the layer
alone (fastest of N runs; thread CPU time with one thread, see `clock_for`) at a grid of channel
counts, the others at full size. Planning then reads the table:

- `auto_count` picks, for a planned count, the largest measured count that costs no more time:
  the count just below the next latency step;
- `LatencyTable.estimate` predicts the model's latency for given per-group counts (each layer
  scaled by its measured curves), which `latency_plan` drives to a target fraction.

Every figure carries the ORT version, execution provider and thread count it was measured with,
and the table records ORT's NCHWc channel block on the machine (`layout_block`, read from ORT's
optimized graph): ORT pads a Conv's output channels to the block, while a Conv fed fewer
channels than the block (or a count that is not a multiple of 4) stays in plain NCHW, so the
blocked layout breaks there and reorder nodes appear in the whole model, which a layer timed
alone does not show. Conv groups are therefore measured (and rounded) on multiples of the block
and never below it.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxprune.errors import InputError
from onnxprune.passes.dependency import Analysis, ChannelGroup
from onnxprune.plan import GroupPlan, Plan, Rounding, keep_count, normalise_scores, planned_units, round_up
from onnxprune.verify import clock_for, random_inputs, session

TABLE_FORMAT = "onnxprune-latency-table"
TABLE_VERSION = 1
PROVIDER = "CPUExecutionProvider"
BLOCK = 8
"""Grid step for candidate counts: the narrowest channel block of ORT's CPU kernels."""
MAX_POINTS = 24
NCHWC_DOMAIN = "com.microsoft.nchwc"
PLATEAU_TOLERANCE = 0.05
"""Relative latency difference below which two counts count as one step (measurement noise)."""


@dataclass
class AxisCurve:
    """Latency of one layer with one axis at `counts` channels of `group` (others at full size)."""

    group: str
    counts: list[int]
    ms: list[float]

    def at(self, count: int) -> float:
        """Latency at `count`: a count between grid points costs what the next grid point does."""
        index = int(np.searchsorted(self.counts, count))
        return self.ms[min(index, len(self.ms) - 1)]


@dataclass
class LayerLatency:
    node: str
    op: str
    full_ms: float
    curves: dict[str, AxisCurve] = field(default_factory=dict)
    """'out' / 'in': the layer's output and input channel axes that belong to a prunable group."""


@dataclass
class LatencyTable:
    provider: str
    threads: int
    ort_version: str
    machine: str
    model_ms: float
    """Whole-model latency (fastest run), same settings."""
    layers: list[LayerLatency] = field(default_factory=list)
    runs: int = 20
    clock: str = "thread CPU time"
    layout_block: int | None = None
    """ORT's NCHWc channel block for Conv on the machine; None: no blocked layout (or an old table)."""

    @property
    def setting(self) -> str:
        block = "" if self.layout_block is None else f", NCHWc block {self.layout_block}"
        return f"ORT {self.ort_version}, {self.provider}, {self.threads} thread(s), {self.clock}{block}"

    def group_curve(self, key: str) -> tuple[list[int], list[float]] | None:
        """Summed latency of every layer axis in group `key`, per candidate count."""
        curves = [c for layer in self.layers for c in layer.curves.values() if c.group == key]
        if not curves:
            return None
        counts = sorted(set(curves[0].counts).intersection(*(c.counts for c in curves[1:])))
        return counts, [sum(c.at(n) for c in curves) for n in counts]

    def estimate(self, keep: dict[str, int]) -> float:
        """Predicted model latency (ms) with group `key` at `keep[key]` channels (others full).

        Each layer's time is scaled by the measured ratio of each of its pruned axes; the time
        outside the measured layers stays as it is.
        """
        total = self.model_ms
        for layer in self.layers:
            total += self.layer_ms(layer, keep) - layer.full_ms
        return total

    def layer_ms(self, layer: LayerLatency, keep: dict[str, int]) -> float:
        scale = 1.0
        for curve in layer.curves.values():
            if curve.group in keep and layer.full_ms > 0:
                scale *= curve.at(keep[curve.group]) / layer.full_ms
        return layer.full_ms * scale

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, **asdict(self)}

    def save(self, path: "str | Path") -> None:
        from onnxprune.ir import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "LatencyTable":
        from onnxprune.ir import check_document

        check_document(data, TABLE_FORMAT, TABLE_VERSION, "latency table")
        try:
            layers = [LayerLatency(entry["node"], entry["op"], float(entry["full_ms"]),
                                   {axis: _curve(c) for axis, c in entry["curves"].items()})
                      for entry in data["layers"]]
            block = data.get("layout_block")
            return cls(str(data["provider"]), int(data["threads"]), str(data["ort_version"]), str(data["machine"]),
                       float(data["model_ms"]), layers, int(data.get("runs", 20)), str(data.get("clock", "")),
                       None if block is None else _positive(block))
        except (KeyError, TypeError, ValueError):
            raise InputError("latency table has a malformed entry") from None

    @classmethod
    def load(cls, path: "str | Path") -> "LatencyTable":
        from onnxprune.ir import read_json

        return cls.from_json(read_json(path, "latency table"))


def _positive(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return value


def _curve(data: dict) -> AxisCurve:
    return AxisCurve(str(data["group"]), [int(n) for n in data["counts"]], [float(m) for m in data["ms"]])


# --- measuring ---------------------------------------------------------------------------------

@dataclass
class _Layer:
    """A weight layer and, per axis role, the group its channels belong to."""

    node: gs.Node
    axes: dict[str, tuple[ChannelGroup, int]]
    """'out' / 'in' -> (group, elements of the weight axis per channel of the group)."""


_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def weight_layers(analysis: Analysis) -> list[_Layer]:
    """Conv / Gemm / MatMul nodes with a constant weight whose channel axes a prunable group owns."""
    owner: dict[tuple[str, int], list[tuple[ChannelGroup, int]]] = {}
    for group in analysis.prunable:
        for member in group.members:
            owner.setdefault(member.slot, []).append((group, len(member.elem)))
    layers = []
    for node in analysis.graph.nodes:
        axes = _weight_axes(node)
        if axes is None:
            continue
        found = {}
        for role, axis in axes.items():
            owners = owner.get((node.inputs[1].name, axis), [])
            size = node.inputs[1].shape[axis]
            if len(owners) == 1 and owners[0][1] == size and size % owners[0][0].size == 0:
                found[role] = (owners[0][0], size // owners[0][0].size)
        if found:
            layers.append(_Layer(node, found))
    return layers


def _weight_axes(node: gs.Node) -> dict[str, int] | None:
    """Weight axes holding output and input channels, or None for layers we do not time."""
    if node.op not in _WEIGHT_OPS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    rank = len(node.inputs[1].shape)
    if node.op == "Conv":
        group = node.attrs.get("group", 1)
        if rank < 3 or (group != 1 and node.inputs[1].shape[1] != 1):
            return None  # grouped but not depthwise: channel counts are tied to the group count
        return {"out": 0} if group != 1 else {"out": 0, "in": 1}
    if rank != 2 or isinstance(node.inputs[0], gs.Constant):
        return None
    if node.op == "Gemm":
        trans = node.attrs.get("transB", 0)
        return {"out": 0 if trans else 1, "in": 1 if trans else 0}
    return {"out": 1, "in": 0}


def candidate_counts(size: int, max_points: int = MAX_POINTS, unit: int = 1, block: int = BLOCK,
                     least: int = 1) -> list[int]:
    """Block-aligned counts up to `size` (and `size` itself), at most about `max_points`.

    `unit` is how many weight rows one channel spans (64 for an attention head): alignment is
    about rows, so with 8 | unit every count is aligned. `least` is the smallest count offered
    when `size` reaches it (a Conv group's layout block: fewer channels break the blocked layout).
    """
    block = block // math.gcd(block, unit)
    if size <= block:
        return list(range(least if size >= least else 1, size + 1))
    step = block * max(1, math.ceil(size / block / max_points))
    return sorted(set(range(step, size, step)) | {size})


def measure_table(model: onnx.ModelProto, analysis: Analysis, threads: int = 1, runs: int = 20,
                  max_points: int = MAX_POINTS, progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Time every prunable weight layer of `model` alone at each candidate count, and the model."""
    import onnxruntime as ort


    whole = _fastest_ms(session(model, optimize=True, threads=threads), random_inputs(model), runs, threads)
    machine = f"{platform.machine()} {platform.processor()}".strip()
    table = LatencyTable(PROVIDER, threads, ort.__version__, machine, whole, runs=runs, clock=clock_for(threads)[0],
                         layout_block=layout_block())
    rng = np.random.default_rng(0)
    layers = weight_layers(analysis)
    grids = _grids(layers, max_points, table.layout_block)
    for layer in layers:
        full = _time_layer(layer.node, {}, threads, runs, rng)
        if full is None:
            continue
        entry = LayerLatency(layer.node.name, layer.node.op, full)
        for role, (group, per_unit) in layer.axes.items():
            counts = grids[group.key]
            ms = [full if n == group.size else _time_layer(layer.node, {role: n * per_unit}, threads, runs, rng)
                  for n in counts]
            if all(m is not None for m in ms):
                entry.curves[role] = AxisCurve(group.key, counts, ms)
        table.layers.append(entry)
        if progress is not None:
            progress(f"{layer.node.op} {layer.node.name}: {full:.3f} ms")
    return table


def _grids(layers: list[_Layer], max_points: int, layout: int | None) -> dict[str, list[int]]:
    """One grid of candidate counts per group, so that its layers' curves line up. Groups with a
    Conv layer use ORT's layout block (when there is one) as the step and the least count."""
    units: dict[str, int] = {}
    convs: set[str] = set()
    sizes: dict[str, int] = {}
    for layer in layers:
        for group, per_unit in layer.axes.values():
            units[group.key] = math.gcd(units.get(group.key, 0), per_unit)
            sizes[group.key] = group.size
            if layer.node.op == "Conv":
                convs.add(group.key)
    grids = {}
    for key, size in sizes.items():
        if layout is not None and key in convs:
            grids[key] = candidate_counts(size, max_points, units[key], math.lcm(layout, BLOCK), layout)
        else:
            grids[key] = candidate_counts(size, max_points, units[key])
    return grids


def layout_block() -> int | None:
    """ORT's NCHWc channel block on this machine, read from what ORT does rather than CPU flags:
    a one-output-channel Conv, optimised with the blocked layout, gets its weight padded to one
    block. None when ORT leaves the Conv in plain NCHW (no blocked kernels here) or cannot write
    its optimized graph: the table then falls back to the plain grid of 8, as tables did before."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal([1, 64, 1, 1]).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=[PROVIDER])
            optimized = onnx.load(opts.optimized_model_filepath)
        except Exception:  # noqa: BLE001 - no readable optimized graph: no layout block known
            return None
    dims = {t.name: list(t.dims) for t in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.op_type == "Conv" and node.domain == NCHWC_DOMAIN and node.input[1] in dims:
            return int(dims[node.input[1]][0])
    return None


def _time_layer(node: gs.Node, dims: dict[str, int], threads: int, runs: int, rng) -> float | None:
    """Latency (fastest run) of `node` alone with its output ('out') / input ('in') channels set."""
    built = _single_node(node, dims, rng)
    if built is None:
        return None
    model, feeds = built
    try:
        return _fastest_ms(session(model, optimize=True, threads=threads), feeds, runs, threads)
    except Exception:  # noqa: BLE001 - a layer ORT cannot run alone is left out of the table
        return None


def _static(shape) -> list[int] | None:
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]


def _single_node(node: gs.Node, dims: dict[str, int], rng) -> tuple[onnx.ModelProto, dict] | None:
    """A one-node model of `node` with the given channel counts, and an input for it."""
    x_shape, w_shape = _static(node.inputs[0].shape), list(node.inputs[1].shape)
    if x_shape is None:
        return None
    attrs = dict(node.attrs)
    axes = _weight_axes(node)
    depthwise = node.op == "Conv" and attrs.get("group", 1) != 1
    if "out" in dims:
        w_shape[axes["out"]] = dims["out"]
        if depthwise:
            x_shape[1] = attrs["group"] = dims["out"]
    if "in" in dims:
        w_shape[axes["in"]] = dims["in"]
        if node.op == "Conv":
            x_shape[1] = dims["in"]
        elif node.op == "Gemm" and attrs.get("transA", 0):
            x_shape[0] = dims["in"]
        else:
            x_shape[-1] = dims["in"]
    dtype = _np_dtype(node.inputs[1].dtype)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(w_shape).astype(dtype), "w")]
    inputs = ["x", "w"]
    if len(node.inputs) > 2 and node.inputs[2].name:
        out = w_shape[axes["out"]]
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal([out]).astype(dtype), "b"))
        inputs.append("b")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node(node.op, inputs, ["y"], **attrs)], "layer",
                              [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": rng.standard_normal(x_shape).astype(dtype)}


def _np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, (int, np.integer)):
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(dtype)))
    return np.dtype(dtype)


def _fastest_ms(session, feeds: dict, runs: int, threads: int) -> float:
    """The fastest of `runs` timed runs after a warm-up: disturbances only ever add time."""
    clock = clock_for(threads)[1]
    for _ in range(max(2, runs // 5)):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = clock()
        session.run(None, feeds)
        times.append((clock() - start) * 1e3)
    return float(min(times))


def compare_latency(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, threads: int = 1,
                    runs: int = 30, turn: int = 1) -> tuple[float, float]:
    """Fastest-run latency (ms) of two models, runs interleaved, same settings as the tables.

    With `turn` 1 the models alternate run by run, so each run starts with the caches holding the
    other model's weights and activations. With `turn` > 1 each model gets turns of one untimed and
    `turn` timed runs in a row: the steady state of a model served on its own, which is what the
    tables measure; the turns still alternate, so drift on a shared machine hits both alike.
    """
    if turn < 1:
        raise ValueError(f"turn must be >= 1, got {turn}")
    sessions = [session(m, optimize=True, threads=threads) for m in (original, pruned)]
    for s in sessions:
        for _ in range(max(2, runs // 5)):
            s.run(None, feeds)
    clock = clock_for(threads)[1]
    best = [float("inf"), float("inf")]
    for _ in range(math.ceil(runs / turn)):
        for k, s in enumerate(sessions):
            if turn > 1:
                s.run(None, feeds)
            for _ in range(turn):
                start = clock()
                s.run(None, feeds)
                best[k] = min(best[k], (clock() - start) * 1e3)
    return best[0], best[1]


# --- planning ----------------------------------------------------------------------------------

def auto_count(counts: list[int], ms: list[float], planned: int, tolerance: float = PLATEAU_TOLERANCE) -> int:
    """The largest measured count that costs no more than `planned` channels do (within noise).

    `planned` first rounds up to the grid (a partial block costs a whole one); from there the
    count grows while the latency stays on the same step, so it ends just below the next step.
    """
    j = min(int(np.searchsorted(counts, planned)), len(counts) - 1)
    limit = ms[j] * (1 + tolerance)
    while j + 1 < len(counts) and ms[j + 1] <= limit:
        j += 1
    return counts[j]


def round_plan(analysis: Analysis, scores: dict[int, np.ndarray], plan: Plan, table: LatencyTable) -> Plan:
    """`plan` with each group's kept count moved to `auto_count` of its latency curve.

    Groups without measured layers keep their planned count; the removed channels are again the
    lowest-scored ones.
    """
    by_key = {g.key: g for g in analysis.groups}
    rnd = table_rounding(table, lambda group, keep: keep)
    out = Plan()
    for entry in plan.groups:
        group = by_key.get(entry.key)
        if group is None or not entry.remove:
            out.groups.append(entry)
            continue
        keep = rnd(group, group.size - len(entry.remove))
        out.groups.append(GroupPlan(entry.key, group.size, planned_units(group, scores[group.id], keep)))
    return out


def conv_group_keys(analysis: Analysis) -> set[str]:
    """Groups whose channels are a Conv's output or input channels (depthwise included): the
    groups ORT's blocked NCHWc layout applies to."""
    return {group.key for layer in weight_layers(analysis) if layer.node.op == "Conv"
            for group, _ in layer.axes.values()}


def block_rounding(analysis: Analysis, block: int) -> Rounding:
    """Kept counts of Conv groups rounded up to multiples of `block` (ORT's NCHWc block), never
    below one block; groups no larger than the block keep exact counts (they are outside the
    blocked layout before pruning already). Other groups (MatMul/Gemm neurons, attention heads,
    recurrent units) keep exact counts: MLAS GEMM has no channel staircase (docs/performance.md)."""
    convs = conv_group_keys(analysis)
    return lambda group, keep: round_up(group.size, keep, block) if group.key in convs else min(group.size, keep)


def table_rounding(table: LatencyTable, fallback: Rounding) -> Rounding:
    """Kept counts moved to the top of their measured latency step (`auto_count`); groups the
    table has no curve for are rounded by `fallback`."""
    curves = {}

    def rnd(group: ChannelGroup, keep: int) -> int:
        if group.key not in curves:
            curves[group.key] = table.group_curve(group.key)
        curve = curves[group.key]
        return fallback(group, keep) if curve is None else min(group.size, auto_count(*curve, planned=keep))
    return rnd


def latency_plan(analysis: Analysis, scores: dict[int, np.ndarray], table: LatencyTable, target: float,
                 max_ratio: float = 0.9) -> tuple[Plan, float]:
    """Remove the least important channels per unit of measured latency saved until the estimated
    latency is at most `target` x the full model's. Returns the plan and the estimated ratio.

    Greedy over block steps: each round, every group offers its next lower count that saves time;
    the one losing the least (mean-normalised) importance per millisecond saved is taken.
    """
    if not 0.0 < target <= 1.0:
        raise InputError(f"target_latency must be in (0, 1], got {target}")
    curves = {g.key: table.group_curve(g.key) for g in analysis.prunable}
    groups = [g for g in analysis.prunable if curves[g.key] is not None]
    keep = {g.key: g.size for g in groups}
    full = table.estimate(keep)
    cost = {g.key: np.concatenate([[0.0], np.cumsum(np.sort(normalise_scores(scores[g.id])))])
            for g in groups}
    floor = {g.key: keep_count(g.size, max_ratio) for g in groups}
    layers_of = {g.key: [l for l in table.layers if any(c.group == g.key for c in l.curves.values())] for g in groups}
    now = full
    while now > target * full:
        best = None
        for g in groups:
            step = _next_step(g.key, curves[g.key][0], keep, floor[g.key], layers_of[g.key], table)
            if step is None:
                continue
            count, saved = step
            lost = cost[g.key][g.size - count] - cost[g.key][g.size - keep[g.key]]
            value = lost / saved
            if best is None or value < best[0]:
                best = (value, g.key, count, saved)
        if best is None:
            break
        keep[best[1]] = best[2]
        now -= best[3]
    plan = Plan([GroupPlan(g.key, g.size, planned_units(g, scores[g.id], keep[g.key])) for g in groups])
    return plan, now / full


def _next_step(key: str, counts: list[int], keep: dict[str, int], floor: int, layers: list[LayerLatency],
               table: LatencyTable) -> tuple[int, float] | None:
    """The next lower grid count of group `key` that saves time, and the milliseconds it saves."""
    current = keep[key]
    before = sum(table.layer_ms(l, keep) for l in layers)
    for count in reversed([c for c in counts if floor <= c < current]):
        trial = {**keep, key: count}
        saved = before - sum(table.layer_ms(l, trial) for l in layers)
        if saved > 1e-6:
            return count, saved
    return None


def table_for(model: onnx.ModelProto, analysis: Analysis, path: "str | Path | None" = None,
              threads: int = 1) -> LatencyTable:
    """The table saved at `path` (checked against the model), or one measured now."""
    if path is None:
        return measure_table(model, analysis, threads)
    table = LatencyTable.load(path)
    keys = {c.group for layer in table.layers for c in layer.curves.values()}
    if analysis.prunable and not keys & {g.key for g in analysis.prunable}:
        raise InputError(f"{path}: latency table was measured on another model (no group of this one in it)")
    return table
