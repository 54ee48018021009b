"""Distillation on Ray Train: data-parallel PyTorch, one teacher ONNX Runtime session per worker.

Every worker reads the same data in the same shuffled order (one seed), cuts each global batch of
`batch` rows into `workers` equal slices and trains on its slice: the teacher runs on the slice only,
and the gradients are averaged over the workers (gloo all-reduce, as DistributedDataParallel does)
before every Adam step, so the weights stay equal on every worker and follow the single-process run
at the same global batch up to floating-point order. The step, the losses, the shuffling and the
evaluation are those of `onnxprune.train.distill`; only the gradient averaging is added here.
"""

from __future__ import annotations

import tempfile

import onnx

from onnxprune.errors import InputError
from onnxprune.ray.cluster import connected, require_ray, worker_errors


class AveragedGradients:
    """An optimizer wrapper: `step()` first averages every parameter's gradient over the workers
    (one flat all-reduce), then steps; what DDP does, for a model that is not an `nn.Module`."""

    def __init__(self, optimizer, params: list, world: int) -> None:
        self.optimizer, self.params, self.world = optimizer, params, world
        self.param_groups = optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        self.optimizer.step()


def _mean_over_workers(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def check_batch(student: onnx.ModelProto, batch: int, world: int) -> None:
    """Each worker takes batch / world rows of every global batch: both must allow it."""
    from onnxprune.data import batch_size_for

    if batch_size_for(student, default=0):
        raise InputError("distill on Ray needs a free batch axis: each worker runs batch / workers rows")
    if batch % world:
        raise InputError(f"batch {batch} must be a multiple of --workers {world} (each worker takes an equal slice)")


def data_parallel_trainer(rank: int, world: int):
    """`onnxprune.train.distill._Trainer` made data-parallel: gradients averaged over the workers,
    each global batch cut into `world` equal slices of which this worker trains on slice `rank`."""
    from onnxprune.train.distill import _Trainer

    class DataParallelTrainer(_Trainer):
        def __init__(self, student, teacher, data, options) -> None:
            super().__init__(student, teacher, data, options)
            check_batch(student, self.batch, world)
            self.fixed_batch = True  # every global batch complete, so every slice has batch / world rows
            params = [self.graph.parameters_by_name[n] for n in self.trainable]
            self.optimizer = AveragedGradients(self.optimizer, params, world)

        def _batches(self, epoch):
            local = self.batch // world
            for inputs, labels in super()._batches(epoch):
                part = slice(rank * local, (rank + 1) * local)
                yield {k: v[part] for k, v in inputs.items()}, (labels[part] if labels is not None else None)

        def engine_error(self):  # rank 0 reports it; the weights are the same on every worker
            return super().engine_error() if rank == 0 else None

        def epoch(self, epoch, deadline):
            record, out_of_time = super().epoch(epoch, deadline)
            if record is not None:  # the loss over the whole global batch, and its sample count
                record.loss = _mean_over_workers(record.loss)
                record.parts = {k: _mean_over_workers(v) for k, v in sorted(record.parts.items())}
                self.history.samples *= world
            return record, out_of_time

    return DataParallelTrainer


def train_loop(config: dict) -> None:
    """What each Ray Train worker runs: `run_distillation` with the data-parallel trainer. Every
    worker evaluates (same weights, same figures), so early stopping agrees without messages."""
    import ray
    import ray.train
    import torch

    from onnxprune.train.distill import run_distillation

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    student = onnx.load_model_from_string(config["student"])
    teacher = onnx.load_model_from_string(config["teacher"])
    model, history = run_distillation(student, teacher, config["data"], config["options"], config["eval_data"],
                                      trainer_class=data_parallel_trainer(rank, world))
    if rank == 0:
        ray.get(config["sink"].put.remote((model.SerializeToString(), history)))


def distill(student, teacher, data, *, workers: int = 2, address: str | None = None, eval_data=None,
            options=None, quiet: bool = True):
    """`onnxprune.train.distill.distill` as data-parallel Ray Train on `workers` CPU workers.

    `data` / `eval_data` are re-readable paths (every worker reads them: on a cluster, from a file
    system all nodes see); `options` is a `DistillOptions` (its `batch` is the global batch).
    Returns a `DistillResult`. The last incomplete global batch of an epoch is dropped."""
    ray = require_ray("distill on Ray")
    from onnxprune.ir import load_model
    from onnxprune.data import is_one_shot
    from onnxprune.train.distill import DistillOptions, DistillResult, _batch_size, require_torch

    require_torch("distill on Ray")
    options = options or DistillOptions()
    options.check()
    if options.max_minutes is not None:
        raise InputError("--max-minutes is not supported with --ray")
    if is_one_shot(data) or (eval_data is not None and is_one_shot(eval_data)):
        raise InputError("distill on Ray reads the data on every worker: give paths, not a generator")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    student, teacher = load_model(student), load_model(teacher)
    check_batch(student, _batch_size(student, options.batch), workers)  # here too: refused before Ray starts
    config = {"student": student.SerializeToString(), "teacher": teacher.SerializeToString(),
              "options": options, "data": _absolute(data), "eval_data": _absolute(eval_data)}
    with connected(address, workers + 1, quiet), worker_errors(), tempfile.TemporaryDirectory() as storage:
        sink = ray.remote(num_cpus=0)(_Sink).remote()
        trainer = TorchTrainer(train_loop, train_loop_config=dict(config, sink=sink),
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                               torch_config=TorchConfig(backend="gloo"),
                               run_config=RunConfig(storage_path=storage, name="onnxprune-distill"))
        trainer.fit()
        found = ray.get(sink.get.remote())
    if found is None:
        raise InputError("distill on Ray: the workers returned no model")
    model, history = found
    return DistillResult(onnx.load_model_from_string(model), history)


def _absolute(data):
    """Paths made absolute: Ray workers do not share the driver's working directory."""
    import os
    from pathlib import Path

    if isinstance(data, (str, os.PathLike)) and Path(data).exists():
        return str(Path(data).resolve())
    if isinstance(data, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in data):
        return [_absolute(d) if Path(d).exists() else _pair(d) for d in data]
    return data


def _pair(spec) -> str:
    """`name:file.npy` with the file made absolute."""
    name, _, file = str(spec).partition(":")
    return f"{name}:{_absolute(file)}" if file else str(spec)


class _Sink:
    """Holds what rank 0 hands back (the trained model, the history) until the driver takes it."""

    def __init__(self) -> None:
        self.value = None

    def put(self, value) -> None:
        self.value = value

    def get(self):
        return self.value
