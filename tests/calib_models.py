"""Tiny models with known channel structure for the data-driven tests (statistics, recovery)."""

from __future__ import annotations

import numpy as np
import onnx

from builders import GraphBuilder
from onnxprune.plan import GroupPlan, Plan


def conv_chain(consumer_group: int = 1, depthwise: bool = False, constant: tuple[int, ...] = (0, 1),
               seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(3->8, 1x1) -> Relu [-> depthwise 3x3 no pad] -> Conv consumer (3x3, no pad, groups).

    The producer rows of `constant` channels are zero, so those channels are the constant relu(bias).
    """
    b = GraphBuilder(seed)
    x = b.input(["N", 3, 6, 6])
    w = (b.rng.standard_normal((8, 3, 1, 1)) * 0.5).astype(np.float32)
    w[list(constant)] = 0
    bias = (np.abs(b.rng.standard_normal(8)) + 0.2).astype(np.float32)
    h = b.op("Relu", [b.op("Conv", [x, b.const(w, "w"), b.const(bias, "b")], kernel_shape=[1, 1])])
    if depthwise:
        h = b.conv(h, 8, 8, k=3, group=8, pad=0)
    y = b.conv(h, 8, 4 * consumer_group, k=3, group=consumer_group, pad=0)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def dense_chain(kind: str = "Gemm", constant: tuple[int, ...] = (0, 2), seed: int = 0) -> onnx.ModelProto:
    """x -> dense(6->8) + bias -> Relu -> dense(8->5): Gemm layers, or MatMul (+Add) on [N, 4, 6]."""
    b = GraphBuilder(seed)
    w1 = (b.rng.standard_normal((6, 8)) * 0.5).astype(np.float32)
    w1[:, list(constant)] = 0
    bias = (np.abs(b.rng.standard_normal(8)) + 0.2).astype(np.float32)
    w2 = (b.rng.standard_normal((8, 5)) * 0.5).astype(np.float32)
    if kind == "Gemm":
        x = b.input(["N", 6])
        h = b.op("Relu", [b.op("Gemm", [x, b.const(w1, "w"), b.const(bias, "b")])])
        b.op("Gemm", [h, b.const(w2, "w2")])
    else:
        x = b.input(["N", 4, 6])
        h = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.const(w1, "w")]), b.const(bias, "b")])])
        b.op("MatMul", [h, b.const(w2, "w2")])
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def plan_removing(model: onnx.ModelProto, producer: str, channels) -> Plan:
    """A plan removing the units holding output `channels` of the node named `producer`."""
    import onnxprune

    analysis = onnxprune.analyze(model)
    output = next(n.output[0] for n in model.graph.node if n.name == producer)
    plans = []
    for group in analysis.prunable:
        remove = []
        for member in group.members:
            if member.slot == (output, 1) or (member.slot[0] == output and producer in group.producers):
                remove = sorted({int(u) for u in member.unit[np.isin(member.elem, list(channels))]})
        plans.append(GroupPlan(group.key, group.size, remove))
    assert any(p.remove for p in plans), f"no prunable group produced by {producer}"
    return Plan(plans)


def first_node(model: onnx.ModelProto, op: str) -> str:
    return next(n.name for n in model.graph.node if n.op_type == op)
