"""Scale-out on a local Ray: statistics with Ray Data actors and sensitivity sweeps as Ray tasks give
the single-process numbers, also after a worker is killed; a bad shard is refused in one line.

Marked `ray`: run in a pytest process of its own (`python -m pytest -m ray`), one local Ray per module.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")
import ray  # noqa: E402

import onnxprune.ray as onnxprune_ray  # noqa: E402
from cli_helpers import run  # noqa: E402
from onnxprune.api import analyze  # noqa: E402
from onnxprune.demo import demo_files  # noqa: E402
from onnxprune.ir import load_model  # noqa: E402
from onnxprune.passes.stats import Statistics, collect  # noqa: E402
from onnxprune.ray.stats import StatsWorker  # noqa: E402
from onnxprune.sensitivity import sensitivity  # noqa: E402
from onnxprune.shards import write_parquet, write_tar  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The digits test split as three Parquet shards and one tar shard; the serial statistics."""
    model, test, _ = demo_files()
    arrays = dict(np.load(test))
    folder = tmp_path_factory.mktemp("shards")
    parts = np.array_split(np.arange(len(arrays["label"])), 4)
    for i, rows in enumerate(parts[:3]):
        write_parquet({k: v[rows] for k, v in arrays.items()}, folder / f"part{i}.parquet", rows_per_group=40)
    write_tar({k: v[parts[3]] for k, v in arrays.items()}, folder / "part3.tar")
    original = load_model(model)
    return model, folder, arrays, collect(original, analyze(original), folder, quiet=True)


def assert_same_stats(a: Statistics, b: Statistics) -> None:
    assert a.fingerprint == b.fingerprint and a.samples == b.samples
    assert a.slots.keys() == b.slots.keys() and a.grams.keys() == b.grams.keys()
    for slot, s in b.slots.items():
        assert a.slots[slot].count == s.count
        for part in ("sum", "abs", "sq", "zeros"):
            np.testing.assert_allclose(getattr(a.slots[slot], part), getattr(s, part), rtol=1e-9, atol=1e-9)
    for name, g in b.grams.items():
        assert a.grams[name].rows == g.rows
        np.testing.assert_allclose(a.grams[name].gram, g.gram, rtol=1e-9, atol=1e-6)


def test_stats_over_a_ray_dataset_equal_the_serial_run(shards):
    model, _, arrays, serial = shards
    dataset = ray.data.from_numpy(arrays["image"]).rename_columns({"data": "image"})
    assert_same_stats(onnxprune_ray.stats(model, dataset, workers=2), serial)


def dies_once_on(shard: str, marker: Path):
    """An actor class that kills its own process the first time it is given `shard`."""

    class DiesOnce(StatsWorker):
        def __call__(self, batch):
            if any(str(s).endswith(shard) for s in batch["shard"]) and not marker.exists():
                marker.write_text("died")
                os._exit(1)
            return super().__call__(batch)

    return DiesOnce


def test_stats_over_shards_equal_the_serial_run_even_when_a_worker_dies(shards, tmp_path):
    model, folder, arrays, serial = shards
    assert serial.samples == len(arrays["label"]) == 450
    marker = tmp_path / "died"
    result = onnxprune_ray.stats(model, folder, workers=2, worker=dies_once_on("part1.parquet", marker))
    assert marker.read_text() == "died"  # the actor process was killed on its first attempt at part1
    assert_same_stats(result, serial)  # ... restarted, part1 re-run, counted once


def test_a_bad_shard_is_named_in_one_line_and_nothing_is_written(shards, tmp_path, capsys):
    model, folder, _, _ = shards
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "part9.parquet").write_bytes(b"PAR1 not really parquet")
    out = tmp_path / "s.npz"
    code, _, err = run(["stats", model, "--data", bad, "-o", out, "--ray", "--quiet"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "part9.parquet" in err and "Traceback" not in err
    assert not out.exists()


def test_sensitivity_on_ray_gives_the_serial_table_json_and_plot(shards, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, folder, _, _ = shards
    outputs = {}
    for mode, extra in (("serial", []), ("ray", ["--ray", "--workers", "2"])):
        js, png = tmp_path / f"{mode}.json", tmp_path / f"{mode}.png"
        code, stdout, err = run(["sensitivity", model, "--data", folder, "--samples", "100", "--ratios", "0.3", "0.6",
                                 "--json", js, "--plot", png, "--quiet", *extra], capsys)
        assert code == 0, err
        outputs[mode] = (stdout.replace(str(js), "").replace(str(png), ""), json.loads(js.read_text()),
                         png.read_bytes())
    assert outputs["ray"] == outputs["serial"]
    assert len(outputs["ray"][1]["groups"]) == 4 and outputs["ray"][1]["samples"] == 100


def dies_once(marker: Path):
    """A task body that kills its worker process on the first point evaluated, then behaves."""
    from onnxprune.ray.sweep import _evaluate

    def evaluate(shared, plan):
        if not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return _evaluate(shared, plan)

    return evaluate


def test_a_killed_sensitivity_task_is_retried(shards, tmp_path):
    model, folder, _, _ = shards
    marker = tmp_path / "died"
    serial = sensitivity(model, folder, ratios=(0.5,), samples=64, quiet=True)
    again = onnxprune_ray.sensitivity(model, folder, ratios=(0.5,), samples=64, evaluate=dies_once(marker))
    assert marker.read_text() == "died"
    assert again.to_json() == serial.to_json()


def _structure(model) -> list:
    """Everything of a model but its weight values: nodes, wiring, attributes, initializer shapes."""
    nodes = [(n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in model.graph.node]
    return [nodes, [(t.name, list(t.dims), t.data_type) for t in model.graph.initializer],
            [i.SerializeToString() for i in model.graph.input], [o.SerializeToString() for o in model.graph.output]]


def test_distill_on_ray_train_follows_the_single_process_run(tmp_path, capsys):
    """Same global batch and epochs: the data-parallel run (2 workers, gloo all-reduce) takes the
    single-process run's steps, so structure is identical and loss and accuracy agree closely."""
    pytest.importorskip("torch")
    import onnxprune
    from onnxprune.demo import accuracy
    from onnxprune.train.distill import distill

    model, test, calib = demo_files()
    pruned = tmp_path / "p.onnx"
    onnxprune.prune(model, ratio=0.5, recover="none", quiet=True).save(pruned)
    single = distill(pruned, model, calib, epochs=2, batch=32, labels="label", quiet=True)
    out, report = tmp_path / "d.onnx", tmp_path / "r.json"
    code, _, err = run(["distill", pruned, "--teacher", model, "--data", calib, "-o", out, "--epochs", "2",
                        "--batch", "32", "--labels", "label", "--report", report, "--quiet", "--ray", "--workers", "2"],
                       capsys)
    assert code == 0, err
    on_ray = load_model(out)
    assert _structure(on_ray) == _structure(single.model)
    history = json.loads(report.read_text())["distill"]
    assert history["samples"] == single.history.samples == 256
    for mine, theirs in zip(history["epochs"], single.history.epochs):
        assert mine["loss"] == pytest.approx(theirs.loss, rel=1e-4)
    with np.load(test) as t:
        acc_single, acc_ray = (accuracy(m, t["image"], t["label"]) for m in (single.model, on_ray))
    assert acc_single > 0.5 and abs(acc_ray - acc_single) <= 0.01


def test_distill_on_ray_refuses_a_batch_the_workers_cannot_split(tmp_path, capsys):
    pytest.importorskip("torch")
    model, _, calib = demo_files()
    out = tmp_path / "d.onnx"
    code, _, err = run(["distill", model, "--teacher", model, "--data", calib, "-o", out, "--batch", "31",
                        "--ray", "--workers", "2"], capsys)
    assert code == 2 and "batch 31 must be a multiple of --workers 2" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_onnxprune_error_in_a_task_comes_back_as_itself():
    from onnxprune.errors import InputError
    from onnxprune.ray.cluster import worker_errors

    @ray.remote
    def refuse():
        raise InputError("node Conv_3 (Conv): bad input")

    with pytest.raises(InputError) as caught, worker_errors():
        ray.get(refuse.remote())
    assert type(caught.value) is InputError and str(caught.value) == "node Conv_3 (Conv): bad input"
