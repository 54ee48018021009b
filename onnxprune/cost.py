"""Predict a plan's MACs and parameters without rewriting the model.

Weight layers' MACs are products of their channel counts (Conv: output elements × input channels
per group × kernel), so a layer's cost after pruning is its cost before times the kept fraction of
each channel axis it multiplies over. Parameters scale with the kept fraction of every sliced axis.
Target search evaluates many candidate plans; this makes each evaluation a few array operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.metrics import _node_macs
from onnxprune.ops import Slot
from onnxprune.ops.control_flow import all_tensors
from onnxprune.passes.dependency import Analysis
from onnxprune.passes.rewrite import removed_elements


@dataclass
class _Term:
    base: float
    slots: list[Slot]
    """Channel slots whose kept fraction multiplies this term."""


class CostModel:
    """MACs and parameter counts of the analysis' model under any set of removed units."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        tensors = all_tensors(analysis.graph)  # once (a walk per node was quadratic); Loop bodies' weights too
        self.mac_terms = [t for t in (self._node_term(n, tensors) for n in analysis.graph.nodes) if t is not None]
        slots_of: dict[str, list[Slot]] = {}
        for slot in analysis.slot_sizes:
            slots_of.setdefault(slot[0], []).append(slot)
        self.param_terms = []
        for name, tensor in tensors.items():
            if isinstance(tensor, gs.Constant):
                self.param_terms.append(_Term(float(np.prod(tensor.shape)), slots_of.get(name, [])))
        self.base_macs = sum(t.base for t in self.mac_terms)
        self.base_params = sum(t.base for t in self.param_terms)

    def _node_term(self, node: gs.Node, tensors: dict[str, gs.Tensor]) -> _Term | None:

        def shape(name: str):
            t = tensors.get(name)
            return tuple(t.shape) if t is not None and t.shape is not None else None

        attrs = {k: v for k, v in node.attrs.items() if k == "transA"}
        proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs], **attrs)
        base = float(_node_macs(proto, shape))
        if base == 0:
            return None
        x, w, y = (node.inputs[0].name, node.inputs[1].name if len(node.inputs) > 1 else "",
                   node.outputs[0].name)
        rank = len(shape(y) or ())
        if node.op == "Conv":
            slots = [(y, 1), (w, 1)]
        elif node.op == "ConvTranspose":
            slots = [(x, 1), (w, 1)]
        elif node.op == "Gemm":
            slots = [(y, 1), (x, 0 if node.attrs.get("transA", 0) else 1)]
        elif node.op == "MatMul":
            slots = [(y, rank - 1), (x, rank - 1)]
        else:
            slots = []
        return _Term(base, slots)

    def kept_fractions(self, units: dict[int, np.ndarray]) -> dict[Slot, float]:
        sizes = self.analysis.slot_sizes
        return {slot: 1.0 - len(gone) / sizes[slot] for slot, gone in removed_elements(self.analysis, units).items()}

    def evaluate(self, units: dict[int, np.ndarray]) -> tuple[float, float]:
        """(MACs, params) after removing `units`, as fractions of the original."""
        kept = self.kept_fractions(units)

        def total(terms: list[_Term]) -> float:
            return sum(t.base * float(np.prod([kept.get(s, 1.0) for s in t.slots])) for t in terms)

        macs = total(self.mac_terms) / self.base_macs if self.base_macs else 1.0
        params = total(self.param_terms) / self.base_params if self.base_params else 1.0
        return macs, params
