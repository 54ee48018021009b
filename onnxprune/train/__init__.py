"""Training on the ONNX graph itself (optional extra `train`: PyTorch).

`TrainableGraph` runs a model's graph with torch autograd and writes trained values back into the
same graph; `max_relative_error` compares its outputs with ONNX Runtime. torch is imported only when
one of these names is first used; without it the import fails with one line saying what to install.
"""

from __future__ import annotations

import importlib

from onnxprune.errors import InputError

_LAZY = {
    "TrainableGraph": "onnxprune.train.graph",
    "max_relative_error": "onnxprune.train.graph",
    "distill": "onnxprune.train.distill",
    "DistillOptions": "onnxprune.train.distill",
    "DistillResult": "onnxprune.train.distill",
    "run_distillation": "onnxprune.train.distill",
}
__all__ = list(_LAZY)


def require_torch(what: str = "onnxprune.train"):
    """The torch module, or the one-line InputError saying that `what` needs the train extra."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{what} needs the train extra: pip install 'onnxprune[train]'") from None
    return torch


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxprune.train' has no attribute {name!r}")
    require_torch()
    return getattr(importlib.import_module(_LAZY[name]), name)
