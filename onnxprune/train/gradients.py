"""Gradient criteria computed by the tool: taylor and fisher channel scores from a loss on `data`.

A channel's score is built from its mask gradient: the derivative of the loss when every weight
coupled to the channel (producer rows, consumer columns, norm scales; the same members as
`importance.taylor`, through `importance.channel_sums`) is scaled together, Σ w·∂L/∂w.
taylor = |mean over samples| of it (Molchanov et al. 2019); fisher = mean over samples of its
square (Kwon et al. 2022: the diagonal Fisher information of the channel masks).

The loss needs no labels. The unpruned model against itself as a distillation teacher would give
exactly zero gradients, so the signal is:
- outputs that look like class logits (`losses.looks_like_logits`): cross-entropy against the true
  labels when the data holds them (the `labels` array), otherwise against the model's own
  predicted class (taylor) or a class sampled from its own softmax (fisher: the true Fisher);
- other float outputs (embeddings, feature maps), used only when no output looks like logits:
  fisher takes the projection of the output on seeded standard normal noise, whose expected
  squared mask gradient is ||∂y/∂m||², the first-order change of the output itself; taylor, which
  needs a signal with a non-zero mean, takes the output energy ½||y||².
fisher is computed per sample (`micro_batch` 1): with sampled classes or noise the cross terms of
a larger micro-batch vanish only in expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx

from onnxprune.data import DEFAULT_BATCH, batch_size_for, iter_batches, model_inputs
from onnxprune.errors import InputError
from onnxprune.importance import GRADIENT_CRITERIA, GRADIENT_ROLES, channel_sums
from onnxprune.ops.base import Slot, per_element, slot_axes
from onnxprune.passes.dependency import Analysis
from onnxprune.progress import progress
from onnxprune.train import require_torch
from onnxprune.train.losses import FLOAT_TYPES, looks_like_logits, producer_op, softmax_input

if TYPE_CHECKING:
    import torch

DEFAULT_SAMPLES = 1024
"""At most this many samples are scored (the rest of the data is not read): Kwon et al. use 2K."""


@dataclass(frozen=True)
class Signal:
    """The loss whose gradients score the channels: which outputs get which term."""

    logits: tuple[str, ...]
    """Outputs scored by cross-entropy."""
    others: tuple[str, ...]
    """Outputs scored by noise projection (fisher) or energy (taylor)."""
    probabilities: frozenset[str] = frozenset()
    """Logit outputs that are softmax probabilities (their log is used when their input is not known)."""
    pre_softmax: tuple[tuple[str, str], ...] = ()
    """(output, the softmax's input) pairs: cross-entropy reads the input, whose gradient does not
    vanish where the softmax saturates."""

    def scores(self, output: str) -> str:
        return dict(self.pre_softmax).get(output, output)

    def describe(self, kind: str, labels: str | None) -> str:
        if self.logits:
            target = (f"true labels '{labels}'" if labels else
                      "the model's predicted class" if kind == "taylor" else "classes sampled from the model's softmax")
            return f"cross-entropy of {', '.join(self.logits)} against {target}"
        what = "output energy ½||y||²" if kind == "taylor" else "projection on seeded Gaussian noise"
        return f"{what} of {', '.join(self.others)}"


@dataclass
class GradientScores:
    """Per-group channel scores of one gradient criterion, keyed by group key."""

    kind: str
    scores: dict[str, np.ndarray]
    samples: int
    signal: str
    notes: list[str] = field(default_factory=list)

    def criterion(self) -> Callable:
        """A criterion (group, ctx) -> scores for `importance.score_groups`."""
        def scored(group, ctx) -> np.ndarray:
            found = self.scores.get(group.key)
            if found is None or len(found) != group.size:
                raise InputError(f"criterion {self.kind!r}: no gradient scores for group {group.key}")
            return found

        scored.__name__ = self.kind
        return scored


def choose_signal(model: onnx.ModelProto) -> Signal:
    """Logit outputs where there are any; otherwise every float output."""
    floats = [o.name for o in model.graph.output
              if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in FLOAT_TYPES]
    logits = tuple(n for n in floats if looks_like_logits(model, n))
    if not floats:
        raise InputError("gradient criteria need a float model output to build a loss on; the model has none")
    if logits:
        probs = frozenset(n for n in logits if producer_op(model, n) == "Softmax")
        inputs = tuple((n, softmax_input(model, n)) for n in sorted(probs))
        return Signal(logits, (), probs, tuple((n, t) for n, t in inputs if t is not None))
    return Signal((), tuple(floats))


def gradient_scores(model: onnx.ModelProto, analysis: Analysis, data, *, kind: str = "fisher",
                    labels: str | None = "label", seed: int = 0, samples: int | None = DEFAULT_SAMPLES,
                    micro_batch: int | None = None, quiet: bool = False) -> GradientScores:
    """Score every prunable group of `analysis` (made from `model`) by `kind` on `data`.

    `labels` names a labels array in the data (used when present). `micro_batch`: samples per
    backward pass (default: 1 for fisher, 32 for taylor, whose mean is linear in the gradients)."""
    if kind not in GRADIENT_CRITERIA:
        raise InputError(f"gradient criterion must be one of {', '.join(GRADIENT_CRITERIA)}, got {kind!r}")
    torch = require_torch(f"criterion {kind!r} computed from data")
    from onnxprune.train import TrainableGraph

    analysed = _analysed_model(analysis, model)
    engine = TrainableGraph(analysed)
    slots = _gradient_slots(analysis, engine.parameters_by_name)
    if not slots:
        raise InputError(f"criterion {kind!r}: no prunable group has a float weight to differentiate")
    names = sorted({name for name, _ in slots})
    engine.set_trainable(names)
    params = [engine.parameters_by_name[n] for n in names]
    signal = choose_signal(analysed)
    fixed = batch_size_for(analysed, default=0)  # a model exported for one batch size takes only that
    step = fixed or micro_batch or (1 if kind == "fisher" else DEFAULT_BATCH)
    generator = torch.Generator().manual_seed(seed)
    totals = {g.key: np.zeros(g.size) for g in analysis.prunable}
    seen, labelled, found = 0, False, False
    inputs = model_inputs(analysed)
    extra = (labels,) if labels else ()
    skipped = 0
    for batch in progress(iter_batches(data, inputs, fixed or DEFAULT_BATCH, extra=extra, limit=samples),
                          f"{kind} gradients", quiet, unit="batch"):
        found = found or (labels in batch if labels else False)
        target = batch.get(labels) if labels and signal.logits else None
        labelled = labelled or target is not None
        rows = len(next(iter(batch.values())))
        if fixed and rows != fixed:
            skipped += rows
            continue
        for start in range(0, rows, step):
            feeds = {n: torch.from_numpy(np.ascontiguousarray(batch[n][start:start + step])) for n in inputs}
            part = None if target is None else torch.from_numpy(np.asarray(target[start:start + step])).long()
            outputs = engine(feeds, capture=tuple(t for _, t in signal.pre_softmax))
            loss = _loss(signal, kind, outputs, part, generator)
            if not torch.isfinite(loss):
                raise InputError(f"criterion {kind!r}: the loss is not finite on the data "
                                 f"(samples from {seen + start})")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            per_slot = _slot_products(slots, dict(zip(names, params)), dict(zip(names, grads)))
            for group in analysis.prunable:
                channel, _ = channel_sums(group, per_slot)
                totals[group.key] += channel * channel if kind == "fisher" else channel
        seen += rows
    if not seen:
        raise InputError("criterion gradients: the data holds no samples")
    scores = {key: (np.abs(total) if kind == "taylor" else total) / seen for key, total in totals.items()}
    description = signal.describe(kind, labels if labelled else None)
    result = GradientScores(kind, scores, seen, description)
    result.notes.append(f"{kind} scores computed from {seen} samples: {description}")
    if fixed and kind == "fisher":
        result.notes.append(f"the model takes batches of {fixed} only: fisher squares per-batch, not per-sample, "
                            f"gradients" + (f"; {skipped} trailing samples skipped" if skipped else ""))
    if found and not signal.logits:
        result.notes.append(f"labels '{labels}' ignored by {kind}: no output looks like class logits")
    return result


def gradient_criterion(model: onnx.ModelProto, analysis: Analysis, criterion, data, *, gradients=None,
                       labels: str | None = "label", seed: int = 0, quiet: bool = False
                       ) -> tuple[object, list[str]]:
    """The criterion `prune` should score with, and notes for its report: taylor or fisher named
    with data and no gradients file become scores computed here; anything else is returned as is."""
    if not isinstance(criterion, str) or criterion not in GRADIENT_CRITERIA:
        return criterion, []
    if criterion == "fisher" and gradients is not None:
        raise InputError("criterion 'fisher' squares per-sample gradients, which a gradients file cannot hold: "
                         "give --data instead of --gradients")
    if gradients is not None or data is None:
        return criterion, []
    scores = gradient_scores(model, analysis, data, kind=criterion, labels=labels, seed=seed, quiet=quiet)
    return scores.criterion(), scores.notes


def _analysed_model(analysis: Analysis, model: onnx.ModelProto) -> onnx.ModelProto:
    """The constant-folded graph the analysis saw, as a model: its weights carry the names the
    channel groups use (dynamo LSTM/GRU weights folded from Slice/Concat included)."""
    import onnx_graphsurgeon as gs

    from onnxprune.ir import ModelMeta

    exported = gs.export_onnx(analysis.graph.copy(), do_type_check=False)
    ModelMeta.of(model).apply(exported)
    return exported


def _gradient_slots(analysis: Analysis, params: dict) -> list[Slot]:
    """(weight, axis) of every prunable group's weight, bias and scale members that are trainable."""
    slots = []
    for group in analysis.prunable:
        for member in group.weight_members(GRADIENT_ROLES):
            if member.slot[0] in params and member.slot not in slots:
                slots.append(member.slot)
    return slots


def _slot_products(slots: list[Slot], params: dict, grads: dict) -> dict[Slot, np.ndarray]:
    """Σ w·∂L/∂w over every axis of each weight but the slot's, per slot element (float64; a paired
    slot's elements flattened as `per_element` orders them, like `importance.taylor`)."""
    products, out = {}, {}
    for name, axis in slots:
        grad = grads.get(name)
        if grad is None:  # the loss does not reach this weight
            out[(name, axis)] = np.zeros(math.prod(params[name].shape[a] for a in slot_axes((name, axis))))
            continue
        if name not in products:
            products[name] = (params[name].detach().double() * grad.double()).numpy()
        out[(name, axis)] = per_element(products[name], axis).sum(1)
    return out


def _loss(signal: Signal, kind: str, outputs: "dict[str, torch.Tensor]", labels: "torch.Tensor | None",
          generator: "torch.Generator") -> "torch.Tensor":
    """The summed (not averaged) loss of one micro-batch: each sample's gradient counts once."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float64)
    for k, name in enumerate(signal.logits):
        z = outputs[signal.scores(name)].float()
        if name in signal.probabilities and signal.scores(name) == name:
            z = z.clamp_min(1e-12).log()
        z = z.reshape(-1, z.shape[-1])
        if labels is not None and k == 0:
            target = labels.reshape(-1)
        elif kind == "taylor":
            target = z.detach().argmax(-1)
        else:
            target = torch.multinomial(F.softmax(z.detach().double(), -1), 1, generator=generator).reshape(-1)
        total = total + F.cross_entropy(z, target, reduction="sum").double()
    for name in signal.others:
        y = outputs[name].double()
        if kind == "taylor":
            total = total + 0.5 * (y * y).sum()
        else:
            total = total + (torch.randn(y.shape, generator=generator, dtype=torch.float64) * y).sum()
    return total
