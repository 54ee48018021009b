"""The consumer-masked reference: the original with the removed channels' *consumer* weights
zeroed. A correct prune equals it exactly (same arithmetic minus terms that are zero)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

import onnxprune
from onnxprune.ops.control_flow import all_nodes, all_tensors
from onnxprune.passes.dependency import rule_for
from onnxprune.passes.rewrite import removed_elements
from onnxprune.verify import random_inputs, session


def masked_reference(model: onnx.ModelProto, result: onnxprune.PruneResult, **options) -> onnx.ModelProto:
    """`options` are the analysis options the prune used (gqa="query" has other groups)."""
    analysis = onnxprune.analyze(model, **options)
    units = result.plan.resolve(analysis)
    removed = removed_elements(analysis, units)
    zero: dict[str, list[tuple[int, np.ndarray]]] = {}
    tensors = all_tensors(analysis.graph)
    for node in all_nodes(analysis.graph):  # weight layers inside Loop/Scan bodies too
        rule = rule_for(node, analysis.opset)
        slot = rule.contraction(analysis.view(node)) if rule else None
        if slot is None or slot not in removed:
            continue
        for tie in analysis.node_ties.get(node.name, []):
            for (s, si), (w, wi) in (((tie.a, tie.a_idx), (tie.b, tie.b_idx)), ((tie.b, tie.b_idx), (tie.a, tie.a_idx))):
                if s == slot and isinstance(tensors[w[0]], gs.Constant):
                    hit = np.isin(si, removed[slot])
                    zero.setdefault(w[0], []).append((w[1], wi[hit]))
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    for init in _initializers(masked.graph):
        if init.name in zero:
            arr = numpy_helper.to_array(init).copy()
            for axis, idx in zero[init.name]:
                index = [slice(None)] * arr.ndim
                index[axis] = idx
                arr[tuple(index)] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return masked


def _initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers of the graph and of its subgraphs; a body's Constant node values count too
    (the analysis turns them into initializers of the same name)."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_initializers(attr.g))
                for inner in attr.g.node:
                    if inner.op_type == "Constant" and inner.attribute[0].name == "value":
                        inner.attribute[0].t.name = inner.output[0]
                        found.append(inner.attribute[0].t)
    return found


def assert_matches_masked(model: onnx.ModelProto, result: onnxprune.PruneResult, rtol=1e-4, atol=1e-5, seed=0,
                          batch: int = 1, **options):
    onnx.checker.check_model(result.model, full_check=True)
    reference = masked_reference(model, result, **options)
    feeds = random_inputs(model, seed, batch=batch)  # `batch`: the size of symbolic input dims
    ref = session(reference).run(None, feeds)
    out = session(result.model).run(None, feeds)
    orig = session(model).run(None, feeds)
    for r, o, g in zip(ref, out, orig):
        assert o.shape == g.shape
        np.testing.assert_allclose(o, r, rtol=rtol, atol=atol)
