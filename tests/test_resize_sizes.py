"""Resize with `sizes` computed at run time, as the TorchScript exporter writes `interpolate(x, size=hw)`:
sizes = Concat(Shape(x)[0:2], hw). The channel entry is x's own dim, so it follows the pruning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder
from reference import assert_matches_masked


def upsampled(channel_entry: str) -> onnx.ModelProto:
    """Conv(3→8) → Resize(sizes from Shape) → Conv(8→4). `channel_entry`: 'own' reads the Resize
    input's channel dim, 'constant' writes 8, 'other' reads the channel dim of another tensor."""
    b = GraphBuilder(seed=8)
    x = b.input([1, 3, 6, 6])
    h = b.conv(x, 3, 8)
    other = b.conv(x, 3, 8)
    i64 = lambda *v: b.const(np.array(v, np.int64))  # noqa: E731
    if channel_entry == "own":
        head = b.op("Slice", [b.op("Shape", [h]), i64(0), i64(2)])
    elif channel_entry == "other":
        head = b.op("Concat", [b.op("Slice", [b.op("Shape", [h]), i64(0), i64(1)]),
                               b.op("Slice", [b.op("Shape", [other]), i64(1), i64(2)])], axis=0)
    else:
        head = b.op("Concat", [b.op("Slice", [b.op("Shape", [h]), i64(0), i64(1)]), i64(8)], axis=0)
    sizes = b.op("Concat", [head, i64(12, 12)], axis=0)
    up = b.op("Resize", [h, "", "", sizes], mode="linear")
    y = b.conv(b.op("Add", [up, b.op("Resize", [other, "", "", b.op("Concat", [b.op("Slice", [
        b.op("Shape", [other]), i64(0), i64(2)]), i64(12, 12)], axis=0)], mode="linear")]), 8, 4, k=1, pad=0)
    b.nodes[-1].output[0] = "y"
    b.output("y")
    return b.model()


def test_sizes_reading_the_inputs_own_channel_dim_follow_the_pruning():
    model = upsampled("own")
    analysis = onnxprune.analyze(model)
    assert [g.size for g in analysis.prunable] == [8], analysis.summary()
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 4
    assert_matches_masked(model, result)


@pytest.mark.parametrize("entry", ["constant", "other"])
def test_other_channel_entries_still_freeze(entry):
    model = upsampled(entry)
    analysis = onnxprune.analyze(model)
    reasons = [r for g in analysis.groups for r in g.frozen]
    assert not analysis.prunable, analysis.summary()
    assert any("Resize sizes are computed at run time" in r or "read at run time by Resize" in r for r in reasons)
    result = onnxprune.prune(model, ratio=0.5)
    assert result.report.channels_removed == 0
    onnx.checker.check_model(result.model, full_check=True)
