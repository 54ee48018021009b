"""Sensitivity sweeps on Ray: every (group, ratio) point is one Ray task, `workers` at a time. The model, the
statistics and the evaluation batches with their reference outputs go into the object store once
(`ray.put`); each task prunes and measures with `onnxprune.sensitivity.evaluate_plan`, the same
function the serial run calls, so the curves are equal."""

from __future__ import annotations

import onnx

from onnxprune.progress import progress
from onnxprune.ray.cluster import RETRIES, connected, require_ray, worker_errors


def _evaluate(shared, plan):
    from onnxprune.sensitivity import evaluate_plan

    model, calib, evaluator = shared
    return evaluate_plan(onnx.load_model_from_string(model), plan, calib, evaluator)


def ray_runner(workers: int, evaluate=_evaluate):
    """A `PlanRunner` submitting one Ray task per plan, at most `workers` in flight (retried when
    its worker process dies)."""
    ray = require_ray()
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(evaluate)

    def run(original: onnx.ModelProto, plans, calib, evaluator, quiet: bool = True):
        shared = ray.put((original.SerializeToString(), calib, evaluator))
        results: list = [None] * len(plans)
        with worker_errors():
            finished = _bounded(ray, task, shared, plans, workers)
            for index, value in progress(finished, "sensitivity", quiet, unit="point", total=len(plans)):
                results[index] = value
        return results

    return run


def _bounded(ray, task, shared, plans, limit: int):
    """(index, result) per plan as its task finishes, with at most `limit` tasks in flight."""
    pending: dict = {}
    for index, plan in enumerate(plans):
        if len(pending) >= limit:
            yield _finish_one(ray, pending)
        pending[task.remote(shared, plan)] = index
    while pending:
        yield _finish_one(ray, pending)


def _finish_one(ray, pending: dict):
    (ref,), _ = ray.wait(list(pending), num_returns=1)
    return pending.pop(ref), ray.get(ref)


def sensitivity(model, data=None, *, workers: int = 2, address: str | None = None, quiet: bool = True,
                evaluate=_evaluate, **options):
    """`onnxprune.sensitivity.sensitivity` with the evaluations spread over Ray workers; `options`
    are that function's keywords (ratios, criterion, recover, stats, labels, samples, exclude, seed).
    `evaluate(shared, plan)` is the task body (a wrapper can add behaviour, e.g. in tests)."""
    from onnxprune.sensitivity import sensitivity as serial

    require_ray("onnxprune.ray.sensitivity")
    with connected(address, workers, quiet):
        return serial(model, data, quiet=quiet, runner=ray_runner(workers, evaluate), **options)
