"""Write-back of TrainableGraph: after training, the model is the same graph with new initializer
values only (structure compared with payloads blanked), in every float dtype and storage form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # 2 shared cores: torch spin-waits with more threads

from builders import PAYLOADS, GraphBuilder, small_cnn, structure  # noqa: E402

from onnxprune.errors import InputError  # noqa: E402
from onnxprune.ir import load_model, save_model  # noqa: E402
from onnxprune.train import TrainableGraph, max_relative_error  # noqa: E402
from onnxprune.verify import random_inputs  # noqa: E402

def payload_form(init: TensorProto) -> tuple[str, ...]:
    return tuple(f for f in PAYLOADS if (init.HasField(f) if f == "raw_data" else len(getattr(init, f)) > 0))


def sgd_steps(g: TrainableGraph, feeds: dict, steps: int = 3, lr: float = 0.05, adam: bool = False) -> None:
    """A few optimizer steps on the (scale-free) mean square of the float outputs."""
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(list(g.parameters()), lr=lr)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    for _ in range(steps):
        opt.zero_grad()
        out = g(tensors)
        # scale-free: random-init exports can have outputs near 1e-10 (mobilenet_v3)
        loss = sum((v.float() ** 2).mean() / (v.detach().float() ** 2).mean().clamp_min(1e-30)
                   for v in out.values() if v.is_floating_point())
        loss.backward()
        opt.step()


def assert_only_values_changed(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert structure(before) == structure(after)
    changed = 0
    for a, b in zip(before.graph.initializer, after.graph.initializer):
        assert payload_form(a) == payload_form(b), a.name
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        assert x.dtype == y.dtype and x.shape == y.shape
        changed += int(not np.array_equal(x, y))
    assert changed > 0


def test_small_cnn_write_back_changes_only_values():
    model = small_cnn()
    model.metadata_props.add(key="author", value="test")
    onnx.shape_inference.infer_shapes(model)
    g = TrainableGraph(model)
    feeds = random_inputs(model, batch=2)
    sgd_steps(g, feeds)
    trained = g.to_onnx()
    assert_only_values_changed(model, trained)
    assert trained.metadata_props[0].value == "test"
    assert max_relative_error(g, feeds) <= 1e-5
    onnx.checker.check_model(trained, full_check=True)


def test_batchnorm_statistics_frozen_by_default():
    model = small_cnn()
    g = TrainableGraph(model)
    stats = [n for n, r in g.roles.items() if r == "bn_stat"]
    assert stats and all(g.roles[n] == "bn_param" for n in ("gamma1", "beta2") if n in g.roles)
    before = {n: g.parameters_by_name[n].detach().clone() for n in stats}
    sgd_steps(g, random_inputs(model, batch=2))
    assert all(torch.equal(before[n], g.parameters_by_name[n]) for n in stats)


def _typed(init: TensorProto) -> TensorProto:
    """The same tensor stored in the typed field (float_data / double_data / int32_data)."""
    array = numpy_helper.to_array(init)
    return helper.make_tensor(init.name, init.data_type, array.shape, array.ravel().tolist())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_write_back_dtypes_and_storage(dtype, typed):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    b = GraphBuilder()
    x = b.input([2, 6], dtype=elem)
    w = b.const((b.rng.standard_normal((6, 4)) * 0.5).astype(dtype), "w")
    bias = b.const(b.rng.standard_normal(4).astype(dtype), "b")
    h = b.op("Add", [b.op("MatMul", [x, w]), bias])
    b.output(b.op("Tanh", [h]), dtype=elem)
    model = b.model()
    if typed:
        inits = [_typed(i) for i in model.graph.initializer]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    g = TrainableGraph(model)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 6)).astype(dtype)}
    sgd_steps(g, feeds)
    trained = g.to_onnx()
    assert_only_values_changed(model, trained)
    assert max_relative_error(g, feeds) <= (2e-3 if dtype == np.float16 else 1e-6)


def test_external_data_model(tmp_path):
    model = small_cnn()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    raw = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    with pytest.raises(InputError, match="external data"):
        TrainableGraph(raw)
    loaded = load_model(tmp_path / "m.onnx")
    g = TrainableGraph(loaded)
    feeds = random_inputs(loaded, batch=2)
    sgd_steps(g, feeds)
    assert_only_values_changed(loaded, g.to_onnx())
    save_model(g.to_onnx(), tmp_path / "t.onnx", external_data=True)
    assert max_relative_error(load_model(tmp_path / "t.onnx"), feeds) <= 1e-5


def test_shared_bias_through_identity_is_one_tensor():
    """The legacy exporter shares equal biases through Identity: one trainable tensor, two readers."""
    b = GraphBuilder()
    x = b.input([2, 4])
    bias = b.const(np.zeros(4, np.float32), "bias")
    alias = b.op("Identity", [bias])
    h1 = b.op("Add", [b.op("MatMul", [x, b.weight([4, 4])]), bias])
    h2 = b.op("Add", [b.op("MatMul", [h1, b.weight([4, 4])]), alias])
    b.output(h2)
    model = b.model()
    g = TrainableGraph(model)
    assert sorted(g.roles) == sorted(i.name for i in model.graph.initializer) and len(g.roles) == 3
    feeds = random_inputs(model, batch=2)
    g({"x": torch.from_numpy(feeds["x"])})[h2].sum().backward()
    second = g.parameters_by_name[model.graph.node[3].input[1]]
    # d(sum h2)/d bias = batch (direct reader) + batch * row sums of the second weight (through h1)
    assert torch.allclose(g.parameters_by_name[bias].grad, 2.0 + 2.0 * second.detach().sum(1))


def test_unsupported_op_named_at_construction():
    b = GraphBuilder()
    x = b.input([2, 4])
    b.output(b.op("Relu", [b.op("Det", [b.op("Reshape", [x, b.const(np.array([1, 2, 2], np.int64))])])]))
    model = b.model(check=False)
    model.graph.node[1].domain = ""
    with pytest.raises(InputError, match=r"no training rule for op\(s\) Det: nodes Det\d+ \(Det\)"):
        TrainableGraph(model)
