"""Sensitivity sweeps on Ray: every (group, ratio) point is one Ray task. The model, the
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


def ray_runner(evaluate=_evaluate):
    """A `PlanRunner` submitting one Ray task per plan (retried when its worker dies)."""
    ray = require_ray()
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(evaluate)

    def run(original: onnx.ModelProto, plans, calib, evaluator, quiet: bool = True):
        shared = ray.put((original.SerializeToString(), calib, evaluator))
        refs = [task.remote(shared, plan) for plan in plans]
        with worker_errors():
            return [ray.get(ref) for ref in progress(refs, "sensitivity", quiet, unit="point")]

    return run


def sensitivity(model, data=None, *, workers: int = 2, address: str | None = None, quiet: bool = True,
                evaluate=_evaluate, **options):
    """`onnxprune.sensitivity.sensitivity` with the evaluations spread over Ray workers; `options`
    are that function's keywords (ratios, criterion, recover, stats, labels, samples, exclude, seed).
    `evaluate(shared, plan)` is the task body (a wrapper can add behaviour, e.g. in tests)."""
    from onnxprune.sensitivity import sensitivity as serial

    require_ray("onnxprune.ray.sensitivity")
    with connected(address, workers, quiet):
        return serial(model, data, quiet=quiet, runner=ray_runner(evaluate), **options)
