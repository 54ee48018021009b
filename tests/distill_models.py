"""Tiny teacher/student pairs and data for the distillation tests (real ONNX graphs, run in ORT)."""

from __future__ import annotations

import numpy as np
import onnx

import onnxprune
from builders import GraphBuilder

INPUT = "x"
SAMPLES = 512


def tiny_classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv(2->6) -> BatchNorm -> Relu -> MaxPool 2x2 -> Flatten -> Gemm(54->4)."""
    b = GraphBuilder(seed)
    x = b.input(["N", 2, 6, 6], INPUT)
    h = b.op("Relu", [b.bn(b.conv(x, 2, 6), 6)])
    flat = b.op("Flatten", [b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])])
    logits = b.op("Gemm", [flat, b.weight([4, 54], scale=0.5), b.weight([4], "b", scale=0.1)], transB=1)
    b.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="out"))
    b.output("logits", shape=["N", 4])
    return b.model()


def pruned_student(teacher: onnx.ModelProto) -> onnx.ModelProto:
    """Half the teacher's conv channels removed, no recovery, weights perturbed: a damaged student."""
    return perturbed(onnxprune.prune(teacher, ratio=0.5, recover="none").model)


def perturbed(model: onnx.ModelProto, seed: int = 1, scale: float = 0.5) -> onnx.ModelProto:
    """Same graph, every float initializer of more than one element moved by noise."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1 and "var" not in init.name:
            noisy = array + rng.standard_normal(array.shape).astype(np.float32) * scale
            init.CopyFrom(onnx.numpy_helper.from_array(noisy, init.name))
    return out


def images(seed: int = 0, n: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, 6, 6)).astype(np.float32)


def labelled(teacher: onnx.ModelProto, seed: int = 0, n: int = SAMPLES) -> dict[str, np.ndarray]:
    """Inputs plus the teacher's own arg-max as `label` (so accuracy is well defined)."""
    from onnxprune.verify import session

    x = images(seed, n)
    return {INPUT: x, "label": session(teacher).run(None, {INPUT: x})[0].argmax(1).astype(np.int64)}
