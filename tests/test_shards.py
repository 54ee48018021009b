"""Parquet files and WebDataset-style tar shards as `--data`, read in streamed batches, in every
command; bad shards refused in one line naming them. Needs pyarrow for Parquet (no Ray)."""

import io
import json
import sys
import tarfile

import numpy as np
import pytest

from cli_helpers import assert_refused, run
from onnxprune.data import count_samples, iter_batches
from onnxprune.demo import demo_files
from onnxprune.errors import InputError
from onnxprune.passes.stats import Statistics
from onnxprune.shards import write_parquet, write_tar

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def digits():
    model, test, calib = demo_files()
    return model, dict(np.load(test)), dict(np.load(calib))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_all(data, names=("image",), extra=("label",), batch=32):
    batches = list(iter_batches(data, list(names), batch, extra=extra))
    return batches, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_every_parquet_column_form_reads_back_the_arrays(digits, tmp_path):
    _, arrays, _ = digits
    images, labels = arrays["image"][:100], arrays["label"][:100]
    flat = pa.array(list(images.reshape(100, -1)), type=pa.list_(pa.float32()))
    forms = {
        "nested fixed-size lists": write_parquet,
        "flat list + shape metadata": lambda a, p: pq.write_table(pa.table(
            {"image": flat, "label": a["label"]},
            schema=pa.schema([pa.field("image", flat.type, metadata={"shape": "[1, 8, 8]"}),
                              pa.field("label", pa.int64())])), p, row_group_size=30),
        "npy cells": lambda a, p: pq.write_table(pa.table(
            {"image": pa.array([_npy(x) for x in a["image"]], pa.binary()), "label": a["label"]}), p,
            row_group_size=30),
        "fixed_shape_tensor": lambda a, p: pq.write_table(pa.table(
            {"image": pa.FixedShapeTensorArray.from_numpy_ndarray(a["image"]), "label": a["label"]}), p),
        "Ray tensor column read without Ray": lambda a, p: pq.write_table(pa.table(
            {"image": pa.array(list(a["image"].reshape(100, -1)), pa.large_list(pa.float32())), "label": a["label"]},
            schema=pa.schema([pa.field("image", pa.large_list(pa.float32()), metadata={
                "ARROW:extension:name": "ray.data.arrow_tensor_v2", "ARROW:extension:metadata": "[1, 8, 8]"}),
                pa.field("label", pa.int64())])), p),
    }
    for i, (form, write) in enumerate(forms.items()):
        path = tmp_path / f"f{i}.parquet"
        write({"image": images, "label": labels}, path)
        batches, got = _read_all(path)
        assert [len(b["image"]) for b in batches] == [32, 32, 32, 4], form  # rebatched across row groups
        np.testing.assert_array_equal(got["image"], images, err_msg=form)
        np.testing.assert_array_equal(got["label"], labels, err_msg=form)
        assert count_samples(path, ["image"]) == 100


def test_parquet_is_streamed_never_read_whole(digits, tmp_path, monkeypatch):
    _, arrays, _ = digits
    write_parquet(arrays, tmp_path / "a.parquet", rows_per_group=50)

    def refuse(*args, **kwargs):
        raise AssertionError("whole-file read")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    _, got = _read_all(tmp_path / "a.parquet")
    np.testing.assert_array_equal(got["image"], arrays["image"])


def test_tar_shards_plain_and_gzipped_and_lists_of_shards(digits, tmp_path):
    _, arrays, _ = digits
    write_tar(arrays, tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as src, tarfile.open(tmp_path / "b.tar.gz", "w:gz") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
    _, got = _read_all(tmp_path / "a.tar")
    np.testing.assert_array_equal(got["image"], arrays["image"])
    np.testing.assert_array_equal(got["label"], arrays["label"])
    _, both = _read_all([str(tmp_path / "a.tar"), str(tmp_path / "b.tar.gz")])
    np.testing.assert_array_equal(both["image"], np.concatenate([arrays["image"]] * 2))


def test_stats_from_parquet_tar_and_npz_are_the_same(digits, tmp_path, capsys):
    model, _, calib = digits
    (tmp_path / "pq").mkdir()
    write_parquet({k: v[:100] for k, v in calib.items()}, tmp_path / "pq" / "a.parquet")
    write_tar({k: v[100:] for k, v in calib.items()}, tmp_path / "pq" / "b.tar")
    np.savez(tmp_path / "all.npz", **calib)
    for name, data in (("npz", tmp_path / "all.npz"), ("shards", tmp_path / "pq")):
        assert run(["stats", model, "--data", data, "-o", tmp_path / f"{name}.stats.npz", "--quiet"], capsys)[0] == 0
    a, b = Statistics.load(tmp_path / "npz.stats.npz"), Statistics.load(tmp_path / "shards.stats.npz")
    assert a.samples == b.samples == 256
    for slot, s in a.slots.items():
        np.testing.assert_allclose(b.slots[slot].sq, s.sq, rtol=1e-9)
    for name, g in a.grams.items():
        np.testing.assert_allclose(b.grams[name].gram, g.gram, rtol=1e-9, atol=1e-6)


def test_prune_verify_and_sensitivity_accept_shards(digits, tmp_path, capsys):
    model, test, calib = digits
    write_parquet(calib, tmp_path / "calib.parquet")
    write_tar(test, tmp_path / "test.tar")
    pruned = tmp_path / "p.onnx"
    code, out, err = run(["prune", model, "-o", pruned, "--ratio", "0.25", "--data", tmp_path / "calib.parquet",
                          "--recover", "lstsq", "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run(["verify", model, model, "--data", tmp_path / "test.tar"], capsys)
    assert code == 0 and "PASSED" in out, err
    code, out, err = run(["verify", model, pruned, "--data", tmp_path / "test.tar", "--atol", "1e9", "--rtol", "1"],
                         capsys)
    assert code == 0 and "top1 agreement" in out, err
    js = tmp_path / "s.json"
    code, out, err = run(["sensitivity", model, "--data", tmp_path / "test.tar", "--samples", "64", "--ratios", "0.5",
                          "--json", js, "--quiet"], capsys)
    assert code == 0, err
    result = json.loads(js.read_text())
    assert result["samples"] == 64 and result["baseline_accuracy"] is not None


@pytest.mark.parametrize("name, content, needle", [
    ("bad.parquet", b"PAR1 this is not parquet", "not a readable Parquet shard"),
    ("bad.tar", b"not a tar archive at all" * 40, "not a readable tar shard"),
])
def test_a_bad_shard_is_named_in_one_line(digits, tmp_path, capsys, name, content, needle):
    model, _, calib = digits
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(calib, data / "a.parquet")
    (data / name).write_bytes(content)
    err = assert_refused(["stats", model, "--data", data, "-o", tmp_path / "s.npz"], needle, capsys, tmp_path,
                         tmp_path / "s.npz")
    assert name in err


def test_broken_members_and_missing_columns_are_named(digits, tmp_path):
    _, arrays, _ = digits
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        info = tarfile.TarInfo("k0.image.npy")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"junk!"))
    with pytest.raises(InputError, match=r"t\.tar\[k0\.image\.npy\]: not a \.npy array"):
        list(iter_batches(tmp_path / "t.tar", ["image"], 8))
    write_parquet({"pixels": arrays["image"]}, tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p\.parquet: no column named image \(columns: pixels\)"):
        list(iter_batches(tmp_path / "p.parquet", ["image"], 8))


def test_without_pyarrow_parquet_names_the_extra(digits, tmp_path, capsys, monkeypatch):
    model, _, calib = digits
    write_parquet(calib, tmp_path / "a.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert_refused(["stats", model, "--data", tmp_path / "a.parquet", "-o", tmp_path / "s.npz"],
                   "pip install 'onnxprune[parquet]'", capsys, tmp_path, tmp_path / "s.npz")


def test_ray_flag_without_ray_names_the_extra(digits, tmp_path, capsys, monkeypatch):
    model, _, calib = digits
    np.savez(tmp_path / "a.npz", **calib)
    monkeypatch.setitem(sys.modules, "ray", None)
    for args in (["stats", model, "--data", tmp_path / "a.npz", "-o", tmp_path / "s.npz", "--ray"],
                 ["sensitivity", model, "--data", tmp_path / "a.npz", "--ray", "--json", tmp_path / "s.json"],
                 ["distill", model, "--teacher", model, "--data", tmp_path / "a.npz", "-o", tmp_path / "d.onnx",
                  "--ray"]):
        assert_refused(args, "needs the ray extra: pip install 'onnxprune[ray]'", capsys, tmp_path)


def test_distill_reads_parquet_shards(digits, tmp_path, capsys):
    pytest.importorskip("torch")
    model, test, calib = digits
    write_parquet(calib, tmp_path / "calib.parquet")
    write_tar(test, tmp_path / "test.tar")
    out = tmp_path / "d.onnx"
    code, stdout, err = run(["distill", model, "--teacher", model, "--data", tmp_path / "calib.parquet", "-o", out,
                             "--eval-data", tmp_path / "test.tar", "--labels", "label", "--epochs", "1", "--quiet"],
                            capsys)
    assert code == 0, err
    assert out.exists() and "accuracy" in stdout
