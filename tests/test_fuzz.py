"""Fuzzing in CI: random graphs prune exactly against their reference, damaged models prune or are
refused cleanly. Derandomized (the same examples every run); `benchmarks/fuzz.py` runs long random
campaigns, and the cases they find are pinned here with @example."""

import tempfile
from importlib import resources
from pathlib import Path

import onnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz_models import MUTATIONS, build_graph, graph_recipes, mutate, plant_dead_channels, prune_case
from onnxprune.cli import main

CI = settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))

OPTIONS = st.fixed_dictionaries({
    "ratio": st.sampled_from([0.25, 0.5, 0.75]),
    "scope": st.sampled_from(["local", "global"]),
    "criterion": st.sampled_from(["l1", "l2", "random"]),
    "round_to": st.sampled_from([1, 1, 2]),
    "seed": st.integers(0, 3),
})
DIGITS = resources.files("onnxprune") / "data" / "digits_cnn.onnx"


def _recipe(blocks, head, width=8, spatial=4, batch=1, dtype="float32", seed=0) -> dict:
    return {"seed": seed, "dtype": dtype, "batch": batch, "spatial": spatial, "width": width, "blocks": blocks,
            "head": head}


@CI
@given(recipe=graph_recipes(), options=OPTIONS)
# A head whose LayerNorm normalises over pruned channels: lossy by design, judged by shapes only.
@example(recipe=_recipe(["split"], "tokens", width=6, batch=2), options={
    "ratio": 0.75, "scope": "local", "criterion": "l1", "round_to": 1, "seed": 0})
def test_random_graph_prunes_exactly_or_is_refused(recipe, options):
    assert prune_case(build_graph(recipe), **options) in ("pruned", "refused")


@settings(CI, max_examples=80)
@given(recipe=graph_recipes(), seed=st.integers(0, 100))
def test_random_graph_lossless_keeps_outputs(recipe, seed):
    model = plant_dead_channels(build_graph(recipe), seed)
    assert prune_case(model, lossless=True) == "pruned"


@settings(CI, max_examples=300)
@given(recipe=graph_recipes(), kind=st.sampled_from(MUTATIONS), seed=st.integers(0, 2**16))
# An input of the wrong rank once left an axis of size 0 that the grouping indexed (IndexError).
@example(recipe=_recipe(["residual", "se", "grouped"], "gap_gemm", dtype="float16", batch=2, seed=473),
         kind="wrong_input_rank", seed=23833)
# A weight that does not fit its MatMul behind a run-time Reshape: only shape inference with data
# propagation sees it; it used to surface as "pruned model fails the checker (a bug)".
@example(recipe=_recipe(["conv_bn", "reshape", "pool", "reshape"], "gap_matmul", width=4, spatial="HW",
                        batch="N", dtype="float16", seed=272), kind="wrong_weight_shape", seed=1851)
# A payload cut in half: the checker's weight-free copy cannot see it, the loader must.
@example(recipe=_recipe(["concat", "shuffle", "concat", "shuffle", "concat"], "conv", spatial=8, seed=34889),
         kind="truncate_weight", seed=82)
# A grown Gemm weight: refused by the input's full check instead of failing the output check.
@example(recipe=_recipe(["grouped", "grouped"], "flatten_gemm", batch="N", seed=53436), kind="wrong_weight_shape",
         seed=3)
# A corrupted byte inside a node name (invalid UTF-8) crashed the export (UnicodeDecodeError).
@example(recipe=_recipe(["se", "conv", "split", "se", "extra_output", "split"], "gap_gemm", width=6, spatial="HW",
                        batch=2, seed=2206), kind="corrupt_bytes", seed=38222)
def test_damaged_model_is_pruned_or_refused(recipe, kind, seed):
    damaged = mutate(build_graph(recipe), kind, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damaged.onnx"
        path.write_bytes(damaged)
        assert prune_case(str(path)) in ("pruned", "refused")
        assert path.read_bytes() == damaged


@settings(CI, max_examples=40)
@given(kind=st.sampled_from(MUTATIONS), seed=st.integers(0, 2**16))
def test_damaged_real_model_through_the_cli(kind, seed, capsys):
    """The packaged digits CNN (a trained export), damaged: exit 0 with a valid model, or exit 2 with
    one line; never an internal error, never a partial output, never a changed input."""
    damaged = mutate(onnx.load(str(DIGITS)), kind, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        path.write_bytes(damaged)
        code = main(["prune", str(path), "-o", str(out)])
        err = capsys.readouterr().err
        assert code in (0, 2), err
        if code == 0:
            onnx.checker.check_model(onnx.load(out), full_check=True)
        else:
            assert not out.exists()
            assert len(err.strip().splitlines()) == 1 and "could not process" not in err, err
        assert path.read_bytes() == damaged
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted(["in.onnx"] + (["out.onnx"] if code == 0 else []))


LOCATIONS = st.one_of(
    st.sampled_from(["w.bin", "./w.bin", "sub/w.bin", "../outside.bin", "sub/../../outside.bin", "/etc/hostname",
                     "link.bin", "hard.bin", "sub", "", ".", "w.bin\0", "C:w.bin", "sub\\..\\..\\outside.bin",
                     "w.bin/", "//w.bin", "sub//w.bin", "linkdir/w.bin"]),
    st.text(st.sampled_from("./\\w.bin\0:~"), max_size=16))
NUMBERS = st.one_of(st.none(), st.integers(-5, 5000).map(str), st.sampled_from(["", "1e3", "0x10", " 4", "+4", "٣"]))


@settings(CI, max_examples=150)
@given(location=LOCATIONS, offset=NUMBERS, length=NUMBERS)
def test_external_reference_loads_exactly_or_is_refused(location, offset, length):
    """Whatever the reference says, the loader either reads exactly the declared bytes of a regular,
    singly linked file inside the model's directory, or refuses with an InputError."""
    import os

    import numpy as np
    from onnx import TensorProto, helper

    from onnxprune.errors import InputError
    from onnxprune.ir import load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "model"
        (base / "sub").mkdir(parents=True)
        payload = np.arange(1024, dtype=np.float32)
        for name in ("w.bin", "sub/w.bin"):
            (base / name).write_bytes(payload.tobytes())
        (root / "outside.bin").write_bytes(b"\xff" * 8192)
        (base / "link.bin").symlink_to(root / "outside.bin")
        (base / "linkdir").symlink_to(base / "sub", target_is_directory=True)
        (base / "other.bin").write_bytes(payload.tobytes())
        os.link(base / "other.bin", base / "hard.bin")
        node = helper.make_node("Relu", ["w"], ["y"])
        graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])])
        tensor = graph.initializer.add()
        tensor.name, tensor.data_type, tensor.data_location = "w", TensorProto.FLOAT, TensorProto.EXTERNAL
        tensor.dims.append(16)
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            if value is not None:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        model = helper.make_model(graph)
        path = base / "m.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            loaded = load_model(str(path))
        except InputError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            return
        data = loaded.graph.initializer[0].raw_data
        start = int(offset or 0)
        assert len(data) == 64
        assert data == payload.tobytes()[start:start + 64]  # only w.bin / sub/w.bin hold these bytes
        assert Path(location).as_posix() in ("w.bin", "sub/w.bin")  # no other way to the file was accepted
