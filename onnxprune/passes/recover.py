"""Recovery without retraining: make the layers after a pruned group absorb what it lost.

- `bias`: a removed channel's expected value times the consumer's weights for it moves into the
  consumer's bias (FLAP-style compensation; exact for constant channels). The expected values come
  from calibration statistics, or, data-free, from BatchNormalization's own parameters: the output
  of a BN is ~N(β, γ²), and after a ReLU its mean is the rectified-Gaussian mean. The rewrite pass
  does the folding (`rewrite(values=...)`), so this module only supplies the values.
- `lstsq`: each consumer (Conv of any kernel size and grouping, Gemm, MatMul) re-fits its kept input
  weights and bias so that its output on the calibration data matches the original's (He et al.
  2017, ThiNet). Ridge normal equations on the streamed Gram matrix of its input rows: the cost
  depends on the layer's input width, never on the amount of data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.ops import Slot
from onnxprune.passes.dependency import Analysis
from onnxprune.passes.rewrite import contraction_slots, node_context, removed_elements
from onnxprune.passes.stats import RowSource, Statistics, augment

RecoverMethod = Literal["none", "bias", "lstsq", "lstsq-seq"]
RECOVER_METHODS: tuple[str, ...] = get_args(RecoverMethod)
"""The recovery methods; the CLI choices and the API's type are both derived from this one list."""
RIDGE = 1e-5
"""Ridge strength relative to the mean input energy of the kept features."""

_MEAN_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
                    "Identity", "Dropout", "Squeeze", "Unsqueeze", "Transpose"}


def stats_values(analysis: Analysis, stats: Statistics) -> dict[Slot, np.ndarray]:
    """Per-element calibration means of every slot a weight layer contracts over."""
    return {slot: stats.mean(slot) for slot in contraction_slots(analysis) if stats.mean(slot) is not None}


def batchnorm_values(analysis: Analysis) -> dict[Slot, np.ndarray]:
    """Data-free expected values of contraction slots fed (through ReLU, pooling and reshapes) by a
    BatchNormalization; NaN (no compensation) where no such BN is found."""
    values: dict[Slot, np.ndarray] = {}
    slots, tensors = contraction_slots(analysis), analysis.graph.tensors()
    for group in analysis.prunable:
        by_slot = {m.slot: m for m in group.members}
        for slot in slots:
            if slot not in by_slot:
                continue
            found = _bn_source(tensors, slot[0])
            if found is None or (found[0], 1) not in by_slot:
                continue
            bn, relu = found
            unit_vals = _bn_unit_means(tensors[bn].inputs[0], by_slot[(bn, 1)], group.size, relu)
            member = by_slot[slot]
            out = values.setdefault(slot, np.full(analysis.slot_sizes[slot], np.nan))
            out[member.elem] = unit_vals[member.unit]
    return values


def _bn_source(tensors: dict[str, gs.Tensor], name: str) -> tuple[str, bool] | None:
    """(BN output tensor, whether a ReLU follows it) on the single-input path producing `name`."""
    relu = False
    while True:
        tensor = tensors.get(name)
        if tensor is None or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.op == "BatchNormalization":
            return name, relu
        if node.op == "Relu" and not relu:
            relu = True
        elif node.op not in _MEAN_PRESERVING:
            return None
        name = node.inputs[0].name


def _bn_unit_means(node: gs.Node, member, size: int, relu: bool) -> np.ndarray:
    """Expected value of each unit after the BatchNormalization `node` (β, or the rectified mean)."""
    gamma, beta = (np.asarray(node.inputs[i].values, dtype=np.float64) if isinstance(node.inputs[i], gs.Constant)
                   else None for i in (1, 2))
    unit = np.full(size, np.nan)
    if gamma is None or beta is None:
        return unit
    mu, sigma = beta[member.elem], np.abs(gamma[member.elem])
    if relu:
        mu = rectified_mean(mu, sigma)
    unit[member.unit] = mu
    return unit


def rectified_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[max(0, z)] for z ~ N(mu, sigma²): mu·Φ(mu/sigma) + sigma·φ(mu/sigma); max(mu, 0) at sigma 0."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)
    t = mu / safe
    cdf = 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in t.ravel()]).reshape(t.shape))
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    return np.where(sigma > 0, mu * cdf + sigma * pdf, np.maximum(mu, 0.0))


# --- least squares -----------------------------------------------------------------------------

@dataclass
class Fit:
    """A consumer's re-fitted weights: `weight` in the node's own layout for the kept inputs and all
    original outputs, `bias` per original output; rows of removed outputs are dropped on apply."""

    node: str
    op: str
    weight: np.ndarray
    bias: np.ndarray
    kept_outputs: np.ndarray | None
    targets: list[np.ndarray] = field(default_factory=list)
    """Per input group, the original [weights; bias] as [inputs + 1, outputs]: what to reproduce."""
    source: RowSource | None = None
    """How the original consumer's input becomes rows (sequential re-fitting reads it again)."""


def lstsq_fits(analysis: Analysis, stats: Statistics, units: dict[int, np.ndarray],
               ridge: float = RIDGE) -> tuple[list[Fit], set[Slot]]:
    """Least-squares fits of every consumer of a pruned slot that has a Gram matrix.

    Returns the fits and the contraction slots they cover: a slot is covered only when every
    consumer reading it can be fitted, so each slot is recovered by one method.
    """
    removed = removed_elements(analysis, units)
    fits, covered = [], set()
    for slot, nodes in contraction_slots(analysis).items():
        gone = removed.get(slot)
        if gone is None or not len(gone) or not all(_fittable(analysis, n, stats) for n in nodes):
            continue
        for node in nodes:
            fits.append(_fit(analysis, node, stats, slot, gone, removed, ridge))
        covered.add(slot)
    return fits, covered


def _fittable(analysis: Analysis, node: gs.Node, stats: Statistics) -> bool:
    weight = node.inputs[1]
    return node.name in stats.grams and isinstance(weight, gs.Constant) and len(weight.outputs) == 1 \
        and RowSource.of(analysis.view(node)) is not None


def _solve(gram: np.ndarray, rows: float, keep: np.ndarray, target: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_θ E‖x̃[keep]·θ - x̃·target‖² + λ‖θ_weights‖², x̃ = [x, 1], from Σ x̃x̃ᵀ."""
    c = gram / max(rows, 1.0)
    idx = np.append(keep, c.shape[0] - 1)
    return _solve_cross(c[np.ix_(idx, idx)], c[idx], target, ridge)


def _fit(analysis: Analysis, node: gs.Node, stats: Statistics, slot: Slot, gone: np.ndarray,
         removed: dict[Slot, np.ndarray], ridge: float) -> Fit:
    view = analysis.view(node)
    src = RowSource.of(view)
    gram = stats.grams[node.name]
    w = np.asarray(node.inputs[1].values, dtype=np.float64)
    bias_in = view.const(view.inp(2)) if node.op in ("Conv", "Gemm") else None
    if node.op == "Conv":
        return _fit_conv(node, src, gram, w, bias_in, gone, removed, ridge)
    if node.op == "Gemm":
        trans_b, alpha, beta = view.attr("transB", 0), view.attr("alpha", 1.0), view.attr("beta", 1.0)
        mat = (w.T if trans_b else w) * alpha  # [in, out]
        bias = np.zeros(mat.shape[1]) if bias_in is None else \
            beta * np.broadcast_to(bias_in.astype(np.float64), (1, mat.shape[1]))[-1]
        out_slot = (node.outputs[0].name, 1)
    else:
        mat, bias = w, np.zeros(w.shape[1])
        out_slot = (node.outputs[0].name, view.rank(node.outputs[0].name) - 1)
    keep = np.setdiff1d(np.arange(mat.shape[0]), gone)
    target = np.vstack([mat, bias[None]])
    theta = _solve(gram.gram[0], gram.rows, keep, target, ridge)
    return Fit(node.name, node.op, theta[:-1], theta[-1], _kept(analysis, out_slot, removed), [target], src)


def _fit_conv(node, src: RowSource, gram, w, bias_in, gone, removed, ridge) -> Fit:
    cout, a = w.shape[0], w.shape[1]
    k = int(np.prod(w.shape[2:]))
    g = src.groups
    per_out = cout // g
    dropped_cols = np.unique(np.asarray(gone) % a)
    kept_cols = np.setdiff1d(np.arange(a), dropped_cols)
    keep = (kept_cols[:, None] * k + np.arange(k)[None]).ravel()
    bias = np.zeros(cout) if bias_in is None else bias_in.astype(np.float64)
    targets = [np.vstack([w[gi * per_out:(gi + 1) * per_out].reshape(per_out, -1).T,
                          bias[gi * per_out:(gi + 1) * per_out][None]]) for gi in range(g)]
    thetas = [_solve(gram.gram[gi], gram.rows, keep, targets[gi], ridge) for gi in range(g)]
    weight, new_bias = _conv_weight(thetas, w.shape[2:])
    out_slot = (node.outputs[0].name, 1)
    kept_out = None if out_slot not in removed else np.setdiff1d(np.arange(cout), removed[out_slot])
    return Fit(node.name, "Conv", weight, new_bias, kept_out, targets, src)


def _conv_weight(thetas: list[np.ndarray], kernel: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per-group solutions [kept inputs·k + 1, outputs of the group] -> Conv weight [out, in, *k], bias."""
    k = int(np.prod(kernel))
    weight = np.concatenate([t[:-1].T.reshape((t.shape[1], (t.shape[0] - 1) // k) + tuple(kernel)) for t in thetas])
    return weight, np.concatenate([t[-1] for t in thetas])


def _kept(analysis: Analysis, slot: Slot, removed: dict[Slot, np.ndarray]) -> np.ndarray | None:
    if slot not in removed:
        return None
    return np.setdiff1d(np.arange(analysis.slot_sizes[slot]), removed[slot])


def apply_fits(graph: gs.Graph, fits: list[Fit]) -> int:
    """Write fitted weights and biases into the rewritten graph (private constants per node)."""
    nodes = {n.name: n for n in graph.nodes}
    names = set(graph.tensors())

    def unique(base: str) -> str:
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    def fresh(base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(unique(base), np.ascontiguousarray(value))

    for fit in fits:
        node = nodes[fit.node]
        with node_context(node):
            _apply_fit(graph, node, fit, unique, fresh)
    return len(fits)


def _apply_fit(graph: gs.Graph, node: gs.Node, fit: Fit, unique: Callable[[str], str],
               fresh: Callable[[str, np.ndarray], gs.Constant]) -> None:
    """Write one fit into its node (split out so failures name the node via `node_context`)."""
    dtype = np.asarray(node.inputs[1].values).dtype
    weight, bias = fit.weight, fit.bias
    if fit.kept_outputs is not None:
        axis = 0 if fit.op == "Conv" else 1
        weight, bias = np.take(weight, fit.kept_outputs, axis=axis), bias[fit.kept_outputs]
    if fit.op == "Gemm":
        weight = weight.T if node.attrs.get("transB", 0) else weight
        node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
    node.inputs[1] = fresh(f"{node.name}_weight_fit", weight.astype(dtype))
    if fit.op in ("Conv", "Gemm"):
        while len(node.inputs) < 3:
            node.inputs.append(gs.Variable.empty())
        node.inputs[2] = fresh(f"{node.name}_bias_fit", bias.astype(dtype))
    elif _bias_add(node) is not None:  # re-fitted before (sequential): update its bias
        _bias_add(node).inputs[1] = fresh(f"{node.name}_bias_fit", bias.astype(dtype))
    elif np.any(bias != 0):
        out = node.outputs[0]
        mid = gs.Variable(unique(f"{out.name}_nobias"), dtype=out.dtype)
        node.outputs[0] = mid
        graph.nodes.append(gs.Node("Add", f"{node.name}_bias_fit_add",
                                   inputs=[mid, fresh(f"{node.name}_bias_fit", bias.astype(dtype))],
                                   outputs=[out]))


def _bias_add(node: gs.Node) -> gs.Node | None:
    """The Add that an earlier fit inserted after a MatMul, if any."""
    users = node.outputs[0].outputs
    return users[0] if len(users) == 1 and users[0].name == f"{node.name}_bias_fit_add" else None


def sequential_refit(graph: gs.Graph, original: onnx.ModelProto, fits: list[Fit], data, ridge: float = RIDGE,
                     quiet: bool = False) -> int:
    """Re-fit each consumer in graph order on the *pruned* model's inputs to it (the inputs it will
    see), against the original model's outputs: later layers also absorb what earlier fits could not.

    One pass over `data` per consumer, through the layers up to it only; memory is the consumer's
    Gram matrices, as for `lstsq`.
    """
    from onnxprune.data import batch_size_for, iter_batches, model_inputs
    from onnxprune.ir import opset_version
    from onnxprune.ops import NodeView
    from onnxprune.passes.stats import outputs_only
    from onnxprune.progress import progress
    from onnxprune.verify import session

    graph.toposort()
    nodes = {n.name: n for n in graph.nodes}
    position = {name: k for k, name in enumerate(nodes)}
    names, opset = model_inputs(original), opset_version(original)
    for fit in progress(sorted(fits, key=lambda f: position[f.node]), "sequential re-fit", quiet, unit="layer"):
        node = nodes[fit.node]
        x = node.inputs[0].name
        pruned = gs.export_onnx(graph, do_type_check=False)
        pruned.ir_version = original.ir_version
        del pruned.opset_import[:]
        pruned.opset_import.extend(original.opset_import)
        # both models run only up to the layer's input (fits never rewire it: same name in both)
        run_p, run_o = session(outputs_only(pruned, [x])), session(outputs_only(original, [x]))
        src = RowSource.of(NodeView(node, {t.name: t for t in (*node.inputs, *node.outputs)}, opset))
        own, cross, count = None, None, 0.0
        for batch in iter_batches(data, names, batch_size_for(original)):
            rows_p, rows_o = (augment(s.rows(r.run([x], batch)[0])) for s, r in ((src, run_p), (fit.source, run_o)))
            own = rows_p.transpose(0, 2, 1) @ rows_p + (0 if own is None else own)
            cross = rows_p.transpose(0, 2, 1) @ rows_o + (0 if cross is None else cross)
            count += rows_p.shape[1]
        thetas = [_solve_cross(own[gi] / count, cross[gi] / count, fit.targets[gi], ridge)
                  for gi in range(len(fit.targets))]
        if fit.op == "Conv":
            weight, bias = _conv_weight(thetas, fit.weight.shape[2:])
        else:
            weight, bias = thetas[0][:-1], thetas[0][-1]
        apply_fits(graph, [Fit(fit.node, fit.op, weight, bias, fit.kept_outputs)])
    return len(fits)


def _solve_cross(own: np.ndarray, cross: np.ndarray, target: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_θ E‖x̃_p·θ - x̃_o·target‖² + λ‖θ_weights‖² from E[x̃_p x̃_pᵀ] and E[x̃_p x̃_oᵀ]."""
    reg = ridge * max(float(np.mean(np.diag(own)[:-1])) if own.shape[0] > 1 else 0.0, 1e-12)
    a = own + np.diag(np.append(np.full(own.shape[0] - 1, reg), 0.0))
    b = cross @ target
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]
