"""One tiny graph per op family: TrainableGraph's torch forward against ONNX Runtime (optimisations
off, tight tolerance), and gradients finite and non-zero where the op has one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # 2 shared cores: torch spin-waits with more threads

from builders import GraphBuilder  # noqa: E402

from onnxprune.errors import InputError  # noqa: E402
from onnxprune.train import TrainableGraph, max_relative_error  # noqa: E402

RNG = np.random.default_rng(0)


def check(model: onnx.ModelProto, feeds: dict | None = None, tol: float = 1e-5, grad: bool = True) -> TrainableGraph:
    """Torch matches ORT within `tol`; a weighted sum of the float outputs has finite gradients
    with respect to float inputs and trainable weights, not all zero (when `grad`)."""
    g = TrainableGraph(model)
    if feeds is None:
        feeds = {}
        for vi in model.graph.input:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = RNG.standard_normal(shape).astype(np.float32)
    assert max_relative_error(g, feeds) <= tol
    tensors = {k: torch.tensor(v, requires_grad=v.dtype.kind == "f" and grad) for k, v in feeds.items()}
    out = g(tensors)
    if not grad:
        return g
    loss = sum((v * torch.from_numpy(RNG.standard_normal(tuple(v.shape))).to(v.dtype)).sum()
               for v in out.values() if v.is_floating_point())
    loss.backward()
    grads = [t.grad for t in [*tensors.values(), *g.parameters()] if t.grad is not None]
    assert grads and all(bool(torch.isfinite(x).all()) for x in grads)
    assert any(bool((x != 0).any()) for x in grads)
    return g


def one_op(op: str, shapes: list, opset: int = 17, consts: tuple = (), out_type=TensorProto.FLOAT,
           n_out: int = 1, out_shape: list | None = None, checked: bool = True, **attrs) -> onnx.ModelProto:
    """A graph of one node: float inputs x0.. of `shapes`, then constant inputs (arrays; None = omitted)."""
    b = GraphBuilder(opset=opset)
    names = [b.input(s, f"x{i}") for i, s in enumerate(shapes)]
    names += ["" if c is None else b.const(np.asarray(c)) for c in consts]
    outs = b.op(op, names, n_out=n_out, **attrs)
    for o in ([outs] if n_out == 1 else outs):
        b.output(o, out_type, out_shape)
    return b.model(check=checked)


def f32(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def i64(*values):
    return np.array(values, np.int64)


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("attrs", [{}, {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, {"transB": 1}])
def test_gemm(attrs):
    a_shape = [4, 3] if attrs.get("transA") else [3, 4]
    w = f32(5, 4) if attrs.get("transB") else f32(4, 5)
    check(one_op("Gemm", [a_shape], consts=(w, f32(5)), **attrs))


def test_matmul_batched_and_einsum():
    check(one_op("MatMul", [[2, 3, 4]], consts=(f32(4, 5),)))
    check(one_op("Einsum", [[2, 3, 4], [2, 4, 5]], equation="bij, bjk -> bik"))


# ------------------------------------------------------------------------------------------ conv


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]}, {"pads": [0, 1, 2, 1], "strides": [2, 2]}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, {"dilations": [2, 2], "group": 2}, {"auto_pad": "VALID"},
])
def test_conv2d(attrs):
    group = attrs.get("group", 1)
    check(one_op("Conv", [[2, 4, 9, 9]], consts=(f32(6, 4 // group, 3, 3), f32(6)), **attrs))


def test_conv1d_and_3d():
    check(one_op("Conv", [[2, 3, 10]], consts=(f32(4, 3, 3),), pads=[1, 0]))
    check(one_op("Conv", [[1, 2, 5, 5, 5]], consts=(f32(3, 2, 3, 3, 3), f32(3)), pads=[1] * 6))


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "pads": [1, 0, 1, 2], "output_padding": [1, 1]}, {"strides": [2, 2], "output_shape": [10, 11]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, {"group": 2, "dilations": [2, 1]},
])
def test_conv_transpose(attrs):
    group = attrs.get("group", 1)
    check(one_op("ConvTranspose", [[2, 4, 5, 5]], consts=(f32(4, 6 // group, 3, 3), f32(6)), **attrs))


# ------------------------------------------------------------------------------------------ pool


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1, "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0], "strides": [2, 1]}),
    ("AveragePool", {"kernel_shape": [3], "auto_pad": "SAME_UPPER", "strides": [2]}),
    ("LpPool", {"kernel_shape": [2, 2], "p": 2}),
    ("GlobalAveragePool", {}), ("GlobalMaxPool", {}), ("GlobalLpPool", {"p": 3}),
])
def test_pools(op, attrs):
    shape = [2, 3, 7] if len(attrs.get("kernel_shape", [0, 0])) == 1 else [2, 3, 7, 8]
    check(one_op(op, [shape], **attrs))


# ------------------------------------------------------------------------------------------ norms


def test_batch_norm_inference_form():
    bn = one_op("BatchNormalization", [[2, 3, 4, 4]], consts=(f32(3) + 1, f32(3), f32(3), np.abs(f32(3)) + 0.5))
    g = check(bn)
    assert sorted(g.roles.values()) == ["bn_param", "bn_param", "bn_stat", "bn_stat"]


@pytest.mark.parametrize("opset,axis", [(17, -1), (17, 1), (18, 2)])
def test_layer_norm(opset, axis):
    shape = [2, 3, 4]
    norm = shape[axis:] if axis != -1 else shape[-1:]
    check(one_op("LayerNormalization", [shape], opset, consts=(f32(*norm) + 1, f32(*norm)), axis=axis), tol=2e-5)


def test_layer_norm_scale_broadcast_and_stats_outputs():
    model = one_op("LayerNormalization", [[2, 3, 4]], consts=(f32(1, 4) + 1,), n_out=3, axis=1)
    check(model, tol=2e-5)


@pytest.mark.parametrize("opset,per", [(18, 2), (21, 6)])
def test_group_norm(opset, per):
    check(one_op("GroupNormalization", [[2, 6, 3, 3]], opset, consts=(f32(per) + 1, f32(per)), num_groups=2,
                 out_shape=[2, 6, 3, 3], checked=opset != 18), tol=2e-5)  # 18's form is deprecated, still run


def test_instance_rms_lp_norm():
    check(one_op("InstanceNormalization", [[2, 3, 5, 5]], consts=(f32(3) + 1, f32(3))), tol=2e-5)
    check(one_op("RMSNormalization", [[2, 3, 4]], 23, consts=(f32(4) + 1,)), tol=2e-5)
    check(one_op("LpNormalization", [[2, 5]], axis=1))


# ------------------------------------------------------------------------------------------ element-wise

UNARY = ["Relu", "Sigmoid", "Tanh", "Exp", "Abs", "Neg", "Erf", "Sin", "Cos", "Softsign", "Softplus", "Mish",
         "Atan", "Sinh", "Asinh"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    check(one_op(op, [[2, 3, 4]], 18 if op == "Mish" else 17, out_shape=[2, 3, 4]))


@pytest.mark.parametrize("op,attrs", [
    ("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.7}), ("Selu", {}), ("Celu", {"alpha": 0.5}),
    ("ThresholdedRelu", {"alpha": 0.3}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("HardSwish", {}),
])
def test_activations_with_attributes(op, attrs):
    check(one_op(op, [[2, 3, 4]], **attrs))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate):
    check(one_op("Gelu", [[2, 3, 4]], 20, approximate=approximate))


def test_positive_domain_unary():
    feeds = {"x0": np.abs(f32(2, 3)) + 0.5}
    for op in ("Sqrt", "Log", "Reciprocal", "Acosh"):
        check(one_op(op, [[2, 3]]), {"x0": feeds["x0"] + (1.0 if op == "Acosh" else 0.0)})
    for op in ("Floor", "Ceil", "Round", "Sign"):
        check(one_op(op, [[2, 3]]), grad=False)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu"])
def test_broadcast_binary(op):
    check(one_op(op, [[2, 3, 4], [3, 1]]))


def test_pow_and_mod():
    check(one_op("Pow", [[2, 3]], consts=(np.array(2.0, np.float32),)), {"x0": np.abs(f32(2, 3)) + 0.1})
    check(one_op("Mod", [[2, 3], [2, 3]], fmod=1), {"x0": f32(2, 3) * 4, "x1": np.full((2, 3), 0.7, np.float32)})


@pytest.mark.parametrize("op", ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"])
def test_comparisons_select_with_where(op):
    """Comparison (16's Greater/LessOrEqual included) feeding Where, masking as attention does."""
    b = GraphBuilder(opset=16)
    x, y = b.input([2, 3], "x"), b.input([2, 3], "y")
    mask = b.op(op, [x, b.const(np.array(0.0, np.float32))])
    b.output(b.op("Where", [b.op("Not", [b.op("Xor", [mask, b.op("And", [mask, b.op("Or", [mask, mask])])])]), x, y]))
    feeds = {"x": np.array([[0.0, 1, -1], [2, 0, -3]], np.float32), "y": f32(2, 3)}
    check(b.model(), feeds)


def test_integer_division_and_casts():
    b = GraphBuilder()
    x = b.input([2, 3], "x")
    ints = b.op("Cast", [b.op("Mul", [x, b.const(np.array(10.0, np.float32))])], to=TensorProto.INT64)
    q = b.op("Div", [ints, b.const(np.array(3, np.int64))])
    back = b.op("CastLike", [q, x])
    b.output(b.op("Add", [x, back]))
    check(b.model(), {"x": np.array([[-1.0, 0.55, 2.1], [-0.35, 0.99, 0.2]], np.float32)})


def test_clip_attributes_and_inputs():
    feeds = {"x0": np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)}
    check(one_op("Clip", [[2, 5]], 6, min=-0.3, max=0.4), feeds)
    check(one_op("Clip", [[2, 5]], 13, consts=(np.array(-0.3, np.float32), np.array(0.4, np.float32))), feeds)
    check(one_op("Clip", [[2, 5]], 13, consts=(None, np.array(0.4, np.float32))), feeds)


def test_dropout_inference_and_identity():
    b = GraphBuilder()
    x = b.input([2, 3], "x")
    y, mask = b.op("Dropout", [x, b.const(np.array(0.5, np.float32))], n_out=2)
    b.output(b.op("Identity", [y]))
    b.output(mask, TensorProto.BOOL)
    check(b.model())


def test_is_nan_is_inf():
    check(one_op("IsNaN", [[4]], out_type=TensorProto.BOOL), {"x0": np.array([1, np.nan, np.inf, 0], np.float32)},
          grad=False)
    check(one_op("IsInf", [[4]], out_type=TensorProto.BOOL, detect_negative=0),
          {"x0": np.array([1, -np.inf, np.inf, 0], np.float32)}, grad=False)


# ------------------------------------------------------------------------------------------ reductions


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"])
@pytest.mark.parametrize("opset", [17, 18])
def test_reductions_axes_attribute_and_input(op, opset):
    as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    consts = (i64(1, -1),) if as_input else ()
    attrs = {} if as_input else {"axes": [1, -1]}
    check(one_op(op, [[2, 3, 4]], opset, consts=consts, keepdims=0, **attrs))


def test_reduce_all_and_noop():
    check(one_op("ReduceMean", [[2, 3]], 18))
    check(one_op("ReduceSum", [[2, 3]], 18, noop_with_empty_axes=1))


@pytest.mark.parametrize("opset,axis", [(11, 1), (13, -1), (13, 1)])
def test_softmax(opset, axis):
    check(one_op("Softmax", [[2, 3, 4]], opset, axis=axis))
    check(one_op("LogSoftmax", [[2, 3, 4]], opset, axis=axis))


def test_argmax_and_cumsum():
    check(one_op("ArgMax", [[3, 4]], out_type=TensorProto.INT64, axis=1, keepdims=0), grad=False)
    check(one_op("ArgMin", [[3, 4]], 12, out_type=TensorProto.INT64, axis=0, select_last_index=1), grad=False)
    check(one_op("CumSum", [[3, 4]], consts=(np.array(1, np.int64),)))
    check(one_op("CumSum", [[3, 4]], consts=(np.array(0, np.int32),), exclusive=1, reverse=1))


# ------------------------------------------------------------------------------------------ shapes


def test_dynamic_reshape_target_from_shape_arithmetic():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as exporters write a dynamic batch."""
    b = GraphBuilder()
    x = b.input(["N", 3, 4], "x")
    batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [x]), b.const(np.array(0, np.int64))], axis=0),
                               b.const(i64(0))])
    target = b.op("Concat", [batch, b.const(i64(-1))], axis=0)
    h = b.op("Reshape", [x, target])
    b.output(b.op("MatMul", [h, b.weight([12, 5])]))
    model = b.model()
    for n in (1, 3):
        check(model, {"x": f32(n, 3, 4)})


def test_reshape_allowzero_shape_start_end_size():
    b = GraphBuilder(opset=19)
    x = b.input([2, 3, 4], "x")
    part = b.op("Shape", [x], start=1, end=-1)  # [3]
    full = b.op("Concat", [b.const(i64(0)), part, b.const(i64(4))], axis=0)
    kept = b.op("Reshape", [x, full])  # allowzero 0: the 0 copies dim 0
    empty = b.op("Reshape", [b.const(np.zeros((0, 3), np.float32)), b.const(i64(3, 0))], allowzero=1)
    size = b.op("Cast", [b.op("Size", [empty])], to=TensorProto.FLOAT)
    b.output(b.op("Add", [kept, size]))
    check(b.model())


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_attribute_and_input(opset):
    b = GraphBuilder(opset=opset)
    x = b.input([2, 1, 3], "x")
    if opset < 13:
        y = b.op("Unsqueeze", [b.op("Squeeze", [x], axes=[1])], axes=[0, -1])
    else:
        y = b.op("Unsqueeze", [b.op("Squeeze", [x, b.const(i64(1))]), b.const(i64(0, -1))])
    b.output(b.op("Squeeze", [y]))
    check(b.model())


@pytest.mark.parametrize("opset,attrs,consts", [
    (11, {"split": [1, 3]}, ()), (13, {}, (i64(3, 1),)), (18, {"num_outputs": 2}, ()), (17, {}, ()),
])
def test_split_forms(opset, attrs, consts):
    check(one_op("Split", [[2, 4]], opset, consts=consts, n_out=2, axis=1, **attrs))


def test_split_num_outputs_uneven():
    check(one_op("Split", [[5, 2]], 18, n_out=3, num_outputs=3))


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [100], [1], [1]), ([-1, 0], [-100, 2], [2, 0], [-1, 1]), ([0], [5], [-1], [2]), ([3], [0], [1], [-2]),
])
def test_slice(starts, ends, axes, steps):
    check(one_op("Slice", [[3, 5, 6]], consts=(i64(*starts), i64(*ends), i64(*axes), i64(*steps))))


def test_gather_forms_embedding_grad():
    b = GraphBuilder()
    ids = b.input([2, 3], "ids", TensorProto.INT64)
    b.output(b.op("Gather", [b.weight([10, 4], "emb"), ids], axis=0))
    g = check(b.model(), {"ids": np.array([[1, -1, 3], [0, 9, 3]], np.int64)})
    assert sorted(r for r in g.roles.values()) == ["param"]
    check(one_op("Gather", [[3, 5]], consts=(np.array(-2, np.int64),), axis=1))
    check(one_op("GatherElements", [[3, 4]], consts=(np.array([[0, 3], [1, -1], [2, 2]], np.int64),), axis=1))


@pytest.mark.parametrize("batch_dims,indices", [
    (0, [[[1, 2], [0, -1]], [[2, 0], [1, 1]]]), (1, [[[1], [3]], [[0], [-1]], [[2], [2]]]),
])
def test_gather_nd(batch_dims, indices):
    b = GraphBuilder(opset=13)
    ids = b.input(list(np.shape(indices)), "ids", TensorProto.INT64)
    b.output(b.op("GatherND", [b.weight([3, 4, 5], "table"), ids], batch_dims=batch_dims))
    check(b.model(), {"ids": np.array(indices, np.int64)})


@pytest.mark.parametrize("time_axis", [0, 1])
def test_reverse_sequence(time_axis):
    shape = [4, 3, 2] if time_axis == 0 else [3, 4, 2]
    check(one_op("ReverseSequence", [shape], consts=(np.array([4, 1, 2], np.int64),), time_axis=time_axis,
                 batch_axis=1 - time_axis))


def test_transpose_concat_expand_tile():
    b = GraphBuilder()
    x = b.input([2, 1, 3], "x")
    t = b.op("Transpose", [x], perm=[2, 0, 1])
    e = b.op("Expand", [t, b.const(i64(1, 4))])
    tiled = b.op("Tile", [e, b.const(i64(1, 2, 1))])
    b.output(b.op("Concat", [tiled, b.op("Transpose", [b.op("Transpose", [tiled])])], axis=0))
    check(b.model())


def test_range_constant_of_shape_trilu_constant():
    b = GraphBuilder()
    x = b.input([4, 4], "x")
    n = b.op("Gather", [b.op("Shape", [x]), b.const(np.array(1, np.int64))], axis=0)
    r = b.op("Cast", [b.op("Range", [b.const(np.array(0, np.int64)), n, b.const(np.array(1, np.int64))])],
             to=TensorProto.FLOAT)
    ones = b.op("ConstantOfShape", [b.op("Shape", [x])], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    mask = b.op("Trilu", [ones, b.const(np.array(1, np.int64))], upper=0)
    c = b.op("Constant", [], value_floats=[0.5, 0.25, 1.0, 2.0])
    frange = b.op("Range", [b.const(np.array(0.5, np.float32)), b.const(np.array(2.0, np.float32)),
                            b.const(np.array(0.4, np.float32))])
    y = b.op("Add", [b.op("Mul", [b.op("Mul", [x, mask]), c]), r])
    b.output(b.op("Add", [y, b.op("ReduceSum", [frange], keepdims=1)]))
    check(b.model())


@pytest.mark.parametrize("mode, opset", [(mode, opset) for mode in ("constant", "reflect", "edge", "wrap")
                                          for opset in (18, 19) if mode != "wrap" or opset >= 19])  # wrap: opset 19
def test_pad_modes(mode, opset):
    consts = (i64(1, 2, 0, 2), np.array(0.5, np.float32), i64(1, 3))
    check(one_op("Pad", [[2, 3, 4, 5]], opset, consts=consts, mode=mode))
    check(one_op("Pad", [[2, 5]], opset, consts=(i64(0, 2, 1, -1),), mode=mode))


def test_pad_opset2_attributes():
    check(one_op("Pad", [[2, 3]], 10, pads=[1, 0, 0, 2], value=0.3))


def test_one_hot_and_non_zero():
    b = GraphBuilder()
    ids = b.input([2, 3], "ids", TensorProto.INT64)
    b.output(b.op("OneHot", [ids, b.const(np.array(4, np.int64)), b.const(np.array([0.1, 2.0], np.float32))], axis=1))
    check(b.model(), {"ids": np.array([[0, 3, -1], [1, 2, 9]], np.int64)}, grad=False)
    check(one_op("NonZero", [[2, 3]], out_type=TensorProto.INT64), {"x0": np.array([[0, 1, 0], [2, 0, 3]], np.float32)},
          grad=False)


# ------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("mode,coord,nearest", [
    ("nearest", "asymmetric", "floor"), ("nearest", "half_pixel", "round_prefer_floor"),
    ("nearest", "align_corners", "round_prefer_ceil"), ("nearest", "pytorch_half_pixel", "ceil"),
    ("linear", "half_pixel", None), ("linear", "align_corners", None), ("linear", "pytorch_half_pixel", None),
    ("linear", "asymmetric", None), ("cubic", "half_pixel", None), ("cubic", "align_corners", None),
])
def test_resize_scales(mode, coord, nearest):
    attrs = {"mode": mode, "coordinate_transformation_mode": coord}
    if nearest:
        attrs["nearest_mode"] = nearest
    scales = np.array([1, 1, 2.0, 1.5], np.float32)
    check(one_op("Resize", [[1, 2, 4, 5]], 13, consts=(None, scales), **attrs))
    check(one_op("Resize", [[1, 2, 8, 6]], 13, consts=(None, np.array([1, 1, 0.5, 0.75], np.float32)), **attrs))


def test_resize_sizes_cubic_exclude_outside_and_axes():
    check(one_op("Resize", [[1, 2, 4, 5]], 13, consts=(None, None, i64(1, 2, 7, 3)), mode="cubic",
                 exclude_outside=1, cubic_coeff_a=-0.5))
    check(one_op("Resize", [[1, 2, 4, 5]], 18, consts=(None, None, i64(8, 9)), mode="linear", axes=[2, 3],
                 keep_aspect_ratio_policy="not_larger"))
    check(one_op("Resize", [[1, 2, 4, 5]], 19, consts=(None, np.array([2.0, 1.5], np.float32)), mode="linear",
                 axes=[-2, -1], coordinate_transformation_mode="half_pixel_symmetric"))


def test_upsample_and_resize10():
    check(one_op("Upsample", [[1, 2, 3, 4]], 9, consts=(np.array([1, 1, 2, 3], np.float32),)))
    check(one_op("Resize", [[1, 2, 3, 4]], 10, consts=(np.array([1, 1, 2, 1.5], np.float32),), mode="linear"))
    check(one_op("Resize", [[1, 2, 3, 4]], 10, consts=(np.array([1, 1, 2, 3], np.float32),)))


# ------------------------------------------------------------------------------------------ recurrent

T, B, I, H = 4, 3, 5, 6


def recurrent(op: str, direction: str = "forward", layout: int = 0, bias: bool = True, states: bool = False,
              lengths: bool = False, peepholes: bool = False, **attrs) -> tuple[onnx.ModelProto, dict]:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    b = GraphBuilder(opset=14)
    x = b.input([B, T, I] if layout else [T, B, I], "x")
    feeds = {"x": f32(*([B, T, I] if layout else [T, B, I]), scale=1.0)}
    ins = [x, b.weight([dirs, gates * H, I]), b.weight([dirs, gates * H, H])]
    ins.append(b.weight([dirs, 2 * gates * H]) if bias or peepholes else "")
    ins.append(b.const(np.array([4, 2, 3], np.int32)) if lengths else "")
    n_states = 2 if op == "LSTM" else 1
    for k in range(n_states):
        if states:
            shape = [B, dirs, H] if layout else [dirs, B, H]
            ins.append(b.input(shape, f"s{k}"))
            feeds[f"s{k}"] = f32(*shape)
        else:
            ins.append("")
    if peepholes:
        ins.append(b.weight([dirs, 3 * H]))
    while ins[-1] == "":
        ins.pop()
    outs = b.op(op, ins, n_out=1 + n_states, hidden_size=H, direction=direction, layout=layout, **attrs)
    for o in outs:
        b.output(o)
    return b.model(), feeds


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_directions(op, direction):
    check(*recurrent(op, direction))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_layout_states_lengths(op):
    """ONNX Runtime refuses layout=1, so batch-major is checked against the ORT-checked layout 0."""
    check(*recurrent(op, "bidirectional", states=True, lengths=True))
    seq_major, feeds = recurrent(op, "bidirectional", states=True)
    g0 = check(seq_major, feeds)
    batch_major, _ = recurrent(op, "bidirectional", layout=1, states=True)
    g1 = TrainableGraph(batch_major)
    out0 = list(g0({k: torch.from_numpy(v) for k, v in feeds.items()}).values())
    out1 = list(g1({k: torch.from_numpy(v).transpose(0, 1) for k, v in feeds.items()}).values())
    assert torch.allclose(out1[0], out0[0].permute(2, 0, 1, 3))
    assert all(torch.allclose(a, b.transpose(0, 1)) for a, b in zip(out1[1:], out0[1:]))


def test_gru_linear_before_reset_and_clip():
    check(*recurrent("GRU", "bidirectional", linear_before_reset=1))
    check(*recurrent("GRU", clip=0.5))
    check(*recurrent("LSTM", clip=0.7, bias=False))


def test_lstm_peepholes_input_forget_activations():
    check(*recurrent("LSTM", "bidirectional", peepholes=True))
    check(*recurrent("LSTM", input_forget=1))
    check(*recurrent("RNN", "bidirectional", activations=["Relu", "LeakyRelu"], activation_alpha=[0.2]))
    check(*recurrent("GRU", activations=["HardSigmoid", "Tanh"], activation_alpha=[0.3], activation_beta=[0.4]))


# ------------------------------------------------------------------------------------------ control flow


def test_loop_reads_outer_weight():
    """A body that reads an outer initializer: the weight trains through every iteration."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], f32(3, 3).ravel().tolist())
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "w"], ["mm"]),
         helper.make_node("Tanh", ["mm"], ["h_out"]),
         helper.make_node("Identity", ["h_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2, 3])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["h", "hs"], body=body)], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("hs", TensorProto.FLOAT, [3, 2, 3])],
        [w, helper.make_tensor("n", TensorProto.INT64, [], [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = check(model)
    assert g.parameters_by_name["w"].grad is not None


def test_scan_reverse_and_if():
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["s_out", "x_t"], ["y_t"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [3]), helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]), helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [3])])

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["ys"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [3, 4])])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "x"], ["s", "ys"], body=body, num_scan_inputs=1,
                          scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[1]),
         helper.make_node("If", ["c"], ["z"], then_branch=branch("then", "Tanh"), else_branch=branch("else", "Neg"))],
        "scan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]), helper.make_tensor_value_info("s0", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for cond in (True, False):
        check(model, {"x": f32(3, 4), "s0": f32(3), "c": np.array(cond)})


# ------------------------------------------------------------------------------------------ opset-23 attention


@pytest.mark.parametrize("attrs,mask", [
    ({}, None), ({"is_causal": 1}, "bool"), ({"scale": 0.3, "softcap": 2.0}, "float"),
])
def test_attention_gqa_4d(attrs, mask):
    b = GraphBuilder(opset=23)
    q, k, v = b.input([2, 4, 5, 8], "q"), b.input([2, 2, 5, 8], "k"), b.input([2, 2, 5, 6], "v")
    feeds = {"q": f32(2, 4, 5, 8, scale=1.0), "k": f32(2, 2, 5, 8, scale=1.0), "v": f32(2, 2, 5, 6)}
    inputs = [q, k, v]
    if mask == "bool":
        inputs.append(b.input([2, 1, 5, 5], "m", TensorProto.BOOL))
        feeds["m"] = RNG.random((2, 1, 5, 5)) > 0.3
        feeds["m"][..., 0] = True
    elif mask == "float":
        inputs.append(b.input([5, 5], "m"))
        feeds["m"] = f32(5, 5)
    b.output(b.op("Attention", inputs, **attrs), shape=[2, 4, 5, 6])
    check(b.model(), feeds)


def test_attention_3d_with_past():
    b = GraphBuilder(opset=23)
    names = [b.input([2, 3, 16], "q"), b.input([2, 3, 8], "k"), b.input([2, 3, 8], "v"), "",
             b.input([2, 2, 4, 4], "pk"), b.input([2, 2, 4, 4], "pv")]
    y, pk, pv = b.op("Attention", names, n_out=3, q_num_heads=4, kv_num_heads=2)
    b.output(y, shape=[2, 3, 16])
    b.output(pk, shape=[2, 2, 7, 4])
    b.output(pv, shape=[2, 2, 7, 4])
    check(b.model(), {"q": f32(2, 3, 16), "k": f32(2, 3, 8), "v": f32(2, 3, 8), "pk": f32(2, 2, 4, 4),
                      "pv": f32(2, 2, 4, 4)})


@pytest.mark.parametrize("interleaved,rot,three_d", [(0, 0, False), (1, 4, False), (0, 4, True), (1, 0, True)])
def test_rotary_embedding(interleaved, rot, three_d):
    b = GraphBuilder(opset=23)
    shape = [2, 5, 24] if three_d else [2, 3, 5, 8]
    x = b.input(shape, "x")
    half = (rot or 8) // 2
    angles = np.arange(10)[:, None] * (0.5 ** np.arange(half))[None]
    cos, sin = b.const(np.cos(angles).astype(np.float32)), b.const(np.sin(angles).astype(np.float32))
    ids = b.input([2, 5], "ids", TensorProto.INT64)
    attrs = {"num_heads": 3} if three_d else {}
    b.output(b.op("RotaryEmbedding", [x, cos, sin, ids], interleaved=interleaved, rotary_embedding_dim=rot, **attrs),
             shape=shape)
    check(b.model(), {"x": f32(*shape), "ids": RNG.integers(0, 10, (2, 5)).astype(np.int64)})


# ------------------------------------------------------------------------------------------ QDQ, errors


def test_dequantize_scale_trains():
    b = GraphBuilder(opset=13)
    x = b.input([2, 4], "x")
    q = b.op("QuantizeLinear", [x, b.const(np.array(0.05, np.float32)), b.const(np.array(3, np.uint8))])
    w = b.op("DequantizeLinear", [b.const(RNG.integers(-100, 100, (4, 3)).astype(np.int8)),
                                  b.const(np.array([0.01, 0.02, 0.03], np.float32)),
                                  b.const(np.zeros(3, np.int8))], axis=1)
    x2 = b.op("DequantizeLinear", [q, b.const(np.array(0.05, np.float32)), b.const(np.array(3, np.uint8))])
    b.output(b.op("MatMul", [x2, w]))
    g = check(b.model(), grad=False)
    check(b.model(), {"x": f32(2, 4)})
    assert "param" in g.roles.values()


def _ints(dtype, *shape):
    info = np.iinfo(dtype)
    return RNG.integers(max(info.min, -60), min(info.max, 200), shape).astype(dtype)


def test_integer_ops_forward():
    """Quantized integer ops run (no gradient flows through integers; float layers around them train).
    u8 weights: with s8 weights ONNX Runtime's QLinearConv differs from the ONNX reference evaluator
    (which the engine matches exactly)."""
    b = GraphBuilder(opset=13)
    x = b.input([2, 3, 6, 6], "x")
    xq, xs, xz = b.op("DynamicQuantizeLinear", [x], n_out=3)
    y = b.op("ConvInteger", [xq, b.const(_ints(np.uint8, 4, 3, 3, 3)), xz, b.const(np.array(120, np.uint8))],
             pads=[1, 1, 1, 1])
    qc = b.op("QLinearConv", [xq, xs, xz, b.const(_ints(np.uint8, 4, 3, 3, 3)), b.const(np.array([0.01, 0.02, 0.01, 0.03], np.float32)),
                              b.const(np.array(100, np.uint8)), b.const(np.array(0.5, np.float32)), b.const(np.array(7, np.uint8)),
                              b.const(_ints(np.int32, 4))], strides=[2, 2])
    flat = b.op("Reshape", [xq, b.const(i64(-1, 6))])
    mm = b.op("MatMulInteger", [flat, b.const(_ints(np.uint8, 6, 5)), xz, b.const(np.array(3, np.uint8))])
    qm = b.op("QLinearMatMul", [flat, xs, xz, b.const(_ints(np.uint8, 6, 5)), b.const(np.full(5, 0.02, np.float32)),
                                b.const(np.full(5, 9, np.uint8)), b.const(np.array(0.3, np.float32)), b.const(np.array(3, np.uint8))])
    for out in (y, qc, mm, qm):
        b.output(b.op("Cast", [out], to=TensorProto.FLOAT))
    check(b.model(), grad=False)


def test_foreign_domain_refused_with_every_node():
    b = GraphBuilder()
    x = b.input([2, 3], "x")
    y = b.op("Relu", [x])
    b.nodes.append(helper.make_node("FusedGemm", [y], ["z"], name="fg", domain="com.microsoft"))
    b.nodes.append(helper.make_node("Det", ["z"], ["d"], name="det"))
    b.output("d", shape=[])
    model = b.model(check=False, domains={"com.microsoft": 1})
    with pytest.raises(InputError, match=r"no training rule for op\(s\) Det, com.microsoft::FusedGemm: nodes "
                                         r"fg \(com.microsoft::FusedGemm\), det \(Det\)"):
        TrainableGraph(model)


def test_missing_feed_and_unknown_capture_are_input_errors():
    g = TrainableGraph(one_op("Relu", [[2]]))
    with pytest.raises(InputError, match="missing model input"):
        g({})
    with pytest.raises(InputError, match="no tensor named nope"):
        g({"x0": np.zeros(2, np.float32)}, capture=["nope"])


def test_capture_returns_intermediate():
    b = GraphBuilder()
    x = b.input([2, 3], "x")
    h = b.op("Relu", [x])
    b.output(b.op("Neg", [h]))
    out = TrainableGraph(b.model())({"x": np.array([[1, -1, 2], [0, 3, -4]], np.float32)}, capture=[h])
    assert torch.equal(out[h], torch.tensor([[1.0, 0, 2], [0, 3, 0]]))


def test_docs_list_every_registered_op():
    from pathlib import Path

    from onnxprune.train.ops import TORCH_OPS
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    block = text.split("<!-- ops: begin -->")[1].split("<!-- ops: end -->")[0]
    assert [op.strip() for op in block.replace("\n", " ").split(",")] == sorted(TORCH_OPS)
