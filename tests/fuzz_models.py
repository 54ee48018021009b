"""Random ONNX graphs and random damage for fuzzing the whole pipeline.

`graph_recipes` draws a recipe (hypothesis) and `build_graph` turns it into a checked model: conv
stacks with residual adds, concats, splits, grouped/depthwise convs, channel shuffles, SE gates,
reshape round trips, NHWC transposes and linear heads, in fp32 or fp16, with static, symbolic or
missing dims. `mutate` damages a model the way broken pipelines do: dropped inputs, wrong shapes,
renamed tensors, corrupted bytes. Weights are He-scaled so fp16 activations stay in range.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from builders import GraphBuilder

BLOCKS = ("conv", "conv_bn", "residual", "concat", "split", "depthwise", "grouped", "shuffle", "se", "reshape",
          "pool", "transpose", "convtranspose", "pad", "channel_slice", "gather_channels", "reduce_gate", "softmax",
          "pad_channels", "resize", "extra_output")
HEADS = ("flatten_gemm", "gap_gemm", "gap_matmul", "conv", "linear_stack", "tokens")
MUTATIONS = ("drop_graph_input", "drop_node_input", "rename_tensor", "wrong_weight_shape", "swap_weight_dims",
             "truncate_weight", "wrong_input_rank", "drop_node", "corrupt_bytes", "truncate_bytes", "bad_attribute",
             "duplicate_output")


@st.composite
def graph_recipes(draw) -> dict:
    return {
        "seed": draw(st.integers(0, 2**16)),
        "dtype": draw(st.sampled_from(["float32", "float16"])),
        "batch": draw(st.sampled_from([1, 2, "N"])),
        "spatial": draw(st.sampled_from([4, 8, "HW"])),
        "width": draw(st.sampled_from([4, 6, 8])),
        "blocks": draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6)),
        "head": draw(st.sampled_from(HEADS)),
    }


class _Builder(GraphBuilder):
    """GraphBuilder with He-scaled weights: activations keep unit scale through deep stacks."""

    def weight(self, shape, prefix: str = "w", scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        std = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.const((self.rng.standard_normal(shape) * std).astype(np.float32), prefix)

    def ints(self, values) -> str:
        return self.const(np.array(values, np.int64), "shape")


def build_graph(recipe: dict) -> onnx.ModelProto:
    """The model a recipe describes; symbolic spatial dims skip blocks that need static ones."""
    b = _Builder(seed=recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    static = isinstance(recipe["spatial"], int)
    s = recipe["spatial"] if static else None
    x = b.input([recipe["batch"], 3, "H" if not static else s, "W" if not static else s])
    c = recipe["width"]
    h = b.op("Relu", [b.conv(x, 3, c)])
    for block in recipe["blocks"]:
        h, c, s = _block(b, rng, block, h, c, s, static)
    head = recipe["head"] if static or recipe["head"] != "flatten_gemm" else "gap_gemm"
    _head(b, head, h, c, s)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    model = b.model()
    return to_float16(model) if recipe["dtype"] == "float16" else model


def _block(b: _Builder, rng: np.random.Generator, block: str, h: str, c: int, s, static: bool):
    """Append one block; returns the new (tensor, channels, spatial size)."""
    if block == "conv":
        c2 = max(2, c + int(rng.integers(-2, 3)))
        return b.op("Relu", [b.conv(h, c, c2)]), c2, s
    if block == "conv_bn":
        return b.op("Relu", [b.bn(b.conv(h, c, c, bias=False), c)]), c, s
    if block == "residual":
        return b.op("Add", [h, b.op("Relu", [b.conv(h, c, c)])]), c, s
    if block == "concat":
        k = int(rng.integers(2, 5))
        parts = [h, b.op("Relu", [b.conv(h, c, k)])]
        return b.op("Concat", parts[::-1] if rng.random() < 0.5 else parts, axis=1), c + k, s
    if block == "split" and c >= 4:
        left, right = b.op("Split", [h, b.ints([c // 2, c - c // 2])], n_out=2, axis=1)
        return b.op("Concat", [right, b.op("Relu", [b.conv(left, c // 2, c // 2)])], axis=1), c, s
    if block == "depthwise":
        return b.op("Relu", [b.conv(h, c, c, group=c)]), c, s
    if block == "grouped" and c % 2 == 0:
        return b.op("Relu", [b.conv(h, c, c, group=2)]), c, s
    if block == "shuffle" and c % 2 == 0:
        return _shuffle(b, h, c, s), c, s
    if block == "se":
        squeeze = b.op("GlobalAveragePool", [h])
        mid = max(c // 2, 1)
        gate = b.op("Sigmoid", [b.conv(b.op("Relu", [b.conv(squeeze, c, mid, k=1, pad=0)]), mid, c, k=1, pad=0)])
        return b.op("Mul", [h, gate]), c, s
    if block == "reshape":
        flat = b.op("Relu", [b.op("Reshape", [h, b.ints([0, c, -1])])])
        back = b.ints([0, c, s, s]) if static else b.op("Shape", [h])
        return b.op("Reshape", [flat, back]), c, s
    if block == "pool" and (s is None or s >= 4):
        op = "MaxPool" if rng.random() < 0.5 else "AveragePool"
        return b.op(op, [h], kernel_shape=[2, 2], strides=[2, 2]), c, (s // 2 if s else None)
    if block == "transpose":
        nhwc = b.op("Transpose", [h], perm=[0, 2, 3, 1])
        scaled = b.op("Mul", [nhwc, b.const((rng.random(c) + 0.5).astype(np.float32), "scale")])
        return b.op("Transpose", [scaled], perm=[0, 3, 1, 2]), c, s
    if block == "convtranspose":  # upsample then pool back: same spatial size
        w = b.weight([c, c, 2, 2], scale=1 / np.sqrt(4 * c))
        up = b.op("Relu", [b.op("ConvTranspose", [h, w, b.weight([c], "b", 0.1)], kernel_shape=[2, 2], strides=[2, 2])])
        return b.op("MaxPool", [up], kernel_shape=[2, 2], strides=[2, 2]), c, s
    if block == "pad":  # explicit Pad, then a valid conv: same spatial size
        padded = b.op("Pad", [h, b.ints([0, 0, 1, 1, 0, 0, 1, 1])])
        return b.op("Relu", [b.conv(padded, c, c, pad=0)]), c, s
    if block == "channel_slice" and c >= 4:  # a constant channel range feeds a branch
        part = b.op("Slice", [h, b.ints([0]), b.ints([c // 2]), b.ints([1])])
        return b.op("Add", [h, b.op("Relu", [b.conv(part, c // 2, c)])]), c, s
    if block == "gather_channels":  # a constant channel permutation
        return b.op("Gather", [h, b.ints(rng.permutation(c).tolist())], axis=1), c, s
    if block == "reduce_gate":
        return b.op("Mul", [h, b.op("Sigmoid", [b.op("ReduceMean", [h], axes=[2, 3], keepdims=1)])]), c, s
    if block == "softmax":  # normalises over the channels: must freeze them
        return b.op("Softmax", [h], axis=1), c, s
    if block == "pad_channels":  # zero channels padded on: the count changes along the way
        return b.op("Pad", [h, b.ints([0, 1, 0, 0, 0, 1, 0, 0])]), c + 2, s
    if block == "resize":  # nearest upsample, then pool back
        up = b.op("Resize", [h, "", b.const(np.array([1, 1, 2, 2], np.float32), "scales")], mode="nearest")
        return b.op("MaxPool", [up], kernel_shape=[2, 2], strides=[2, 2]), c, s
    if block == "extra_output":  # an intermediate tensor is also a graph output
        b.output(h)
        return b.op("Relu", [b.conv(h, c, c)]), c, s
    return h, c, s


def _shuffle(b: _Builder, h: str, c: int, s) -> str:
    """ShuffleNet's channel shuffle with two groups: reshape, swap the group axes, reshape back."""
    split = b.op("Reshape", [h, b.ints([0, 2, c // 2, -1])])
    swapped = b.op("Transpose", [split], perm=[0, 2, 1, 3])
    back = b.ints([0, c, s, s]) if s is not None else b.op("Shape", [h])
    return b.op("Reshape", [swapped, back])


def _head(b: _Builder, head: str, h: str, c: int, s) -> None:
    if head == "flatten_gemm":
        b.gemm(b.op("Flatten", [h], axis=1), c * s * s, 5)
    elif head == "gap_gemm":
        b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1), c, 5)
    elif head == "gap_matmul":
        f = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
        b.op("Add", [b.op("MatMul", [f, b.weight([c, 5], scale=1 / np.sqrt(c))]), b.weight([5], "b", 0.1)])
    elif head == "conv":
        b.conv(h, c, 3, k=1, pad=0)
    elif head == "tokens":  # [N, C, H, W] -> tokens [N, HW, C] -> MatMul, LayerNorm, mean over tokens
        t = b.op("Transpose", [b.op("Reshape", [h, b.ints([0, c, -1])])], perm=[0, 2, 1])
        t = b.op("Relu", [b.op("Add", [b.op("MatMul", [t, b.weight([c, 8], scale=1 / np.sqrt(c))]),
                                       b.weight([8], "b", 0.1)])])
        t = b.op("LayerNormalization", [t, b.const(np.ones(8, np.float32)), b.weight([8], "b", 0.1)], axis=-1)
        t = b.op("MatMul", [t, b.weight([8, 6], scale=1 / np.sqrt(8))])
        b.gemm(b.op("ReduceMean", [t], axes=[1], keepdims=0), 6, 5)
    else:  # linear_stack: gemm, residual matmul, gemm
        f = b.op("Relu", [b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1), c, 8)])
        f = b.op("Add", [f, b.op("Relu", [b.op("MatMul", [f, b.weight([8, 8], scale=1 / np.sqrt(8))])])])
        b.gemm(f, 8, 5)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model stored and computed in fp16 (weights, inputs, outputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = {name for n in out.graph.node if n.op_type == "Resize" for name in n.input[1:]}  # roi, scales: fp32
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in list(out.graph.input) + list(out.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del out.graph.value_info[:]
    onnx.checker.check_model(out, full_check=True)
    return out


# --- damage --------------------------------------------------------------------------------------

def mutate(model: onnx.ModelProto, kind: str, seed: int) -> bytes:
    """Serialized bytes of `model` damaged by one mutation of the given kind."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    weights = [t for t in g.initializer if len(t.dims) >= 1]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if kind == "drop_graph_input":
        del g.input[:]
    elif kind == "drop_node_input":
        node = pick(g.node)
        node.input[int(rng.integers(len(node.input)))] = pick(["", "missing_tensor"])
    elif kind == "rename_tensor":
        node = pick(g.node)
        node.output[0] = pick([node.input[0], "renamed", g.node[0].output[0]])
    elif kind == "wrong_weight_shape":
        t = pick(weights)
        array = numpy_helper.to_array(t)
        grown = np.concatenate([array, array[:1]], axis=0) if array.shape[0] else array
        t.CopyFrom(numpy_helper.from_array(grown, t.name))
    elif kind == "swap_weight_dims":
        t = pick([w for w in weights if len(w.dims) >= 2] or weights)
        dims = list(t.dims)
        t.ClearField("dims")
        t.dims.extend(dims[::-1])
    elif kind == "truncate_weight":
        t = pick(weights)
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    elif kind == "wrong_input_rank":
        dims = g.input[0].type.tensor_type.shape.dim
        if len(dims):
            del dims[-1]
    elif kind == "drop_node":
        del g.node[int(rng.integers(len(g.node)))]
    elif kind == "bad_attribute":
        node = pick([n for n in g.node if n.attribute] or list(g.node))
        if node.attribute:
            attr = pick(node.attribute)
            if attr.type == onnx.AttributeProto.INT:
                attr.i = int(rng.choice([-1, 0, 7, 1 << 40]))
            elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
                attr.ints[int(rng.integers(len(attr.ints)))] = int(rng.choice([-3, 0, 99]))
    elif kind == "duplicate_output":
        g.node[-1].output[0] = g.node[0].output[0]
    data = bytearray(m.SerializeToString())
    if kind == "corrupt_bytes":
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[pos] = int(rng.integers(256))
    elif kind == "truncate_bytes":
        data = data[: int(rng.integers(1, len(data)))]
    return bytes(data)


def plant_dead_channels(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy whose group-1 convs (all but the last) output some all-zero channels, bias included."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in [n for n in out.graph.node if n.op_type == "Conv"][:-1]:
        if any(a.name == "group" and a.i > 1 for a in node.attribute) or node.input[1] not in inits:
            continue
        for k, name in enumerate(node.input[1:3]):
            if not name:
                continue
            array = numpy_helper.to_array(inits[name]).copy()
            if k == 0:
                rows = rng.choice(array.shape[0], size=max(1, array.shape[0] // 3), replace=False)
            array[rows] = 0
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
    return out


# --- judging one run ---------------------------------------------------------------------------

def symbolic_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    from onnxprune.verify import random_inputs

    return random_inputs(model, seed, batch=2, dims={"N": 2, "H": 8, "W": 8})


def runs_in_ort(model: onnx.ModelProto, feeds) -> list[np.ndarray] | None:
    """The model's outputs, or None when ONNX Runtime refuses the (damaged) model."""
    from onnxprune.verify import session

    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a damaged model's run errors are expected, not news
    try:
        return session(model).run(None, feeds, quiet)
    except Exception:
        return None


def prune_case(source, lossless: bool = False, **options) -> str:
    """Prune `source` and judge the outcome: 'pruned' (valid and exact) or 'refused' (clean InputError).

    Anything else raises: an internal error, a model failing the full checker, an output differing
    from the consumer-masked reference (or, with `lossless`, from the original).
    """
    import onnxprune
    from onnxprune.errors import InputError
    from onnxprune.ir import load_model

    try:
        result = onnxprune.prune(source, lossless=lossless, **options)
    except InputError as exc:
        assert "\n" not in str(exc).strip(), f"multi-line error: {exc}"
        return "refused"
    onnx.checker.check_model(result.model, full_check=True)
    original = load_model(source)
    feeds = symbolic_feeds(original)
    expected = runs_in_ort(original, feeds)
    if expected is None:
        return "pruned"
    actual = runs_in_ort(result.model, feeds)
    assert actual is not None, "the original runs in ONNX Runtime, the pruned model does not"
    if not lossless and _prunes_lossy_group(original, result):  # e.g. LayerNorm statistics change
        assert [a.shape for a in actual] == [e.shape for e in expected]
        return "pruned"
    if not lossless:
        from reference import masked_reference

        expected = runs_in_ort(masked_reference(original, result), feeds)
    half = original.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        scale = max(1.0, float(np.max(np.abs(want.astype(np.float64))))) if want.size else 1.0
        tol = (2e-2 if half else 1e-4) * scale
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=0, atol=tol)
    return "pruned"


def _prunes_lossy_group(original: onnx.ModelProto, result) -> bool:
    """Whether the plan removes channels of a group the rules mark lossy-only (no exact reference)."""
    import onnxprune

    analysis = onnxprune.analyze(original)
    units = result.plan.resolve(analysis)
    return any(g.lossy_only and len(units.get(g.id, [])) for g in analysis.groups)
