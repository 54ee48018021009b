"""Torch implementations of ONNX ops for `TrainableGraph`, one module per op family.

An implementation is a function `fn(node, *inputs)` decorated with `@torch_op("OpType")`: `node`
carries the attributes (already converted to Python values and torch tensors), the opset of the
default domain and the number of outputs; `inputs` are torch tensors, None for an omitted optional
input. It returns one tensor or a tuple (None for an output it does not produce). Attribute
defaults follow the ONNX specification. Control-flow ops register with `scoped=True` and receive
the enclosing scope as the keyword `scope`, to run their subgraphs.

Adding an op = one small function here (next to its family) + a tiny-graph test against ONNX
Runtime in tests/test_train_engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from onnx import TensorProto

from onnxprune.errors import InputError


@dataclass(frozen=True)
class TorchOp:
    fn: Callable[..., Any]
    scoped: bool = False


TORCH_OPS: dict[str, TorchOp] = {}
"""ONNX op type (default domain) -> its torch implementation; filled when the family modules load."""


def torch_op(*ops: str, scoped: bool = False) -> Callable:
    """Register `fn` as the training rule of `ops`; registering an op twice is a bug."""
    def wrap(fn: Callable) -> Callable:
        for op in ops:
            if op in TORCH_OPS:
                raise RuntimeError(f"two training rules for {op}")
            TORCH_OPS[op] = TorchOp(fn, scoped)
        return fn
    return wrap


@dataclass
class Node:
    """What an op implementation may know about its node."""

    name: str
    op: str
    opset: int
    attrs: dict[str, Any]
    num_outputs: int
    subgraphs: dict[str, Any] = field(default_factory=dict)
    """Attribute name -> a program with `run(scope, inputs) -> list[tensor]` (Loop/Scan/If bodies)."""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def error(self, message: str) -> InputError:
        return InputError(f"node {self.name!r} ({self.op}): {message}")


_DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool, TensorProto.UINT16: torch.uint16, TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
}


def torch_dtype(elem_type: int, node: Node | None = None) -> torch.dtype:
    """The torch dtype of an ONNX element type."""
    if elem_type not in _DTYPES:
        message = f"element type {TensorProto.DataType.Name(elem_type)} has no torch equivalent"
        raise node.error(message) if node else InputError(message)
    return _DTYPES[elem_type]


def ints(tensor: torch.Tensor | None) -> list[int]:
    """The elements of a small integer tensor (shape arithmetic) as Python ints."""
    return [] if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


from onnxprune.train.ops import (  # noqa: E402,F401  (registration)
    attention, conv, elementwise, linear, norm, pool, recurrent, reduce, resize, shape, control, quant,
)
