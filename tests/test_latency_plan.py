"""Latency-aware planning: latency tables, `round_to='auto'` and `target_latency`.

Tables used for planning decisions are written here by hand (a staircase with known steps), so the
chosen counts can be checked exactly; measured tables are only checked for their structure, since
timings on a shared machine are not reproducible.
"""

import json

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.latency import (AxisCurve, LatencyTable, LayerLatency, auto_count, candidate_counts, latency_plan,
                               measure_table, weight_layers)
from onnxprune.verify import random_inputs, session

WIDTH = 32


def two_convs(width: int = WIDTH, seed: int = 3) -> onnx.ModelProto:
    """x -> conv(3->W) -> relu -> conv(W->W) -> relu -> conv(W->4): two prunable groups of W (32)."""
    b = GraphBuilder(seed=seed)
    h = b.input([1, 3, 8, 8])
    h = b.op("Relu", [b.conv(h, 3, width)])
    h = b.op("Relu", [b.conv(h, width, width)])
    b.output(b.conv(h, width, 4), shape=[1, 4, 8, 8])
    return b.model()


def staircase(counts: list[int], step: int, per_step: float) -> list[float]:
    """Latency that rises by `per_step` ms at every multiple of `step` (a partial block costs a whole one)."""
    return [1.0 + per_step * -(-n // step) for n in counts]


def hand_table(analysis, steps: dict[str, tuple[int, float]], model_ms: float = 10.0) -> LatencyTable:
    """One layer per group with a staircase curve on its output axis."""
    table = LatencyTable("CPUExecutionProvider", 1, "test", "test", model_ms)
    for group in analysis.prunable:
        counts = list(range(1, group.size + 1))
        step, per_step = steps[group.key]
        ms = staircase(counts, step, per_step)
        table.layers.append(LayerLatency(f"layer_{group.key}", "Conv", ms[-1], {"out": AxisCurve(group.key, counts, ms)}))
    return table


def test_auto_count_picks_the_count_just_below_the_next_step():
    counts = list(range(1, 33))
    ms = staircase(counts, 8, 1.0)
    assert auto_count(counts, ms, 17) == 24  # 17..24 cost the same: keep 24
    assert auto_count(counts, ms, 24) == 24
    assert auto_count(counts, ms, 25) == 32
    flat = [2.0] * len(counts)
    assert auto_count(counts, flat, 5) == 32  # no step at all: keeping channels is free


def test_auto_count_on_a_coarse_grid_rounds_up_to_a_grid_point():
    counts = [8, 16, 24, 32]
    assert auto_count(counts, [1.0, 2.0, 3.0, 4.0], 9) == 16
    assert auto_count(counts, [1.0, 2.0, 2.0, 4.0], 9) == 24


def test_candidate_counts_are_block_aligned_and_end_at_the_size():
    assert candidate_counts(6) == [1, 2, 3, 4, 5, 6]
    counts = candidate_counts(100)
    assert counts[-1] == 100 and all(c % 8 == 0 for c in counts[:-1]) and counts == sorted(set(counts))
    assert len(candidate_counts(2048)) <= 25
    assert candidate_counts(12, unit=64) == list(range(1, 13))  # attention heads: every count is aligned
    assert candidate_counts(12, unit=4) == [2, 4, 6, 8, 10, 12]


def test_round_to_auto_uses_the_given_table(tmp_path):
    model = two_convs()
    analysis = onnxprune.analyze(model)
    keys = [g.key for g in analysis.prunable]
    assert len(keys) == 2
    table = hand_table(analysis, {keys[0]: (8, 1.0), keys[1]: (32, 1.0)})
    path = tmp_path / "table.json"
    table.save(path)
    result = onnxprune.prune(model, ratio=0.4, round_to="auto", latency_table=str(path))
    kept = {g.key: g.size - len(g.remove) for g in result.plan.groups}
    # ratio 0.4 keeps 20 of 32; group 0 steps every 8 channels -> 24; group 1 is one flat step -> 32
    assert kept == {keys[0]: 24, keys[1]: 32}
    assert any("latency steps" in note and "1 thread(s)" in note for note in result.report.notes)
    feeds = random_inputs(model)
    assert session(result.model).run(None, feeds)[0].shape == session(model).run(None, feeds)[0].shape


def test_target_latency_removes_the_cheapest_channels_first():
    """Group 0 saves 1 ms per 8 channels, group 1 saves 4 ms: a 0.7 target prunes group 1 first."""
    model = two_convs()
    analysis = onnxprune.analyze(model)
    keys = [g.key for g in analysis.prunable]
    table = hand_table(analysis, {keys[0]: (8, 1.0), keys[1]: (8, 4.0)}, model_ms=30.0)
    scores = {g.id: np.ones(g.size) for g in analysis.prunable}
    full = table.estimate({})
    plan, estimated = latency_plan(analysis, scores, table, target=0.7)
    kept = {g.key: g.size - len(g.remove) for g in plan.groups}
    assert estimated <= 0.7
    assert table.estimate(kept) == pytest.approx(estimated * full)
    assert kept[keys[1]] < kept[keys[0]] == WIDTH
    assert all(k % 8 == 0 for k in kept.values())  # only counts just below a step are chosen
    loose, ratio = latency_plan(analysis, scores, table, target=1.0)
    assert ratio == 1.0 and all(not g.remove for g in loose.groups)


def test_target_latency_end_to_end_with_a_table_file(tmp_path):
    model = two_convs()
    analysis = onnxprune.analyze(model)
    keys = [g.key for g in analysis.prunable]
    path = tmp_path / "t.json"
    hand_table(analysis, {keys[0]: (8, 1.0), keys[1]: (8, 1.0)}).save(path)
    result = onnxprune.prune(model, target_latency=0.8, latency_table=str(path))
    assert result.plan.removed_channels > 0
    assert any(note.startswith("latency plan: estimated latency ratio") for note in result.report.notes)


def test_measured_table_structure_and_json_round_trip(tmp_path):
    model = two_convs()
    analysis = onnxprune.analyze(model)
    table = measure_table(model, analysis, threads=1, runs=3)
    assert table.threads == 1 and table.provider == "CPUExecutionProvider" and table.model_ms > 0
    layers = weight_layers(analysis)
    assert {l.node.name for l in layers} == {l.node for l in table.layers}
    block = table.layout_block  # conv groups are measured on ORT's layout block, never below it
    grid = candidate_counts(WIDTH) if block is None else candidate_counts(WIDTH, block=max(block, 8), least=block)
    for layer in table.layers:
        for curve in layer.curves.values():
            assert curve.counts == grid and all(m > 0 for m in curve.ms)
    path = tmp_path / "t.json"
    table.save(path)
    assert LatencyTable.load(path) == table


def test_cli_latency_table_and_prune_with_it(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(two_convs(), str(src))
    table = tmp_path / "t.json"
    assert main(["latency-table", str(src), "-o", str(table), "--runs", "2"]) == 0
    assert json.loads(table.read_text())["threads"] == 1
    out = tmp_path / "p.onnx"
    assert main(["prune", str(src), "-o", str(out), "--round-to", "auto", "--latency-table", str(table)]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert main(["prune", str(src), "-o", str(out), "--round-to", "fast"]) == 2


def test_bad_tables_and_options_are_input_errors(tmp_path):
    model = two_convs()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="latency table"):
        onnxprune.prune(model, round_to="auto", latency_table=str(bad))
    other = tmp_path / "other.json"
    LatencyTable("CPUExecutionProvider", 1, "x", "x", 1.0,
                 [LayerLatency("n", "Conv", 1.0, {"out": AxisCurve("nope:1", [1, 2], [1.0, 2.0])})]).save(other)
    with pytest.raises(InputError, match="another model"):
        onnxprune.prune(model, round_to="auto", latency_table=str(other))
    with pytest.raises(InputError, match="target_latency"):
        onnxprune.prune(model, target_latency=1.5)
    with pytest.raises(InputError, match="round_to"):
        onnxprune.prune(model, round_to="fast")
