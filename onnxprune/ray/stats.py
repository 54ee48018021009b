"""Calibration statistics on Ray Data: a pool of actors, each with one ONNX Runtime session, sums
its share of the data; the driver merges the partial sums with `Statistics.merge`.

Two inputs: files (any `--data` form: Parquet, tar, .npz, directories of them), where each shard is
one unit of work read by the actor itself in streamed batches; or a `ray.data.Dataset` whose
columns are the model's inputs, cut into blocks of `ROWS_PER_CALL` rows. A unit's partial sum leaves
the actor only when the unit is done, so a unit retried after its actor died is counted once.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError, OnnxPruneError
from onnxprune.ray.cluster import connected, require_ray, worker_errors

ROWS_PER_CALL = 2048
"""Rows of a Ray Dataset per actor call: one partial sum per call, so calls are large."""


class StatsWorker:
    """Ray Data actor: one session; each call sums one shard (or block of rows) into a partial."""

    def __init__(self, model: list, recipe, shards: bool) -> None:
        """`model`: [object-store reference to the serialized model] (nested, so the actor's own
        arguments stay small and a restarted actor fetches the model again)."""
        import ray

        from onnxprune.passes.stats import Accumulator

        self.recipe, self.shards, self.error = recipe, shards, ""
        try:  # an actor whose constructor raises would be restarted forever: report on the first call
            self.accumulator = Accumulator(onnx.load_model_from_string(ray.get(model[0])), recipe)
        except OnnxPruneError as exc:
            self.error = str(exc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from onnxprune.passes.stats import Statistics

        if self.error:
            return _row(b"", self.error)
        partial = Statistics(self.recipe.fingerprint)
        try:
            for sub in self._batches(batch):
                self.accumulator.add(partial, sub)
        except OnnxPruneError as exc:
            return _row(b"", str(exc))
        return _row(pickle.dumps(partial), "")

    def _batches(self, batch):
        from onnxprune.data import iter_batches

        size = self.recipe.batch_size
        if self.shards:
            for shard in batch["shard"]:
                yield from iter_batches(str(shard), self.recipe.inputs, size)
        else:
            rows = len(next(iter(batch.values())))
            arrays = {k: np.asarray(v) for k, v in batch.items() if k in self.recipe.inputs}
            for start in range(0, rows, size):
                yield {k: v[start:start + size] for k, v in arrays.items()}


def _row(stats: bytes, error: str) -> dict[str, np.ndarray]:
    return {"stats": np.array([stats], dtype=object), "error": np.array([error], dtype=object)}


def stats(model, data, *, workers: int = 2, address: str | None = None, grams: bool = True,
          batch_size: int | None = None, quiet: bool = True, worker=StatsWorker):
    """Statistics of `model` over `data` (paths in any `--data` form, or a `ray.data.Dataset` with
    one column per model input), computed by `workers` Ray actors; equal to
    `onnxprune.passes.stats.collect` over the same samples up to floating-point summation order.

    Uses the running Ray, else joins `address`, else starts a local Ray for the call. `worker` is
    the actor class (a subclass can add behaviour, e.g. tests that kill a worker)."""
    from onnxprune.api import analyze
    from onnxprune.ir import load_model
    from onnxprune.passes.stats import Recipe, Statistics

    ray = require_ray("onnxprune.ray.stats")
    original = load_model(model)
    recipe = Recipe.of(original, analyze(original), grams, batch_size)
    with connected(address, workers, quiet), worker_errors():
        shards = not isinstance(data, ray.data.Dataset)
        model_ref = ray.put(original.SerializeToString())  # held here until the last partial is merged
        dataset = _shard_dataset(data) if shards else data
        # Ray Data restarts a dead actor and re-runs its unit (its default for actor pools). Actors on a
        # Dataset leave half a CPU each to the upstream read tasks, which would otherwise starve.
        partials = dataset.map_batches(
            worker, batch_size=1 if shards else ROWS_PER_CALL, batch_format="numpy", concurrency=workers,
            num_cpus=1 if shards else 0.5,
            fn_constructor_kwargs={"model": [model_ref], "recipe": recipe, "shards": shards})
        total = Statistics(recipe.fingerprint)
        for row in partials.iter_rows():
            if row["error"]:
                raise InputError(row["error"])
            total = total.merge(pickle.loads(row["stats"]))
    if total.samples == 0:
        raise InputError("no calibration samples were read from the data")
    return total


def shard_paths(data) -> list[str]:
    """The files `data` names, one unit of work each: a file, a directory's data files, or a list."""
    from onnxprune.data import data_files

    items = data if isinstance(data, (list, tuple)) else [data]
    paths: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise InputError("Ray statistics read files (Parquet, tar, .npz, or directories of them) or a "
                             "ray.data.Dataset")
        path = Path(item)
        if path.is_dir():
            found = data_files(path)
            if not found:
                raise InputError(f"{path}: directory holds no .npz, .parquet or .tar files")
            paths += [str(p.resolve()) for p in found]
        elif path.is_file():
            paths.append(str(path.resolve()))
        else:
            raise InputError(f"{path}: data not found (name:file.npy pairs are not sharded; use Parquet or .npz)")
    return paths


def _shard_dataset(data):
    import ray

    paths = shard_paths(data)
    return ray.data.from_items([{"shard": p} for p in paths], override_num_blocks=len(paths))
