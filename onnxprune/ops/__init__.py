"""Per-op channel rules, one module per op family. Importing this package registers them all.

To support a new op: add a rule class next to its family (or a new family module imported here),
decorate it with `@register("OpType")`, and add a tiny-graph test in tests/test_ops.py.
"""

from onnxprune.ops import attention, conv, einsum, elementwise, linear, norm, pool  # noqa: F401  (registration)
from onnxprune.ops import concat_split, pad_resize, repeat, reshape, shape  # noqa: F401  (registration)
from onnxprune.ops import slice_gather, transpose  # noqa: F401  (registration)
from onnxprune.ops import recurrent  # noqa: F401  (registration)
from onnxprune.ops import quant  # noqa: F401  (registration)
from onnxprune.ops import control_flow  # noqa: F401  (registration)
from onnxprune.ops.base import REGISTRY, Freeze, NodeView, OpRule, Slot, Tie, ValueTable, register

__all__ = ["REGISTRY", "Freeze", "NodeView", "OpRule", "Slot", "Tie", "ValueTable", "register"]
