"""Pointing a node's input, or every reader of a tensor, at another tensor in place.

Shared by the import-time rewrites (`canonical`, `batch_shapes`, `fold_constants`); kept apart from
them so that they can use it without importing each other.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of `old` reads `new` instead."""
    for consumer in list(old.outputs):
        for i, inp in enumerate(consumer.inputs):
            if inp is old:
                set_input(consumer, i, new)


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`node.inputs[index] = tensor`, without graphsurgeon's equality scan.

    graphsurgeon's synchronized list drops `node` from the old tensor's readers with `list.remove`,
    which calls `Node.__eq__` (names, attributes, inputs and outputs compared) on every reader
    before it: quadratic in the readers of a constant that every layer shares. This drops the
    first occurrence by identity instead, the one `list.remove` finds as node names are unique
    (`ir._name_nodes`), so reader lists keep the same order.
    """
    readers = node.inputs[index].outputs
    at = next(k for k, reader in enumerate(readers) if reader is node)
    list.__delitem__(readers, at)
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)
