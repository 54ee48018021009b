"""Export torch models to ONNX the three ways users do, and plant provably dead channels.

Test and benchmark helper only (torch is an optional extra, never imported by the package).

Variants:
- "legacy-folded": TorchScript exporter, eval mode, constant folding on: BatchNorm is fused into
  the preceding Conv, constants are folded.
- "legacy-bn": TorchScript exporter, constant folding off and `TrainingMode.PRESERVE` on a model
  in eval mode: the eval-mode peephole that fuses Conv+BN is skipped, so BatchNormalization nodes
  stay (with inference semantics) and shape arithmetic stays as Shape/Gather/Concat chains.
- "dynamo": the torch.export-based exporter (`dynamo=True`), optimised by onnxscript; BN is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Iterable

import numpy as np
import onnx
import torch

VARIANTS = ("legacy-folded", "legacy-bn", "dynamo")
OPSET = 18


def export(model: torch.nn.Module, args: "tuple | torch.Tensor", path: "str | os.PathLike[str]",
           variant: str, input_names: "list[str] | None" = None,
           output_names: "list[str] | None" = None, dynamic: bool = False, batch_axis: int = 0,
           opset: int = OPSET) -> onnx.ModelProto:
    """Export `model` (put in eval mode) with `args` to `path` as a single self-contained file.

    `dynamic`: axis `batch_axis` of every input (and axis 0 of every output) is a run-time batch
    size, as users export (`dynamic_axes` for TorchScript, `dynamic_shapes` for dynamo; give a batch
    of at least 2, as torch.export specialises a size-1 dim). Returns the loaded ModelProto.
    Exporter chatter (warnings, progress prints) is silenced.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown export variant {variant!r}, expected one of {VARIANTS}")
    model = model.eval()
    args = args if isinstance(args, tuple) else (args,)
    names = input_names or (["x"] if len(args) == 1 else [f"x{i}" for i in range(len(args))])
    path = os.fspath(path)
    if dynamic and output_names is None:
        output_names = _output_names(model, args)
    # Autograd stays on: under no_grad, eval-mode nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which the TorchScript exporter cannot translate.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if variant == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096) if dynamic else None
            shapes = tuple({batch_axis: batch} for _ in args) if dynamic else None
            program = torch.onnx.export(model, args, dynamo=True, input_names=names, output_names=output_names,
                                        opset_version=opset, optimize=True, verbose=False, dynamic_shapes=shapes)
            program.save(path, external_data=False)
        else:
            folded = variant == "legacy-folded"
            axes = ({**{name: {batch_axis: "batch"} for name in names},
                     **{name: {0: "batch"} for name in output_names or []}} if dynamic else None)
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, output_names=output_names,
                              opset_version=opset, dynamic_axes=axes, do_constant_folding=folded,
                              training=torch.onnx.TrainingMode.EVAL if folded else torch.onnx.TrainingMode.PRESERVE)
    return onnx.load(path)


def _output_names(model: torch.nn.Module, args: tuple) -> list[str]:
    """Names for every output (a dynamic batch axis is declared by name): a dict's keys, else y0..."""
    with torch.no_grad():
        out = model(*args)
    if isinstance(out, dict):
        return list(out)
    return [f"y{i}" for i in range(len(out))] if isinstance(out, (tuple, list)) else ["y"]


_BATCHNORM = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_PRODUCERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def _bn_after(model: torch.nn.Module, args: tuple) -> dict[str, torch.nn.Module]:
    """Producer module name -> the BatchNorm that directly consumes its output (found by tracing
    one forward pass with hooks, so it works for any architecture)."""
    produced: dict[int, str] = {}
    consumers: dict[str, torch.nn.Module] = {}
    alive: list[torch.Tensor] = []  # keep tensors alive so their ids stay unique during the pass

    def on_output(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name
                alive.append(output)
        return hook

    def on_bn_input(module, inputs):
        src = produced.get(id(inputs[0]))
        if src is not None:
            consumers.setdefault(src, module)

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _PRODUCERS):
            handles.append(module.register_forward_hook(on_output(name)))
        elif isinstance(module, _BATCHNORM):
            handles.append(module.register_forward_pre_hook(on_bn_input))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return consumers


def plant_dead_channels(model: torch.nn.Module, fraction: float = 0.25, seed: int = 0,
                        args: "tuple | torch.Tensor | None" = None,
                        skip: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Zero chosen output channels of every Conv/Linear (weight rows, bias) in place, and the γ/β of
    the BatchNorm right after it, so those channels are exactly 0 downstream.

    A BatchNorm whose input is not a hooked producer gets its own channels zeroed (γ = β = 0 makes
    its output 0 whatever the input). `args` (example inputs) enables the Conv→BN pairing; without
    it only producers and stand-alone BatchNorms are planted independently. Returns, per module
    name, the channels zeroed. At least one channel of each layer stays alive.
    """
    rng = np.random.default_rng(seed)
    model.eval()
    skip = set(skip)
    pairs = _bn_after(model, args if isinstance(args, tuple) else (args,)) if args is not None else {}
    paired = {id(bn) for bn in pairs.values()}
    planted: dict[str, np.ndarray] = {}

    def choose(n: int) -> np.ndarray:
        k = min(max(1, int(round(n * fraction))), n - 1)
        return np.sort(rng.choice(n, size=k, replace=False)) if k > 0 else np.zeros(0, dtype=np.int64)

    with torch.no_grad():
        for name, module in model.named_modules():
            if name in skip:
                continue
            if isinstance(module, _PRODUCERS):
                n = module.weight.shape[0]
                dead = choose(n)
                _zero_rows(module, dead)
                if name in pairs:
                    _zero_rows(pairs[name], dead)
                planted[name] = dead
            elif isinstance(module, _BATCHNORM) and id(module) not in paired and module.affine:
                dead = choose(module.num_features)
                _zero_rows(module, dead)
                planted[name] = dead
    return planted


def _zero_rows(module: torch.nn.Module, rows: np.ndarray) -> None:
    """Zero weight (or γ) and bias (or β) along the output-channel axis."""
    index = torch.as_tensor(rows, dtype=torch.long)
    for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
        if param is not None:
            param.index_fill_(0, index, 0.0)
