"""Every data form, from Python and from the command line, streamed batch by batch."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calib_models import dense_chain
from onnxprune.cli import main
from onnxprune.data import batch_size_for, iter_batches
from onnxprune.errors import InputError
from onnxprune.passes.stats import Statistics

N = 10


@pytest.fixture(scope="module")
def arrays():
    return np.random.default_rng(0).standard_normal((N, 6)).astype(np.float32)


def _forms(tmp_path, x):
    """Each on-disk form holding the same N samples of input `x`."""
    np.savez(tmp_path / "one.npz", x=x, label=np.arange(N))
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", x=x[:4])
    np.savez(shards / "b.npz", x=x[4:])
    np.save(tmp_path / "x.npy", x)
    pb = tmp_path / "pb"
    for k in range(N):
        folder = pb / f"test_data_set_{k}"
        folder.mkdir(parents=True)
        (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x[k:k + 1], "x").SerializeToString())
    return {"npz": str(tmp_path / "one.npz"), "dir": str(shards), "npy": f"x:{tmp_path / 'x.npy'}",
            "pb": str(pb)}


def _rows(batches):
    return np.concatenate([b["x"] for b in batches])


def test_every_file_form_yields_the_same_samples_in_bounded_batches(tmp_path, arrays):
    for form, spec in _forms(tmp_path, arrays).items():
        batches = list(iter_batches(spec, ["x"], batch_size=3))
        assert all(len(b["x"]) <= 3 for b in batches), form
        np.testing.assert_array_equal(_rows(batches), arrays, err_msg=form)


def test_python_forms_dict_iterable_and_calibration_reader(arrays):
    chunks = [{"x": arrays[:5]}, {"x": arrays[5:]}]

    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(chunks)

        def get_next(self):
            return next(self.items, None)

    for data in ({"x": arrays}, chunks, (c for c in chunks), Reader()):
        np.testing.assert_array_equal(_rows(iter_batches(data, ["x"])), arrays)


def test_limit_and_extra_keys(tmp_path, arrays):
    spec = _forms(tmp_path, arrays)["npz"]
    batches = list(iter_batches(spec, ["x"], batch_size=4, extra=("label",), limit=6))
    assert sum(len(b["x"]) for b in batches) == 6
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.arange(6))


def test_bad_data_is_a_one_line_input_error(tmp_path, arrays):
    np.savez(tmp_path / "wrong.npz", y=arrays)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="no data for model input"):
        list(iter_batches(str(tmp_path / "wrong.npz"), ["x"]))
    with pytest.raises(InputError, match="object arrays"):
        list(iter_batches(str(tmp_path / "obj.npz"), ["x"]))
    with pytest.raises(InputError, match="cannot read"):
        list(iter_batches(f"x:{tmp_path / 'obj.npy'}", ["x"]))
    with pytest.raises(InputError, match="not found"):
        list(iter_batches(str(tmp_path / "missing.npz"), ["x"]))


def test_batch_size_follows_a_fixed_leading_dimension():
    model = dense_chain("Gemm")
    assert batch_size_for(model) == 32
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert batch_size_for(model) == 1


def test_every_form_works_from_the_command_line(tmp_path, arrays, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(dense_chain("Gemm"), model)
    results, forms = [], _forms(tmp_path, arrays)
    for form, spec in forms.items():
        out = tmp_path / f"{form}.stats.npz"
        assert main(["stats", str(model), "--data", spec, "-o", str(out), "--quiet"]) == 0, capsys.readouterr()
        results.append(Statistics.load(out))
    assert all(r.samples == N for r in results)
    for r in results[1:]:
        for slot, s in r.slots.items():
            np.testing.assert_allclose(s.sum, results[0].slots[slot].sum, rtol=1e-9)
    assert main(["verify", str(model), str(model), "--data", forms["dir"]]) == 0
    code = main(["stats", str(model), "--data", str(tmp_path / "nothing.npz"), "-o", str(tmp_path / "s.npz")])
    assert code == 2 and "not found" in capsys.readouterr().err
