"""Pin down dims that symbolic shape inference leaves unknown.

Exporters with dynamic batch/sequence axes compute reshape targets at run time
(Shape -> Gather -> Unsqueeze -> Concat, often with a -1), so symbolic inference calls the head
count of `[B, S, -1, D]` a fresh unknown symbol. Inferring twice more with two different concrete
sizes for every dynamic input dim settles it: a dim with the same value in both runs does not
depend on the dynamic sizes, so it is that constant; one that differs stays symbolic. Where shape
inference cannot follow the arithmetic at all (masks built by Where/Equal/Expand chains), the two
probes are run in ONNX Runtime on neutral inputs (zeros) and the observed shapes are used instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

_PROBES = ((3, 7, 11, 13, 17, 19, 23, 29), (5, 31, 37, 41, 43, 47, 53, 59))
"""Concrete sizes per distinct dynamic input dim, one tuple per run (distinct primes, so two
dims that merely coincide in one run do not look constant)."""


@dataclass
class ProbeRuns:
    """Shapes seen by the executed probe, per probe size set, kept by one caller for a few calls.

    The analysis infers shapes twice: at import and after constant folding. Folding only replaces
    nodes by constants holding the same values, so every tensor left has the shape the first run
    saw, and ONNX Runtime (the dominant cost of a transformer prune) need not run again. A run that
    does not cover every tensor of the later graph (a rewrite added one) is not reused.
    """

    seen: dict[tuple[int, ...], dict[str, tuple]] = field(default_factory=dict)

    def lookup(self, model: onnx.ModelProto, sizes: tuple[int, ...]) -> dict[str, tuple] | None:
        """The shapes of `model`'s node outputs from an earlier run, or None when one is missing."""
        earlier = self.seen.get(sizes)
        if earlier is None:
            return None
        names = _probed_names(model)
        if not all(name in earlier for name in names):
            return None
        return {name: earlier[name] for name in names}


def resolve_dims(skeleton: onnx.ModelProto, shapes: dict[str, tuple[int, tuple]],
                 model: onnx.ModelProto | None = None, probes: ProbeRuns | None = None,
                 inferred: onnx.ModelProto | None = None) -> dict[str, tuple[int, tuple]]:
    """`shapes` with every unknown or symbolic dim that is equal in both concrete runs made static.

    Dims named by graph-input symbols are kept symbolic whatever the runs say. `probes` keeps the
    executed runs for a later call on the same model after folding. `inferred`: the caller's
    `infer_shapes(skeleton, data_prop=True)`, which is the concrete run of a static model.
    """
    if _has_dynamic_inputs(skeleton):
        runs = [_concrete_shapes(skeleton, sizes) for sizes in _PROBES]
    else:  # static: both runs alike, and pinning changes nothing
        runs = [_concrete_shapes(skeleton, _PROBES[0], inferred)]
    sizes_used = _PROBES[:len(runs)]
    if any(run is None for run in runs):
        return shapes
    if model is not None and any(None in dims for run in runs for dims in run.values()) and _small(model):
        executed = [_executed_once(model, skeleton, sizes, probes) for sizes in sizes_used]
        if all(run is not None for run in executed):
            runs = [{**run, **seen} for run, seen in zip(runs, executed)]
    if len(runs) == 1:
        runs = runs * 2
    named = {d.dim_param for vi in skeleton.graph.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
    inputs = {(sa, sb): key for key, sa, sb in _input_symbols(skeleton)}
    symbols = dict(inputs)
    resolved = dict(shapes)
    for name, (elem, dims) in shapes.items():
        first, second = runs[0].get(name), runs[1].get(name)
        if first is None or second is None or len(first) != len(dims) or len(second) != len(dims):
            continue
        fixed = []
        for d, a, b in zip(dims, first, second):
            if (d is not None and not isinstance(d, str)) or d in named or a is None or b is None:
                fixed.append(d)
            elif a == b:
                fixed.append(a)
            else:  # the same run-time value under another name: one symbol per pair of probe values
                name_ab = symbols.get((a, b)) or _product_name(a, b, inputs)
                fixed.append(symbols.setdefault((a, b), name_ab or (d if d is not None else f"dyn_{a}_{b}")))
        resolved[name] = (elem, tuple(fixed))
    return resolved


def _product_name(a: int, b: int, symbols: dict[tuple[int, int], str]) -> str | None:
    """'4*batch*seq'-style name when the probe values are a static factor times input symbols.

    Layout rules split such names on '*', so a flattened [B*S, C] lines up with [B, S, C].
    """
    base = [(key, sa, sb) for (sa, sb), key in symbols.items()]
    for powers in itertools.product(range(3), repeat=len(base)):
        pa = pb = 1
        for (_, sa, sb), k in zip(base, powers):
            pa, pb = pa * sa ** k, pb * sb ** k
        if any(powers) and a % pa == 0 and a // pa * pb == b:
            parts = [key for (key, _, _), k in zip(base, powers) for _ in range(k)]
            return "*".join(([str(a // pa)] if a // pa != 1 else []) + parts)
    return None


def _has_dynamic_inputs(skeleton: onnx.ModelProto) -> bool:
    """Whether any graph input has a dim the probes pin; without one, both probe runs would see the
    same shapes, so a static model (a fixed-length BERT export) is probed once."""
    probe = onnx.ModelProto()
    probe.graph.input.extend(skeleton.graph.input)
    return bool(_pin_inputs(probe, _PROBES[0]))


def _input_symbols(skeleton: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """(dim name, size in probe 1, size in probe 2) of each named dynamic input dim."""
    pinned = []
    for sizes in _PROBES:
        probe = onnx.ModelProto()
        probe.graph.input.extend(skeleton.graph.input)
        pinned.append(_pin_inputs(probe, sizes))
    return [(key, pinned[0][key], pinned[1][key]) for key in pinned[0] if not key.startswith("?")]


def _pin_inputs(probe: onnx.ModelProto, sizes: tuple[int, ...]) -> dict[str, int]:
    """Set every dynamic input dim of `probe` to one of `sizes` (one size per distinct symbol)."""
    symbols: dict[str, int] = {}
    for vi in probe.graph.input:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                continue
            key = dim.dim_param or f"?{len(symbols)}"
            if key not in symbols:
                symbols[key] = sizes[len(symbols) % len(sizes)]
            dim.dim_value = symbols[key]
    return symbols


def _concrete_shapes(skeleton: onnx.ModelProto, sizes: tuple[int, ...],
                     inferred: onnx.ModelProto | None = None) -> dict[str, tuple] | None:
    """Inferred dims (int or None) with each dynamic input dim set to one of `sizes`.

    `inferred`, the data-propagating inference of a `skeleton` with no dynamic input dims, is
    reused when the skeleton has no value_info: this function would run the same inference on
    the same graph (a second inference costs as much as the first on a BERT-base export).
    """
    if inferred is None or skeleton.graph.value_info:
        inferred = _inferred_pinned(skeleton, sizes)
    if inferred is None:
        return None
    out: dict[str, tuple] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return out


def _inferred_pinned(skeleton: onnx.ModelProto, sizes: tuple[int, ...]) -> onnx.ModelProto | None:
    """Data-propagating inference of `skeleton` without value_info, dynamic input dims pinned."""
    probe = onnx.ModelProto()
    probe.CopyFrom(skeleton)
    del probe.graph.value_info[:]
    _pin_inputs(probe, sizes)  # a static model still has data-dependent dims (torch's chunk)
    try:
        return onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; symbolic shapes remain
        return None


EXECUTE_MAX_BYTES = 512 << 20
"""Models with more weight bytes are not run. The probe itself carries no weight payloads (large
float initializers become inputs fed with zeros), but ORT's run still allocates every
intermediate, which grows with the model."""

INLINE_MAX_BYTES = 1024
"""Initializers at most this large, or of a non-float type, keep their real values in the probe:
shape-carrying constants (Reshape targets, Slice bounds, Expand shapes) must compute correctly."""

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                onnx.TensorProto.DOUBLE: 8}


def _small(model: onnx.ModelProto) -> bool:
    from onnxprune.streaming import payload_size  # from dims: reading raw_data would copy it

    return sum(payload_size(t) or 4 * len(t.float_data) for t in model.graph.initializer) <= EXECUTE_MAX_BYTES


def _numel(init: onnx.TensorProto) -> int:
    numel = 1
    for dim in init.dims:
        numel *= dim
    return numel


def _stripped(init: onnx.TensorProto) -> bool:
    """Whether `init` is fed to the probe as zeros instead of its (large, float) payload."""
    size = _FLOAT_TYPES.get(init.data_type)
    return size is not None and size * _numel(init) > INLINE_MAX_BYTES


def _probe_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` without value_info whose large float initializers are graph inputs instead
    (name, type, dims only); returns it and those initializers' payload-free stubs."""
    from onnxprune.streaming import without_fields

    probe = without_fields(model, "graph")
    probe.graph.CopyFrom(without_fields(model.graph, "initializer", "value_info"))
    declared = {vi.name for vi in probe.graph.input}
    stubs = []
    for init in model.graph.initializer:
        if not _stripped(init):
            probe.graph.initializer.append(init)
            continue
        stubs.append(without_fields(init, "raw_data", "float_data", "double_data", "int32_data",
                                    "external_data", "data_location"))
        if init.name not in declared:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return probe, stubs


def _zeros(cache: dict, shape: tuple, dtype):
    """One zero array per (shape, dtype): fewer pages touched when ORT reads them."""
    import numpy as np

    key = (shape, np.dtype(dtype).str)
    if key not in cache:
        cache[key] = np.zeros(shape, dtype=dtype)
    return cache[key]


def _narrow_weight_matmuls(probe: onnx.ModelProto, stubs: list[onnx.TensorProto]) -> list[onnx.TensorProto]:
    """Make each `MatMul(x, W)` with a zero-fed 2-D weight W [K, N] read `x[..., :1] @ zeros[1, N]`.

    Same output shape, same (zero) values unless x holds inf or NaN, at 1/K of the work: a static
    BERT-base export otherwise spends most of its probe multiplying by zeros (0.2 s of MatMul at
    sequence length 128). Returns the [1, N] zero rows to feed (payload-free stubs, like `stubs`).
    """
    weights = {t.name: t for t in stubs if len(t.dims) == 2 and t.dims[0] > 0}
    rows: dict[str, onnx.TensorProto] = {}
    nodes = []
    for node in probe.graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if node.domain not in ("", "ai.onnx") or w not in weights or node.input[0] in weights:
            nodes.append(node)
            continue
        if w not in rows:
            rows[w] = onnx.TensorProto(name=f"{w}:onnxprune_row", data_type=weights[w].data_type,
                                       dims=[1, weights[w].dims[1]])
            probe.graph.input.append(onnx.helper.make_tensor_value_info(rows[w].name, rows[w].data_type, rows[w].dims))
        first = f"{node.output[0]}:onnxprune_first"
        bounds = [f"{first}_{k}" for k in ("starts", "ends", "axes")]
        for name, value in zip(bounds, (0, 1, -1)):
            probe.graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
        nodes.append(onnx.helper.make_node("Slice", [node.input[0], *bounds], [first]))
        narrow = onnx.NodeProto()
        narrow.CopyFrom(node)
        narrow.input[:] = [first, rows[w].name]
        nodes.append(narrow)
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    return list(rows.values())


def _probed_names(model: onnx.ModelProto) -> list[str]:
    """The tensors whose shapes the executed probe reports: graph outputs, then every other node
    output that is not an initializer, in node order."""
    init = {t.name for t in model.graph.initializer}
    known = [o.name for o in model.graph.output]
    taken = set(known)
    return known + [o for n in model.graph.node for o in n.output if o and o not in taken and o not in init]


def _executed_once(model: onnx.ModelProto, skeleton: onnx.ModelProto, sizes: tuple[int, ...],
                   probes: ProbeRuns | None) -> dict[str, tuple] | None:
    """`_executed_shapes`, reusing (and keeping) a run of `probes` when one covers the model."""
    if probes is not None:
        earlier = probes.lookup(model, sizes)
        if earlier is not None:
            return earlier
    run = _executed_shapes(model, skeleton, sizes)
    if probes is not None and run is not None and sizes not in probes.seen:
        probes.seen[sizes] = run
    return run


def _executed_shapes(model: onnx.ModelProto, skeleton: onnx.ModelProto, sizes: tuple[int, ...]
                     ) -> dict[str, tuple] | None:
    """Shapes of every node output observed in ONNX Runtime on zero inputs of the probe sizes.

    Large float weights are fed as zero-filled inputs: calloc'd pages that are only ever read, which
    ORT uses in place, so the probe holds no second copy of the weights. (Zeros as external
    initializers would not do: ORT copies those into its own buffers at session creation.)
    """
    import numpy as np
    import onnxruntime as ort

    probe, stubs = _probe_model(model)
    _pin_inputs(probe, sizes)
    init = {t.name for t in probe.graph.initializer} | {t.name for t in stubs}
    known = [o.name for o in probe.graph.output]
    names = known + [o for n in probe.graph.node for o in n.output if o and o not in known and o not in init]
    rows = _narrow_weight_matmuls(probe, stubs)
    plain = onnx.ModelProto()
    plain.CopyFrom(probe)  # small: no weight payloads
    plain.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names[len(known):])
    # the shape of each tensor as the output, not the tensor, taken right after its producer, so
    # ORT frees the intermediates as it goes
    del probe.graph.output[:]
    shape_of = {name: f"{name}:onnxprune_shape_{i}" for i, name in enumerate(names)}
    produced = {o for n in probe.graph.node for o in n.output}
    nodes = [onnx.helper.make_node("Shape", [name], [shape_of[name]]) for name in names if name not in produced]
    for node in probe.graph.node:
        nodes.append(node)
        nodes.extend(onnx.helper.make_node("Shape", [o], [shape_of[o]]) for o in node.output if o in shape_of)
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    probe.graph.output.extend(onnx.ValueInfoProto(name=shape_of[name]) for name in names)
    zeros: dict[tuple, np.ndarray] = {}  # ORT only reads its inputs: same-shaped weights share one
    feeds = {t.name: _zeros(zeros, tuple(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
             for t in [*stubs, *rows]}
    for vi in probe.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = np.zeros([d.dim_value for d in tt.shape.dim], dtype=dtype)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.inter_op_num_threads = 1
    # One thread that does not spin: the narrowed probe is small work, and idle pool threads
    # spinning after the run would take cores from the analysis that follows.
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4
    # DEFAULT order runs the Shape nodes last (every intermediate alive at once); this one keeps ours
    options.execution_order = getattr(ort.ExecutionOrder, "PRIORITY_BASED", options.execution_order)
    try:
        runner = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        shapes = [tuple(int(d) for d in value) for value in runner.run(None, feeds)]
    except Exception:  # noqa: BLE001 - e.g. a sequence-valued tensor Shape rejects: return them all
        try:
            runner = ort.InferenceSession(plain.SerializeToString(), options, providers=["CPUExecutionProvider"])
            shapes = [np.shape(value) for value in runner.run(None, feeds)]
            names = [o.name for o in runner.get_outputs()]
        except Exception:  # noqa: BLE001 - a model ORT cannot run keeps its inferred shapes
            return None
    # an empty dim on zero inputs may be data-dependent (NonZero): it proves nothing
    return {name: tuple(d or None for d in shape) for name, shape in zip(names, shapes)}
