"""Random small CNNs for property tests: residual adds, concats, splits, depthwise convs, BN,
and a flatten → Gemm head. Built with onnx.helper from a hypothesis-drawn recipe."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st

from builders import GraphBuilder

BLOCKS = ["conv", "conv_bn", "residual", "concat", "split", "depthwise", "pool"]


@st.composite
def cnn_recipes(draw) -> dict:
    return {
        "seed": draw(st.integers(0, 10_000)),
        "width": draw(st.sampled_from([4, 6, 8])),
        "blocks": draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5)),
        "head": draw(st.sampled_from(["flatten_gemm", "gap_gemm", "conv"])),
    }


def build_cnn(recipe: dict, dead: bool = False) -> onnx.ModelProto:
    """Build the recipe; with `dead`, some producer channels get all-zero weights and bias."""
    b = GraphBuilder(seed=recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    x = b.input([1, 3, 8, 8])
    c = recipe["width"]
    h = b.op("Relu", [b.conv(x, 3, c)])
    spatial = 8
    for block in recipe["blocks"]:
        if block == "conv":
            h, c = b.op("Relu", [b.conv(h, c, c + 2)]), c + 2
        elif block == "conv_bn":
            h = b.op("Relu", [b.bn(b.conv(h, c, c, bias=False), c)])
        elif block == "residual":
            h = b.op("Add", [h, b.op("Relu", [b.conv(h, c, c)])])
        elif block == "concat":
            h, c = b.op("Concat", [h, b.op("Relu", [b.conv(h, c, 4)])], axis=1), c + 4
        elif block == "split" and c >= 4:
            left, right = b.op("Split", [h, b.const(np.array([c // 2, c - c // 2], np.int64))], n_out=2, axis=1)
            h = b.op("Concat", [b.op("Relu", [b.conv(left, c // 2, c // 2)]), right], axis=1)
        elif block == "depthwise":
            h = b.op("Relu", [b.conv(h, c, c, group=c)])
        elif block == "pool" and spatial >= 4:
            h, spatial = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]), spatial // 2
    if recipe["head"] == "flatten_gemm":
        b.gemm(b.op("Flatten", [h], axis=1), c * spatial * spatial, 5)
    elif recipe["head"] == "gap_gemm":
        b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1), c, 5)
    else:
        b.conv(h, c, 3, k=1, pad=0)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    if dead:
        _plant_dead_channels(model, rng)
    return model


def _plant_dead_channels(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """Zero weight rows and bias of random output channels of group-1 convs (not the last)."""
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"][:-1]
    for node in convs:
        if any(a.name == "group" and a.i > 1 for a in node.attribute):
            continue
        w = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()
        rows = rng.choice(w.shape[0], size=max(1, w.shape[0] // 3), replace=False)
        w[rows] = 0
        inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(w, node.input[1]))
        if len(node.input) > 2 and node.input[2]:
            bias = onnx.numpy_helper.to_array(inits[node.input[2]]).copy()
            bias[rows] = 0
            inits[node.input[2]].CopyFrom(onnx.numpy_helper.from_array(bias, node.input[2]))
