"""Distillation losses: which loss each output gets, and the per-batch loss from student outputs,
teacher outputs and labels.

The per-batch function (`batch_loss`) is free of any training-loop state so that other loops
(gradient criteria, data-parallel training) compute exactly the same loss. Torch is imported
inside the functions that need it: planning the losses works without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx

from onnxprune.data import model_inputs
from onnxprune.errors import InputError

if TYPE_CHECKING:
    import torch

LOSS_KINDS = ("kl", "mse", "cosine", "pooled")
"""kl: KL divergence of temperature-softened class distributions; mse: mean squared error;
cosine: 1 - cosine similarity along the last axis; pooled: 1 - cosine similarity of the mean over
the real positions of a (batch, positions, features) output (a mean-pooling sentence encoder's
embedding)."""

LOGIT_PRODUCERS = {"Gemm", "MatMul", "Add", "Softmax", "LogSoftmax"}
"""Ops whose rank-2 output is taken for class scores: a linear layer (with or without a separate
bias Add) or a softmax. A pooled embedding ends in Tanh, ReduceMean, Div (normalisation), ..."""
EMBEDDING_WORDS = ("embed", "pool", "hidden", "feature", "vector", "state")
PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "Cast"}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
MASK_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT)


@dataclass(frozen=True)
class OutputLoss:
    """The loss one graph output gets. `probabilities`: the output is a softmax. `logits`: that
    softmax's input when both graphs compute it; KL and cross-entropy then work on it, since the log
    of a saturated softmax (a pruned student can be confidently wrong on every sample) is clamped
    and carries no gradient. Without it they fall back to the log of the probabilities."""

    name: str
    kind: str
    probabilities: bool = False
    logits: str | None = None

    @property
    def scores(self) -> str:
        """The tensor the KL / cross-entropy terms read."""
        return self.logits or self.name


@dataclass(frozen=True)
class LossPlan:
    """Every term of the distillation loss: per-output terms, feature matching at intermediate
    tensors (mean squared error), and cross-entropy on `label_output` when labels are given.
    `padding_mask`: the model input whose zeros mark padded positions; (batch, positions, features)
    tensors leave those positions out of their terms (`batch_loss`)."""

    outputs: tuple[OutputLoss, ...]
    temperature: float = 2.0
    match: tuple[str, ...] = ()
    label_output: str | None = None
    label_weight: float = 1.0
    match_weight: float = 1.0
    padding_mask: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def captured(self) -> tuple[str, ...]:
        """Intermediate tensors both graphs must hand back: `match` and the softmax inputs."""
        return tuple(dict.fromkeys(self.match + tuple(t.logits for t in self.outputs if t.logits)))


def looks_like_logits(model: onnx.ModelProto, output: str) -> bool:
    """The default-loss heuristic: a float output of rank 2 whose second dimension is not fixed
    to 1, produced (through Identity/Flatten/Reshape/Squeeze/Cast) by Gemm, MatMul, Add, Softmax or
    LogSoftmax, and whose name does not suggest an embedding (embed, pool, hidden, feature, vector,
    state). Everything else is an embedding or a feature map and gets MSE."""
    info = next((o for o in model.graph.output if o.name == output), None)
    if info is None or not info.type.HasField("tensor_type"):
        return False
    tensor = info.type.tensor_type
    if tensor.elem_type not in FLOAT_TYPES:
        return False
    if not tensor.HasField("shape") or len(tensor.shape.dim) != 2:
        return False
    classes = tensor.shape.dim[1]
    if classes.HasField("dim_value") and classes.dim_value < 2:
        return False
    if any(word in output.lower() for word in EMBEDDING_WORDS):
        return False
    return producer_op(model, output) in LOGIT_PRODUCERS


def producer_op(model: onnx.ModelProto, tensor: str) -> str | None:
    """The op that computes `tensor`, looking through shape-only and identity ops."""
    node = _producer(model, tensor)
    return node.op_type if node is not None else None


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The node that computes `tensor`, looking through shape-only and identity ops."""
    producers = {out: node for node in model.graph.node for out in node.output}
    seen = set()
    while tensor in producers and tensor not in seen:
        seen.add(tensor)
        node = producers[tensor]
        if node.op_type not in PASS_THROUGH or not node.input:
            return node
        tensor = node.input[0]
    return None


def softmax_input(model: onnx.ModelProto, output: str) -> str | None:
    """The input of the Softmax that computes `output` (through shape-only and identity ops) when
    it normalises the last axis, else None."""
    node = _producer(model, output)
    if node is None or node.op_type != "Softmax":
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return node.input[0] if axis in (-1, _rank(model, output) - 1) else None


def _rank(model: onnx.ModelProto, output: str) -> int:
    info = next(o for o in model.graph.output if o.name == output)
    return len(info.type.tensor_type.shape.dim)


def plan_losses(model: onnx.ModelProto, loss: "str | Mapping[str, str]" = "auto", temperature: float = 2.0,
                match: "tuple[str, ...] | list[str]" = (), labels: bool = False, label_weight: float = 1.0,
                teacher: onnx.ModelProto | None = None, padding_mask: str | None = "auto",
                match_weight: float = 1.0) -> LossPlan:
    """Choose each float output's loss (integer outputs, e.g. an arg-max, carry no gradient and are
    left out). `loss`: 'auto' (KL where `looks_like_logits`, MSE elsewhere),
    one kind for every output, or `{output: kind}` (outputs not named get 'auto'). With `labels`,
    cross-entropy applies to the first output that looks like logits (refused when none does).
    A softmax output is distilled through its input when `teacher` (default: `model`) computes a
    tensor of the same name. `padding_mask`: 'auto' (`find_padding_mask`), an input name, or None.
    `match_weight` scales every `match` term."""
    if temperature <= 0 or not np.isfinite(temperature):
        raise InputError(f"temperature must be a positive number, got {temperature:g}")
    names = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    if not names:
        raise InputError("the model has no float output to distil")
    chosen = _chosen_kinds(loss, names)
    outputs = []
    for name in names:
        kind = chosen.get(name, "auto")
        logits = looks_like_logits(model, name)
        if kind == "auto":
            kind = "kl" if logits else "mse"
        if kind == "pooled" and _rank(model, name) != 3:
            raise InputError(f"--loss pooled: output {name} has rank {_rank(model, name)}; pooling needs a "
                             "(batch, positions, features) output")
        probabilities = kind == "kl" and producer_op(model, name) == "Softmax"
        pre_softmax = softmax_input(model, name) if probabilities else None
        if pre_softmax is not None and not computes(teacher or model, pre_softmax):
            pre_softmax = None
        outputs.append(OutputLoss(name, kind, probabilities, pre_softmax))
    label_output = None
    if labels:
        label_output = next((n for n in names if looks_like_logits(model, n)), None)
        if label_output is None:
            raise InputError("labels given but no output looks like class logits (a float [batch, classes] output "
                             "of a linear layer or softmax); cross-entropy needs one")
    for what, weight in (("label", label_weight), ("match", match_weight)):
        if weight < 0 or not np.isfinite(weight):
            raise InputError(f"{what} weight must be >= 0, got {weight:g}")
    return LossPlan(tuple(outputs), float(temperature), tuple(match), label_output, float(label_weight),
                    float(match_weight), padding_mask=_padding_mask(model, padding_mask))


def find_padding_mask(model: onnx.ModelProto) -> str | None:
    """The input that marks padding, when exactly one looks like it: a rank-2 (batch, positions)
    integer, boolean or float input whose name contains 'mask' (`attention_mask` of Hugging Face
    exports). Token batches padded to a common length otherwise spend part of the loss, and of
    the student's capacity, imitating the teacher on positions nobody reads."""
    found = [n for n in model_inputs(model) if "mask" in n.lower() and _is_mask_shaped(model, n)]
    return found[0] if len(found) == 1 else None


def _is_mask_shaped(model: onnx.ModelProto, name: str) -> bool:
    tensor = next(i for i in model.graph.input if i.name == name).type.tensor_type
    return tensor.elem_type in MASK_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) == 2


def _padding_mask(model: onnx.ModelProto, choice: str | None) -> str | None:
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        return find_padding_mask(model)
    names = model_inputs(model)
    if choice not in names or not _is_mask_shaped(model, choice):
        raise InputError(f"--padding-mask {choice!r}: not a (batch, positions) input of the student "
                         f"(inputs: {', '.join(names)}); give one, 'auto' or 'none'")
    return choice


def computes(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether a node of `model`'s graph outputs `tensor`."""
    return any(tensor in node.output for node in model.graph.node)


def _chosen_kinds(loss: "str | Mapping[str, str]", names: list[str]) -> dict[str, str]:
    if isinstance(loss, str):
        _check_kind(loss, allow_auto=True)
        return {n: loss for n in names}
    unknown = sorted(set(loss) - set(names))
    if unknown:
        raise InputError(f"loss given for unknown output(s) {', '.join(unknown)}; outputs are {', '.join(names)}")
    for kind in loss.values():
        _check_kind(kind, allow_auto=True)
    return dict(loss)


def _check_kind(kind: str, allow_auto: bool) -> None:
    kinds = LOSS_KINDS + (("auto",) if allow_auto else ())
    if kind not in kinds:
        raise InputError(f"loss must be one of {', '.join(kinds)}, got {kind!r}")


def parse_loss_option(values: "list[str] | None") -> "str | dict[str, str]":
    """CLI `--loss` values: one KIND for every output, or OUTPUT=KIND pairs."""
    if not values:
        return "auto"
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    pairs = {}
    for value in values:
        name, sep, kind = value.rpartition("=")
        if not sep or not name:
            raise InputError(f"--loss {value!r}: give one KIND, or OUTPUT=KIND for each output")
        pairs[name] = kind
    return pairs


def kl_loss(student: "torch.Tensor", teacher: "torch.Tensor", temperature: float,
            probabilities: bool = False, weights: "torch.Tensor | None" = None) -> "torch.Tensor":
    """KL(teacher || student) of the class distributions softened by `temperature`, averaged over
    samples and scaled by T² (Hinton et al.) so gradients keep their size across temperatures.
    Classes lie on the last axis; every other axis counts as samples (`weights`: see `position_weights`)."""
    import torch.nn.functional as F

    if probabilities:
        student, teacher = (x.clamp_min(1e-12).log() for x in (student, teacher))
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    per_sample = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    return weighted_mean(per_sample, weights) * temperature ** 2


def mse_loss(student: "torch.Tensor", teacher: "torch.Tensor", weights: "torch.Tensor | None" = None
             ) -> "torch.Tensor":
    return weighted_mean((student - teacher) ** 2, weights)


def cosine_loss(student: "torch.Tensor", teacher: "torch.Tensor", weights: "torch.Tensor | None" = None
                ) -> "torch.Tensor":
    """Mean of 1 - cosine similarity along the last axis (direction only: embeddings compared
    by cosine at search time need not keep their norm)."""
    import torch.nn.functional as F

    return weighted_mean(1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8), weights)


def pooled_loss(student: "torch.Tensor", teacher: "torch.Tensor", weights: "torch.Tensor | None" = None
                ) -> "torch.Tensor":
    """1 - cosine similarity of the (batch, positions, features) tensors averaged over their real
    positions: the embedding a mean-pooling encoder's users compare, rather than each position's."""
    return cosine_loss(mean_pool(student, weights), mean_pool(teacher, weights))


def mean_pool(tensor: "torch.Tensor", weights: "torch.Tensor | None") -> "torch.Tensor":
    """(batch, features): the mean of a (batch, positions, features) tensor over the positions
    `weights` keeps (every position without weights)."""
    if weights is None:
        return tensor.mean(1)
    return (tensor * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)


def position_weights(mask: "torch.Tensor | None", tensor: "torch.Tensor") -> "torch.Tensor | None":
    """1 for the real positions of a (batch, positions, features) tensor, 0 for padding, or None
    (every element counts) when there is no mask or `tensor` is not laid out like it. Rank 3 only:
    a rank-4 tensor such as attention scores (batch, heads, positions, positions) could share its
    first two sizes with the mask by chance."""
    if mask is None or tensor.dim() != 3 or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return None
    return (mask != 0).to(tensor.dtype)


def weighted_mean(values: "torch.Tensor", weights: "torch.Tensor | None") -> "torch.Tensor":
    """The mean of `values`, or its mean over the positions `weights` (leading axes) keeps."""
    if weights is None:
        return values.mean()
    per_position = math.prod(values.shape[weights.dim():])
    weights = weights.reshape(weights.shape + (1,) * (values.dim() - weights.dim()))
    return (values * weights).sum() / (weights.sum().clamp_min(1) * per_position)


def cross_entropy_loss(logits: "torch.Tensor", labels: "torch.Tensor", probabilities: bool = False
                       ) -> "torch.Tensor":
    import torch.nn.functional as F

    if probabilities:
        logits = logits.clamp_min(1e-12).log()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long())


def output_loss(term: OutputLoss, student: "torch.Tensor", teacher: "torch.Tensor", temperature: float,
                mask: "torch.Tensor | None" = None) -> "torch.Tensor":
    if student.shape != teacher.shape:
        raise InputError(f"output {term.name}: student shape {tuple(student.shape)} differs from the teacher's "
                         f"{tuple(teacher.shape)}")
    weights = position_weights(mask, student)
    if term.kind == "kl":
        return kl_loss(student, teacher, temperature, term.probabilities and not term.logits, weights)
    if term.kind == "cosine":
        return cosine_loss(student, teacher, weights)
    if term.kind == "pooled":
        return pooled_loss(student, teacher, weights)
    return mse_loss(student, teacher, weights)


def batch_loss(plan: LossPlan, student: "Mapping[str, torch.Tensor]", teacher: "Mapping[str, torch.Tensor]",
               labels: "torch.Tensor | None" = None, mask: "torch.Tensor | None" = None
               ) -> "tuple[torch.Tensor, dict[str, float]]":
    """The distillation loss of one batch and its parts by name (`kl:logits`, `match:h1`, `ce`).

    `student` holds the student's outputs and captured `plan.captured` tensors, `teacher` the same
    names from the teacher (float tensors, no gradient); `labels` enables the cross-entropy term;
    `mask` (the batch's `plan.padding_mask` input) leaves padded positions out."""
    import torch

    total = torch.zeros((), dtype=torch.float32)
    parts = {}
    for term in plan.outputs:
        name = term.scores if term.kind == "kl" else term.name
        value = output_loss(term, student[name].float(), teacher[name].float(), plan.temperature, mask)
        parts[f"{term.kind}:{term.name}"] = value
        total = total + value
    for name in plan.match:
        s, t = student[name].float(), teacher[name].float()
        if s.shape != t.shape:
            raise InputError(f"--match {name}: student shape {tuple(s.shape)} differs from the teacher's "
                             f"{tuple(t.shape)}; only tensors of equal shape can be matched")
        value = mse_loss(s, t, position_weights(mask, s)) * plan.match_weight
        parts[f"match:{name}"] = value
        total = total + value
    if labels is not None and plan.label_output is not None and plan.label_weight > 0:
        term = next(t for t in plan.outputs if t.name == plan.label_output)
        value = cross_entropy_loss(student[term.scores].float(), labels,
                                   term.probabilities and not term.logits) * plan.label_weight
        parts["ce"] = value
        total = total + value
    return total, {k: float(v.detach()) for k, v in parts.items()}
