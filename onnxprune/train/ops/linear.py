"""Matrix products: Gemm (transA/transB/alpha/beta as stored, so write-back needs no transform),
MatMul, Einsum."""

from __future__ import annotations

import torch

from onnxprune.train.ops import Node, torch_op


@torch_op("Gemm")
def gemm(node: Node, a, b, c=None):
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is None:
        return y
    return y + (c if beta == 1.0 else beta * c)


@torch_op("MatMul")
def matmul(node: Node, a, b):
    return torch.matmul(a, b)


@torch_op("Einsum")
def einsum(node: Node, *xs):
    return torch.einsum(node.attr("equation").replace(" ", ""), *xs)
