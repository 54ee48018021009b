"""Latency against MACs: does removing channels make ONNX Runtime faster by as much as it cuts MACs?

    python benchmarks/latency.py                          # ResNet-50, MobileNetV2, BERT-base, 1 and 2 threads
    python benchmarks/latency.py --models resnet50 --threads 1 --cache DIR
    python benchmarks/latency.py --tables                 # also round-to auto / target-latency (slow)

For each model (random init, legacy exporter, batch 1, 224x224 images / 128 tokens) the model is
pruned at `target_macs=0.5` with the default flags (latency-friendly counts: Conv groups keep
multiples of ORT's NCHWc block) and with `round_to=1` (exact counts) for comparison. With --tables
a latency table is measured once (cached in --cache) and the model is also pruned at ratio
0.3 / 0.5 / 0.7 with `round_to='auto'` and with `target_latency=0.5`. Each row prints the MACs
ratio, the measured latency ratio (fastest of N interleaved runs of the original and the pruned
model, ORT graph optimisations on, fixed thread count, CPUExecutionProvider; with one thread the
clock is the thread's CPU time, so other processes on a shared machine do not count) and
`(1 - latency ratio) / (1 - MACs ratio)`: the share of the MACs reduction that shows up as time
(the goal at target-macs 0.5 with default flags is >= 0.9, and no pruned model slower than its
original).

Latency is measured twice: with the two models alternating run by run (`latency_ratio`, `share`:
every run starts with the caches holding the other model) and in turns of --turn runs of one model
(`steady_ratio`, `steady_share`: each model timed in the steady state of being served alone, the
condition the latency tables are measured in; the turns alternate, so drift hits both alike).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from pass_speed import export

PLANS = [("macs 0.5 default", {"target_macs": 0.5}), ("macs 0.5 exact", {"target_macs": 0.5, "round_to": 1})]
TABLE_PLANS = [("ratio 0.3 auto", {"ratio": 0.3, "round_to": "auto"}),
               ("ratio 0.5 auto", {"ratio": 0.5, "round_to": "auto"}),
               ("ratio 0.7 auto", {"ratio": 0.7, "round_to": "auto"}),
               ("macs 0.5 auto", {"target_macs": 0.5, "round_to": "auto"}),
               ("target 0.5", {"target_latency": 0.5})]


def table_path(model: Path, cache: Path, threads: int, runs: int) -> Path:
    """The model's latency table, measured once per thread count."""
    from onnxprune.api import analyze
    from onnxprune.ir import load_model
    from onnxprune.latency import measure_table

    path = cache / f"{model.stem}.latency-{threads}t-{runs}r.json"
    if not path.exists():
        start = time.perf_counter()
        proto = load_model(model)
        table = measure_table(proto, analyze(proto), threads=threads, runs=runs)
        table.save(path)
        print(f"  measured {path.name}: {len(table.layers)} layers in {time.perf_counter() - start:.0f} s")
    return path


def rows_for(model: Path, cache: Path, thread_counts: list[int], runs: int, table_runs: int, turn: int,
             tables: bool) -> list[dict]:
    from onnxprune.api import prune
    from onnxprune.ir import load_model
    from onnxprune.verify import random_inputs

    table = table_path(model, cache, thread_counts[0], table_runs) if tables else None
    original = load_model(model)
    feeds = random_inputs(original)
    rows = []
    for label, options in PLANS + (TABLE_PLANS if tables else []):
        if "round_to" in options or "target_latency" in options:
            options = {**options, "latency_table": None if table is None else str(table)}
        result = prune(model, quiet=True, **options)
        for threads in thread_counts:
            rows.append(_row(model, label, result, original, feeds, threads, runs, turn))
            print("  " + _line(rows[-1]), flush=True)
    return rows


def _row(model: Path, label: str, result, original, feeds, threads: int, runs: int, turn: int) -> dict:
    from onnxprune.latency import compare_latency

    ms_before, ms_after = compare_latency(original, result.model, feeds, threads=threads, runs=runs)
    steady_before, steady_after = compare_latency(original, result.model, feeds, threads, runs, turn)
    before, after = result.report.before, result.report.after
    macs = after.macs / before.macs
    estimated = next((n.split("ratio ")[1].split(" ")[0] for n in result.report.notes
                      if n.startswith("latency plan")), "-")
    return {"model": model.stem, "threads": threads, "plan": label, "macs_ratio": macs,
            "params_ratio": after.params / before.params, "latency_ratio": ms_after / ms_before,
            "share": (1 - ms_after / ms_before) / (1 - macs) if macs < 1 else float("nan"),
            "steady_ratio": steady_after / steady_before,
            "steady_share": (1 - steady_after / steady_before) / (1 - macs) if macs < 1 else float("nan"),
            "estimated": estimated, "ms_before": ms_before, "ms_after": ms_after}


COLS = ["model", "threads", "plan", "macs_ratio", "params_ratio", "latency_ratio", "share", "steady_ratio",
        "steady_share", "estimated", "ms_before", "ms_after"]


def _line(row: dict) -> str:
    return " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "bert"])
    parser.add_argument("--cache", type=Path, help="directory for exports and latency tables (default: temporary)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="ORT intra-op thread counts (default 1 2)")
    parser.add_argument("--tables", action="store_true", help="also measure latency tables: round-to auto rows")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and plan (fastest counts)")
    parser.add_argument("--table-runs", type=int, default=10, help="timed runs per latency-table point")
    parser.add_argument("--turn", type=int, default=10, help="runs of one model in a row for the steady figures")
    args = parser.parse_args()
    from onnxprune.latency import clock_for, layout_block

    print(f"ORT {ort.__version__}, CPUExecutionProvider, NCHWc block {layout_block()}, batch 1; "
          f"share = (1 - latency ratio) / (1 - MACs ratio); clock: " +
          ", ".join(f"{t} thread(s) {clock_for(t)[0]}" for t in args.threads))
    print(" | ".join(COLS))
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.models:
            rows += rows_for(export(name, cache), cache, args.threads, args.runs, args.table_runs, args.turn,
                             args.tables)
    print("\nsummary (0.5 plans; goal: share >= 0.9 and latency ratio < 1 at default flags):")
    for row in rows:
        if "0.5" in row["plan"]:
            verdict = ", ".join(f"{what} {'meets' if row[key] >= 0.9 else 'below'} 0.9"
                                for what, key in (("alternating", "share"), ("steady", "steady_share")))
            print(f"  {row['model']:14s} {row['threads']}t {row['plan']:16s} MACs {row['macs_ratio']:.3f}  latency "
                  f"{row['latency_ratio']:.3f} / steady {row['steady_ratio']:.3f}  share {row['share']:.2f} / "
                  f"{row['steady_share']:.2f}  ({verdict})")


if __name__ == "__main__":
    main()
