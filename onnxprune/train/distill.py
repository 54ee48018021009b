"""Knowledge distillation of a (pruned) ONNX student from its ONNX teacher.

The student trains as a `TrainableGraph` (PyTorch autograd on the ONNX graph itself), the teacher
runs in ONNX Runtime. Data is streamed: rows are read a batch at a time, mixed in a bounded
shuffle buffer, augmented if asked, and the teacher's outputs are computed for that batch only,
so memory does not grow with the data set. Only initializer values of the student change.

`run_distillation` is the loop other features build on (iterative schedules, gradient criteria);
`train_step` is one optimisation step and `batch_loss` (losses.py) the loss of one batch, so a
data-parallel loop can reuse both unchanged.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np
import onnx

from onnxprune.data import DEFAULT_BATCH, DataSource, batch_size_for, is_one_shot, iter_batches, model_inputs, spool
from onnxprune.errors import InputError
from onnxprune.train import require_torch
from onnxprune.train.augment import augment_batch, swap_tokens
from onnxprune.train.losses import LossPlan, batch_loss, computes, mean_pool, plan_losses, position_weights

if TYPE_CHECKING:
    import torch

    from onnxprune.train.graph import TrainableGraph

SHUFFLE_ROWS = 4096
"""Rows held in the shuffle buffer: the data is mixed within blocks of this many samples."""


@dataclass
class DistillOptions:
    """Every distillation setting; the `distill` command's flags carry the same names."""

    epochs: int = 10
    lr: float = 1e-3
    batch: int | None = None
    """Samples per step (default: the model's fixed batch size, else 32)."""
    loss: "str | dict[str, str]" = "auto"
    """'auto', 'kl', 'mse', 'cosine', 'pooled', or {output: kind} (`losses.LOSS_KINDS`)."""
    temperature: float = 2.0
    labels: str | None = None
    """Name of a labels array in the training data: adds cross-entropy on the logits output."""
    label_weight: float = 1.0
    eval_labels: str | None = None
    """Name of the labels array in the evaluation data (accuracy); default: `labels`."""
    match: tuple[str, ...] = ()
    """Intermediate tensors present in both graphs, matched by mean squared error (equal shapes only)."""
    match_weight: float = 1.0
    """Weight of each `match` term against the output terms (weight 1)."""
    padding_mask: str | None = "auto"
    """Input whose zeros mark padding, left out of the loss on (batch, positions, features) tensors:
    'auto' (an input like `attention_mask`, see `losses.find_padding_mask`), a name, or None."""
    augment: bool = False
    token_swap: float = 0.0
    """Share of token-id positions replaced by ids drawn from the same batch (0: none); see
    `onnxprune.train.augment.swap_tokens`."""
    patience: int = 3
    freeze_bn: bool = False
    freeze: tuple[str, ...] = ()
    """Initializers kept fixed: names or shell-style patterns (`*word_embeddings*`)."""
    seed: int = 0
    max_minutes: float | None = None
    quiet: bool = False

    def check(self) -> None:
        """Refuse values that cannot train, in one line."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise InputError(f"batch must be an integer >= 1, got {self.batch!r}")
        if not (isinstance(self.token_swap, (int, float)) and 0 <= self.token_swap < 1):
            raise InputError(f"token_swap must be a share in [0, 1), got {self.token_swap!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise InputError(f"patience must be an integer >= 1, got {self.patience!r}")
        if self.padding_mask is not None and not isinstance(self.padding_mask, str):
            raise InputError(f"padding_mask must be 'auto', an input name or None, got {self.padding_mask!r}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise InputError(f"max_minutes must be a positive number, got {self.max_minutes!r}")
        self.match = tuple(self.match)
        self.freeze = tuple(self.freeze)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    """Mean training loss over the epoch's batches."""
    parts: dict[str, float]
    eval: dict[str, float]
    """accuracy (given labels), agreement (top-1 with the teacher) or cosine, and loss on the
    evaluation data; empty without evaluation data."""
    seconds: float


@dataclass
class DistillHistory:
    """What a distillation run did: per-epoch figures, before/after evaluation, why it stopped."""

    epochs: list[EpochRecord] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    evaluated_on: str = "training data"
    metric: str = "agreement"
    """The figure early stopping watches (higher is better)."""
    best_epoch: int = 0
    stopped: str = "all epochs"
    """'all epochs' (all ran), 'early stop' (no better `metric` for `patience` epochs), 'time budget'."""
    seconds: float = 0.0
    samples: int = 0
    """Training samples seen per epoch (the last complete epoch)."""
    losses: dict[str, str] = field(default_factory=dict)
    torch_vs_ort_max_rel: float | None = None

    @property
    def final_loss(self) -> float | None:
        return self.epochs[-1].loss if self.epochs else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["final_loss"] = self.final_loss
        return out


@dataclass
class DistillResult:
    """The distilled student and what the run did; `save` writes it atomically."""

    model: onnx.ModelProto
    history: DistillHistory

    def save(self, path: "str | os.PathLike[str]", external_data: "bool | str" = False) -> None:
        from onnxprune.ir import save_model

        save_model(self.model, path, external_data)


def distill(student: "str | os.PathLike[str] | onnx.ModelProto", teacher: "str | os.PathLike[str] | onnx.ModelProto",
            data: DataSource, *, eval_data: DataSource | None = None, epochs: int = 10, lr: float = 1e-3,
            batch: int | None = None, loss: "str | dict[str, str]" = "auto", temperature: float = 2.0,
            labels: str | None = None, label_weight: float = 1.0, eval_labels: str | None = None,
            match: "tuple[str, ...] | list[str]" = (), match_weight: float = 1.0,
            padding_mask: str | None = "auto", augment: bool = False,
            token_swap: float = 0.0, patience: int = 3, freeze_bn: bool = False,
            freeze: "tuple[str, ...] | list[str]" = (), seed: int = 0, max_minutes: float | None = None,
            quiet: bool = False) -> DistillResult:
    """Distil `student` from `teacher` on `data` (any form `onnxprune.data` reads, no labels needed).

    Returns the student with trained weights (`.model`), the per-epoch figures (`.history`) and
    `.save(path)`. With `eval_data`, training stops early when accuracy (given `labels` /
    `eval_labels`) or top-1 agreement with the teacher has not improved for `patience` epochs,
    and the best epoch's weights are kept. Inputs are never modified.
    """
    options = DistillOptions(epochs=epochs, lr=lr, batch=batch, loss=loss, temperature=temperature, labels=labels,
                             label_weight=label_weight, eval_labels=eval_labels, match=tuple(match),
                             match_weight=match_weight, padding_mask=padding_mask, augment=augment,
                             token_swap=token_swap, patience=patience, freeze_bn=freeze_bn, freeze=tuple(freeze),
                             seed=seed, max_minutes=max_minutes, quiet=quiet)
    from onnxprune.ir import load_model

    student_proto, teacher_proto = load_model(student), load_model(teacher)
    with tempfile.TemporaryDirectory(prefix="onnxprune-distill-") as tmp:
        data = _rereadable(data, os.path.join(tmp, "data"))  # every epoch reads the data again
        eval_data = _rereadable(eval_data, os.path.join(tmp, "eval"))
        model, history = run_distillation(student_proto, teacher_proto, data, options, eval_data)
    return DistillResult(model, history)


def _rereadable(data: DataSource | None, directory: str) -> DataSource | None:
    """`data` itself, or a one-shot source (generator, reader) copied batch by batch to `directory`."""
    if data is None or not is_one_shot(data):
        return data
    os.makedirs(directory)
    return spool(data, directory)


def run_distillation(student: onnx.ModelProto, teacher: onnx.ModelProto, data: DataSource, options: DistillOptions,
                     eval_data: DataSource | None = None, trainer_class: "type[_Trainer] | None" = None
                     ) -> tuple[onnx.ModelProto, DistillHistory]:
    """The training loop: returns a trained copy of `student` and the history. `data` must be
    re-readable (paths, dicts, lists); neither model is modified. `trainer_class` (a `_Trainer`
    subclass) changes how batches are read and steps taken, e.g. data-parallel on Ray Train."""
    require_torch("distill")
    options.check()
    check_pair(student, teacher)
    check_match(student, teacher, options.match)
    trainer = (trainer_class or _Trainer)(student, teacher, data, options)
    history = trainer.history
    evaluation = Evaluation(student, trainer.plan, trainer.batch, eval_data if eval_data is not None else data,
                            options.eval_labels or options.labels)
    history.evaluated_on = "eval data" if eval_data is not None else "training data"
    history.before = evaluation.run(trainer.graph, trainer.teacher)
    history.metric = evaluation.metric(history.before)
    best, best_state, stale = _score(history.before, history.metric), trainer.snapshot(), 0
    first_state = best_state
    start = time.monotonic()
    deadline = start + options.max_minutes * 60 if options.max_minutes else None
    for epoch in range(1, options.epochs + 1):
        record, out_of_time = trainer.epoch(epoch, deadline)
        if record is not None:
            # held-out figures every epoch (early stopping); training data is measured before and after only
            record.eval = evaluation.run(trainer.graph, trainer.teacher) if eval_data is not None else {}
            history.epochs.append(record)
            score = _score(record.eval, history.metric)
            if eval_data is None or score > best:  # without held-out data the last epoch is kept
                best, best_state, stale, history.best_epoch = score, trainer.snapshot(), 0, epoch
            else:
                stale += 1
        if out_of_time:
            history.stopped = "time budget"
            break
        if eval_data is not None and stale >= options.patience:
            history.stopped = "early stop"
            break
    trainer.restore(best_state)
    history.after = (evaluation.run(trainer.graph, trainer.teacher) if eval_data is None else
                     history.epochs[history.best_epoch - 1].eval if history.best_epoch else dict(history.before))
    if eval_data is None and history.after["loss"] > history.before["loss"]:
        # never hand back a student that imitates the teacher worse than the one it was given
        trainer.restore(first_state)
        history.best_epoch, history.after = 0, dict(history.before)
    history.seconds = time.monotonic() - start
    history.torch_vs_ort_max_rel = trainer.engine_error()
    return trainer.graph.to_onnx(), history


def _score(figures: dict[str, float], metric: str) -> tuple[float, float]:
    """What early stopping maximises: the metric, then (on a tie, e.g. a small held-out set at 100%
    accuracy) a lower evaluation loss."""
    return figures.get(metric, -math.inf), -figures.get("loss", math.inf)


class _Trainer:
    """The student being trained, its optimizer, the teacher and the data of one run."""

    def __init__(self, student: onnx.ModelProto, teacher: onnx.ModelProto, data: DataSource,
                 options: DistillOptions) -> None:
        from onnxprune.train.graph import TrainableGraph

        self.student, self.data, self.options = student, data, options
        self.names = model_inputs(student)
        self.batch = _batch_size(student, options.batch)
        self.fixed_batch = batch_size_for(student, default=0) != 0  # ORT would refuse a short last batch
        self.plan = plan_losses(student, options.loss, options.temperature, options.match, options.labels is not None,
                                options.label_weight, teacher, options.padding_mask, options.match_weight)
        self.graph = TrainableGraph(student)
        self.trainable = trainable_names(self.graph.roles, options)
        if not self.trainable:
            raise InputError("student has no trainable float initializers" + (" (all frozen)" if options.freeze else ""))
        self.graph.set_trainable(self.trainable)
        self.optimizer = adam([self.graph.parameters_by_name[n] for n in self.trainable], options.lr)
        self.teacher = TeacherRunner(teacher, self.plan.captured)
        self.rng = np.random.default_rng(options.seed)
        self.history = DistillHistory(losses=_loss_names(self.plan, options.labels))
        self._bar = None  # the current epoch's progress bar (tqdm on a terminal)

    def epoch(self, epoch: int, deadline: float | None) -> "tuple[EpochRecord | None, bool]":
        """One pass over the data (see `learning_rate`): its record (None if no step ran) and
        whether the time budget ran out."""
        options, t0 = self.options, time.monotonic()
        losses: list[float] = []
        parts: dict[str, list[float]] = {}
        samples = 0
        for inputs, labels in self._batches(epoch):
            lr = self.learning_rate(epoch, deadline)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, step_parts = train_step(self.graph, self.optimizer, self.plan, inputs, self.teacher(inputs), labels)
            if not math.isfinite(loss):
                raise InputError(f"distillation loss became {loss} at epoch {epoch}, step {len(losses) + 1} "
                                 f"({', '.join(f'{k}={v:.3g}' for k, v in step_parts.items())}); try a lower --lr")
            losses.append(loss)
            samples += len(next(iter(inputs.values())))
            for k, v in step_parts.items():
                parts.setdefault(k, []).append(v)
            if hasattr(self._bar, "set_postfix"):
                self._bar.set_postfix(loss=f"{loss:.4g}")
            if deadline is not None and time.monotonic() > deadline:
                break
        out_of_time = deadline is not None and time.monotonic() > deadline
        if not losses:
            if out_of_time:
                return None, True
            raise InputError("data: no complete training batch (fewer samples than --batch?)")
        self.history.samples = samples
        record = EpochRecord(epoch, float(np.mean(losses)), {k: float(np.mean(v)) for k, v in parts.items()}, {},
                             time.monotonic() - t0)
        return record, out_of_time

    def learning_rate(self, epoch: int, deadline: float | None) -> float:
        """Cosine decay from `lr` towards 0 (large steps first, fine ones last) over the epochs, or
        over the time budget where that ends sooner: a run the budget cuts short still ends on
        small steps. The time term only counts once it is ahead of the epochs, so a generous budget
        leaves the run deterministic."""
        progress = (epoch - 1) / self.options.epochs
        if deadline is not None and self.options.max_minutes:
            budget = self.options.max_minutes * 60
            progress = max(progress, 1 - (deadline - time.monotonic()) / budget)
        return self.options.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _batches(self, epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(inputs, labels or None) per step: shuffled, augmented if asked, checked against the model."""
        from onnxprune.progress import progress

        options = self.options
        extra = (options.labels,) if options.labels else ()
        batches = shuffled_batches(self.data, self.names, self.batch, self.rng, extra, drop_partial=self.fixed_batch)
        self._bar = progress(batches, f"distill epoch {epoch}/{options.epochs}", options.quiet, unit="batch")
        for feeds in self._bar:
            if options.augment:
                feeds = augment_batch(feeds, self.names, self.rng)
            if options.token_swap:
                feeds = swap_tokens(feeds, self.names, self.rng, options.token_swap)
            labels = feeds.get(options.labels) if options.labels else None
            if options.labels and labels is None and options.label_weight > 0:
                raise InputError(f"no labels array {options.labels!r} in the data (see --labels)")
            inputs = {n: feeds[n] for n in self.names}
            check_feeds(self.student, inputs)
            yield inputs, labels

    def snapshot(self) -> dict:
        return snapshot(self.graph, self.trainable)

    def restore(self, state: dict) -> None:
        restore(self.graph, state)

    def engine_error(self) -> float | None:
        """Largest relative difference between torch and ONNX Runtime outputs of the trained model
        on the first batch (the engine promises <= 1e-4)."""
        from onnxprune.train.graph import max_relative_error

        first = next(iter_batches(self.data, self.names, self.batch), None)
        return None if first is None else float(max_relative_error(self.graph, {n: first[n] for n in self.names}))


def adam(params: "list[torch.Tensor]", lr: float) -> "torch.optim.Optimizer":
    """Adam, fused where this torch has the fused CPU kernel (2.4+): one MiniLM update (17M
    weights, 11.7M of them the embedding table) takes 0.02 s fused against 0.14 s unfused."""
    import torch

    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused kernel for CPU tensors
        return torch.optim.Adam(params, lr=lr)


def trainable_names(roles: Mapping[str, str], options: DistillOptions) -> list[str]:
    """The initializers the optimizer updates: weights, BatchNorm scale and bias unless `freeze_bn`,
    none that a `freeze` pattern names. A pattern that names no trainable initializer is refused:
    a typo would otherwise train what the user meant to keep."""
    from fnmatch import fnmatchcase

    candidates = [n for n, role in roles.items() if role == "param" or (role == "bn_param" and not options.freeze_bn)]
    for pattern in options.freeze:
        if not any(fnmatchcase(n, pattern) for n in candidates):
            raise InputError(f"--freeze {pattern!r} names no trainable initializer of the student")
    return [n for n in candidates if not any(fnmatchcase(n, p) for p in options.freeze)]


def snapshot(graph: "TrainableGraph", names: list[str]) -> "dict[str, torch.Tensor]":
    """Copies of the named parameters' current values (the best epoch's weights)."""
    return {n: graph.parameters_by_name[n].detach().clone() for n in names}


def restore(graph: "TrainableGraph", state: "dict[str, torch.Tensor]") -> None:
    """Put values taken by `snapshot` back."""
    import torch

    with torch.no_grad():
        for name, value in state.items():
            graph.parameters_by_name[name].copy_(value)


def _loss_names(plan: LossPlan, labels: str | None) -> dict[str, str]:
    """How the history names each loss term: `{"logits": "kl (T=2) + cross-entropy on 'label'"}`."""
    names = {t.name: t.kind + (f" (T={plan.temperature:g})" if t.kind == "kl" else "") for t in plan.outputs}
    for name in plan.match:
        names[name] = "mse (matched tensor" + (f", weight {plan.match_weight:g})" if plan.match_weight != 1 else ")")
    if plan.label_output is not None:
        names[plan.label_output] += f" + cross-entropy on {labels!r}"
    if plan.padding_mask is not None:
        names["padding"] = f"positions where {plan.padding_mask!r} is 0 left out"
    return names


def train_step(graph: "TrainableGraph", optimizer, plan: LossPlan, inputs: Mapping[str, np.ndarray],
               targets: Mapping[str, np.ndarray], labels: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """One optimisation step on one batch: forward, `batch_loss`, backward, update. Returns the
    loss and its parts; a non-finite loss is returned without updating the weights."""
    import torch

    student = graph(to_tensors(inputs), capture=plan.captured)
    teacher = {k: torch.from_numpy(np.asarray(v)) for k, v in targets.items()}
    label_tensor = torch.from_numpy(np.asarray(labels)) if labels is not None else None
    loss, parts = batch_loss(plan, student, teacher, label_tensor, batch_padding_mask(plan, inputs))
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, parts
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value, parts


def batch_padding_mask(plan: LossPlan, inputs: Mapping[str, np.ndarray]) -> "torch.Tensor | None":
    """The batch's padding mask as a tensor, or None when the plan has none."""
    import torch

    return None if plan.padding_mask is None else torch.from_numpy(np.asarray(inputs[plan.padding_mask]))


def to_tensors(feeds: Mapping[str, np.ndarray]) -> "dict[str, torch.Tensor]":
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


class TeacherRunner:
    """The teacher in ONNX Runtime, with the `match` tensors added as extra outputs; one call per
    batch, nothing kept between calls.

    The session is optimised and uses as many threads as torch does (one per Ray worker, which
    sets torch to one): with one thread and no graph optimisation the teacher took nearly half of
    a MiniLM epoch (12.8 s of 27 s); optimised on two threads, 0.08 s per batch instead of 0.16 s.
    Fusions keep every tensor that is an output, so the matched tensors are the same ones."""

    def __init__(self, teacher: onnx.ModelProto, match: tuple[str, ...] = ()) -> None:
        import torch

        from onnxprune.verify import session

        model = teacher
        if match:
            model = onnx.ModelProto()
            model.CopyFrom(teacher)
            outputs = {o.name for o in teacher.graph.output}
            model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name)
                                      for name in dict.fromkeys(match) if name not in outputs)
        self.session = session(model, optimize=True, threads=torch.get_num_threads())
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(None, dict(inputs))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"data does not fit the teacher: ONNX Runtime says {first[:300]}") from None
        return dict(zip(self.names, values))


class Evaluation:
    """Figures of the student against the teacher on one data source: top-1 agreement (or mean
    cosine when no output looks like logits; padded positions left out), accuracy when labels are
    present, mean loss."""

    def __init__(self, student: onnx.ModelProto, plan: LossPlan, batch: int, data: DataSource,
                 labels: str | None) -> None:
        self.student, self.plan, self.batch, self.data, self.labels = student, plan, batch, data, labels
        self.names = model_inputs(student)
        kl = [t.name for t in plan.outputs if t.kind == "kl"]
        self.output = kl[0] if kl else plan.outputs[0].name
        self.classes = bool(kl)
        self.pooled = not kl and plan.outputs[0].kind == "pooled"

    def metric(self, figures: dict[str, float]) -> str:
        return "accuracy" if "accuracy" in figures else "agreement" if self.classes else "cosine"

    def run(self, graph: "TrainableGraph", teacher: TeacherRunner) -> dict[str, float]:
        import torch

        totals = {"loss": 0.0, "agree": 0.0, "correct": 0.0, "cosine": 0.0}
        samples = labelled = 0
        extra = (self.labels,) if self.labels else ()
        with torch.no_grad():
            for feeds in iter_batches(self.data, self.names, self.batch, extra=extra):
                inputs = {n: feeds[n] for n in self.names}
                check_feeds(self.student, inputs)
                targets = teacher(inputs)
                student = graph(to_tensors(inputs), capture=self.plan.captured)
                mask = batch_padding_mask(self.plan, inputs)
                loss, _ = batch_loss(self.plan, student, to_tensors(targets), mask=mask)
                s, t = student[self.output].float().numpy(), np.asarray(targets[self.output], dtype=np.float32)
                n = s.shape[0] if s.ndim else 1
                totals["loss"] += float(loss) * n
                weights = position_weights(mask, student[self.output])
                if self.pooled:  # the cosine of the pooled embeddings, as the loss compares them
                    s, t = (mean_pool(torch.from_numpy(x), weights).numpy() for x in (s, t))
                elif weights is not None:  # the cosine of the real positions only
                    s, t = s * weights.numpy()[..., None], t * weights.numpy()[..., None]
                s2, t2 = s.reshape(n, -1), t.reshape(n, -1)
                if self.classes:  # per sample: the fraction of its class positions where the arg-max agrees
                    totals["agree"] += float(np.mean(s.argmax(-1) == t.argmax(-1))) * n
                denom = np.linalg.norm(s2, axis=1) * np.linalg.norm(t2, axis=1)
                totals["cosine"] += float(np.sum(np.sum(s2 * t2, axis=1) / np.maximum(denom, 1e-12)))
                if self.labels and self.labels in feeds and self.classes:
                    target = np.asarray(feeds[self.labels]).reshape(-1)
                    totals["correct"] += float(np.sum(s.reshape(target.size, -1).argmax(1) == target))
                    labelled += target.size
                samples += n
        if not samples:
            raise InputError("evaluation data is empty")
        out = {"loss": totals["loss"] / samples, "cosine": totals["cosine"] / samples}
        if self.classes:
            out["agreement"] = totals["agree"] / samples
        if labelled:
            out["accuracy"] = totals["correct"] / labelled
        return out


def shuffled_batches(data: DataSource, names: list[str], batch: int, rng: np.random.Generator,
                     extra: tuple[str, ...] = (), drop_partial: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch` rows, mixed within blocks of `SHUFFLE_ROWS` samples: the order changes
    every epoch (drawn from `rng`) while memory stays bounded by the block. Rows are only mixed with
    rows of the same shapes (token batches padded to different lengths stay apart)."""
    pools: dict[tuple, _Pool] = {}
    held = 0
    for chunk in iter_batches(data, names, batch, extra=extra):
        rows = _row_count(chunk)
        key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in chunk.items()))
        pools.setdefault(key, _Pool()).add(chunk, rows)
        held += rows
        if held >= SHUFFLE_ROWS:
            for pool in pools.values():
                yield from pool.drain(batch, rng, keep_partial=True)
            held = sum(pool.rows for pool in pools.values())
    for pool in pools.values():
        yield from pool.drain(batch, rng, keep_partial=False, drop_partial=drop_partial)


class _Pool:
    """Rows of one shape waiting to be shuffled into batches."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0

    def add(self, chunk: dict[str, np.ndarray], rows: int) -> None:
        self.chunks.append(chunk)
        self.rows += rows

    def drain(self, batch: int, rng: np.random.Generator, keep_partial: bool, drop_partial: bool = False
              ) -> Iterator[dict[str, np.ndarray]]:
        """Shuffled full batches; the last partial one is kept for later, yielded or dropped."""
        if not self.rows:
            return
        block = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}
        order = rng.permutation(self.rows)
        full = self.rows // batch * batch
        end = full if keep_partial or drop_partial else self.rows
        for start in range(0, end, batch):
            yield {k: v[order[start:start + batch]] for k, v in block.items()}
        rest = order[full:] if keep_partial else order[:0]
        self.chunks = [{k: v[rest] for k, v in block.items()}] if len(rest) else []
        self.rows = len(rest)


def _row_count(chunk: dict[str, np.ndarray]) -> int:
    counts = {int(v.shape[0]) if np.ndim(v) else -1 for v in chunk.values()}
    if len(counts) != 1 or -1 in counts:
        raise InputError(f"data: arrays need one leading sample axis of equal length, got shapes "
                         f"{ {k: tuple(np.shape(v)) for k, v in chunk.items()} }")
    return counts.pop()


def check_pair(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    """Student and teacher must take the same inputs and give the same outputs (names, ranks,
    element types); sizes may differ only where the student was pruned, never at the outputs."""
    for kind in ("input", "output"):
        s, t = _signature(student, kind), _signature(teacher, kind)
        if list(s) != list(t):
            raise InputError(f"student and teacher {kind}s differ: student has {', '.join(s) or 'none'}, "
                             f"teacher has {', '.join(t) or 'none'}")
        for name in s:
            (s_rank, s_type), (t_rank, t_type) = s[name], t[name]
            if s_rank != t_rank or s_type != t_type:
                raise InputError(f"{kind} {name}: student has rank {s_rank} {_type_name(s_type)}, teacher has "
                                 f"rank {t_rank} {_type_name(t_type)}")


def _signature(model: onnx.ModelProto, kind: str) -> dict[str, tuple[int | None, int]]:
    inits = {t.name for t in model.graph.initializer}
    values = model.graph.input if kind == "input" else model.graph.output
    out = {}
    for vi in values:
        if vi.name in inits:
            continue
        tensor = vi.type.tensor_type
        out[vi.name] = (len(tensor.shape.dim) if tensor.HasField("shape") else None, tensor.elem_type)
    return out


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "untyped"


def check_match(student: onnx.ModelProto, teacher: onnx.ModelProto, match: tuple[str, ...]) -> None:
    """Every `--match` tensor must be computed by a node in both graphs (shapes are checked on
    the first batch: only equal shapes can be matched)."""
    for name in match:
        for role, model in (("student", student), ("teacher", teacher)):
            if not computes(model, name):
                raise InputError(f"--match {name}: no node of the {role} computes a tensor of that name")


def check_feeds(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> None:
    """Data must fit the model inputs: same rank, same kind of element type, fixed sizes equal."""
    from onnx.helper import tensor_dtype_to_np_dtype

    declared = {vi.name: vi.type.tensor_type for vi in model.graph.input}
    for name, array in inputs.items():
        tensor = declared[name]
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            if array.ndim != len(dims) or any(d is not None and d != a for d, a in zip(dims, array.shape)):
                wanted = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
                raise InputError(f"data for input {name} has shape {tuple(array.shape)}; the model expects {wanted}")
        expected = np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else array.dtype
        if expected != array.dtype:
            raise InputError(f"data for input {name} is {array.dtype}; the model expects {expected}")


def _batch_size(model: onnx.ModelProto, requested: int | None) -> int:
    fixed = batch_size_for(model, default=0)
    if requested is not None and fixed and requested != fixed:
        raise InputError(f"batch {requested}: the model's inputs fix the batch size to {fixed}")
    return requested or fixed or DEFAULT_BATCH
