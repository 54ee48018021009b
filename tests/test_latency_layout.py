"""ORT's NCHWc layout block in latency tables: measured from ORT's optimized graph, stored in the
table (old tables without it still load), and used for the grid of Conv groups so that
`round_to='auto'` keeps their counts on the block and never below it.

No timing is asserted: counts come from the grid, which does not depend on the measurements.
"""

import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from builders import GraphBuilder
from onnxprune.errors import InputError
from onnxprune.latency import (NCHWC_DOMAIN, AxisCurve, LatencyTable, LayerLatency, compare_latency, layout_block,
                               measure_table)
from onnxprune.verify import random_inputs, session

BLOCK = layout_block()
needs_layout = pytest.mark.skipif(BLOCK is None, reason="ONNX Runtime uses no NCHWc layout on this machine")


def conv_chain(middle: int) -> onnx.ModelProto:
    """x (64 ch) -> 1x1 conv to `middle` channels -> 1x1 conv back to 64."""
    b = GraphBuilder(seed=1)
    h = b.conv(b.input([1, 64, 8, 8]), 64, middle, k=1)
    b.output(b.conv(h, middle, 64, k=1), shape=[1, 64, 8, 8])
    return b.model()


def optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = os.path.join(tmp_path, "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(opts.optimized_model_filepath).graph
    return collections.Counter((n.domain, n.op_type) for n in graph.node)


@needs_layout
def test_layout_block_is_where_a_conv_chain_stays_blocked(tmp_path):
    assert BLOCK >= 4 and BLOCK & (BLOCK - 1) == 0  # ORT pads one output channel to a power-of-two block
    aligned = optimized_ops(conv_chain(BLOCK), tmp_path)
    narrow = optimized_ops(conv_chain(BLOCK // 2), tmp_path)
    assert aligned[(NCHWC_DOMAIN, "Conv")] == 2 and aligned[(NCHWC_DOMAIN, "ReorderOutput")] == 1
    # fewer channels than the block: the second conv reads plain NCHW, so the chain is reordered between
    assert narrow[(NCHWC_DOMAIN, "ReorderOutput")] > aligned[(NCHWC_DOMAIN, "ReorderOutput")]


def conv_then_gemm() -> onnx.ModelProto:
    """conv(3->48) -> relu -> conv(48->24) -> pool -> flatten -> gemm(24->40) -> relu -> gemm(40->4)."""
    b = GraphBuilder(seed=2)
    h = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 48)])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [b.conv(h, 48, 24)])])
    h = b.op("Relu", [b.gemm(h, 24, 40)])
    b.output(b.gemm(h, 40, 4), shape=[1, 4])
    return b.model()


@needs_layout
def test_conv_groups_are_measured_on_the_block_and_auto_keeps_them_there(tmp_path):
    model = conv_then_gemm()
    analysis = onnxprune.analyze(model)
    table = measure_table(model, analysis, threads=1, runs=2)
    assert table.layout_block == BLOCK
    conv_groups = {c.group for l in table.layers if l.op == "Conv" for c in l.curves.values()}
    sizes = {g.key: g.size for g in analysis.prunable}
    for layer in table.layers:
        for curve in layer.curves.values():
            if curve.group in conv_groups:  # multiples of the block (or the full size), none below it
                assert all(n % BLOCK == 0 or n == sizes[curve.group] for n in curve.counts)
                assert min(curve.counts) >= min(BLOCK, sizes[curve.group])
            else:  # Gemm-only group (40 wide): GEMM panels of 8
                assert curve.counts == [8, 16, 24, 32, 40]
    path = tmp_path / "t.json"
    table.save(path)
    result = onnxprune.prune(model, ratio=0.9, round_to="auto", latency_table=str(path))
    kept = {g.key: g.size - len(g.remove) for g in result.plan.groups}
    for key in conv_groups & kept.keys():
        assert kept[key] >= min(BLOCK, sizes[key]) and (kept[key] % BLOCK == 0 or kept[key] == sizes[key])
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(model)
    before = session(model).run(None, feeds)
    after = session(result.model).run(None, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]


def table_json(**extra) -> dict:
    table = LatencyTable("CPUExecutionProvider", 1, "1.0", "test", 2.0,
                         [LayerLatency("conv", "Conv", 1.0, {"out": AxisCurve("g:1", [16, 32], [0.5, 1.0])})])
    data = table.to_json()
    del data["layout_block"]
    return {**data, **extra}


def test_tables_without_a_layout_block_still_load():
    old = LatencyTable.from_json(table_json())
    assert old.layout_block is None and "NCHWc" not in old.setting
    new = LatencyTable.from_json(table_json(layout_block=16))
    assert new.layout_block == 16 and "NCHWc block 16" in new.setting
    assert LatencyTable.from_json(json.loads(json.dumps(new.to_json()))) == new


@pytest.mark.parametrize("bad", [0, -8, "16", 16.5, True])
def test_a_bad_layout_block_is_a_one_line_input_error(bad):
    with pytest.raises(InputError, match="malformed"):
        LatencyTable.from_json(table_json(layout_block=bad))


def test_compare_latency_in_turns_times_both_models():
    model = conv_chain(16)
    feeds = {"x": np.ones([1, 64, 8, 8], np.float32)}
    for turn in (1, 4):
        first, second = compare_latency(model, model, feeds, runs=6, turn=turn)
        assert first > 0 and second > 0

