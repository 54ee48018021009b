"""Latency against MACs: does removing channels make ONNX Runtime faster by as much as it cuts MACs?

    python benchmarks/latency.py                          # ResNet-50, MobileNetV2, BERT-base
    python benchmarks/latency.py --models resnet50 --threads 1 --cache DIR

For each model (random init, legacy exporter, batch 1, 224x224 images / 128 tokens) a latency table
is measured once (`onnxprune latency-table`, cached in --cache), then the model is pruned at ratio
0.3 / 0.5 / 0.7 with `round_to=1` and `round_to='auto'`, and with `target_latency=0.5`. Each row
prints the MACs ratio, the measured latency ratio (fastest of N interleaved runs of the original
and the pruned model, ORT graph optimisations on, fixed thread count, CPUExecutionProvider; with
one thread the clock is the thread's CPU time, so other processes on a shared machine do not
count) and
`(1 - latency ratio) / (1 - MACs ratio)`: the share of the MACs reduction that shows up as time
(the goal at ratio 0.5 with latency-aware rounding is >= 0.9).

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

PLANS = [("ratio 0.3", {"ratio": 0.3}), ("ratio 0.3 auto", {"ratio": 0.3, "round_to": "auto"}),
         ("ratio 0.5", {"ratio": 0.5}), ("ratio 0.5 auto", {"ratio": 0.5, "round_to": "auto"}),
         ("ratio 0.7", {"ratio": 0.7}), ("ratio 0.7 auto", {"ratio": 0.7, "round_to": "auto"}),
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


def rows_for(model: Path, cache: Path, threads: int, runs: int, table_runs: int, turn: int) -> list[dict]:
    from onnxprune.api import prune
    from onnxprune.ir import load_model
    from onnxprune.latency import compare_latency
    from onnxprune.verify import random_inputs

    table = table_path(model, cache, threads, table_runs)
    original = load_model(model)
    feeds = random_inputs(original)
    rows = []
    for label, options in PLANS:
        result = prune(model, latency_table=str(table), **options)
        ms_before, ms_after = compare_latency(original, result.model, feeds, threads=threads, runs=runs)
        steady_before, steady_after = compare_latency(original, result.model, feeds, threads, runs, turn)
        before, after = result.report.before, result.report.after
        macs = after.macs / before.macs
        estimated = next((n.split("ratio ")[1].split(" ")[0] for n in result.report.notes
                          if n.startswith("latency plan")), "-")
        rows.append({"model": model.stem, "plan": label, "macs_ratio": macs, "params_ratio": after.params / before.params,
                     "latency_ratio": ms_after / ms_before,
                     "share": (1 - ms_after / ms_before) / (1 - macs) if macs < 1 else float("nan"),
                     "steady_ratio": steady_after / steady_before,
                     "steady_share": (1 - steady_after / steady_before) / (1 - macs) if macs < 1 else float("nan"),
                     "estimated": estimated, "ms_before": ms_before, "ms_after": ms_after})
        print("  " + _line(rows[-1]))
    return rows


COLS = ["model", "plan", "macs_ratio", "params_ratio", "latency_ratio", "share", "steady_ratio", "steady_share",
        "estimated", "ms_before", "ms_after"]


def _line(row: dict) -> str:
    return " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "bert"])
    parser.add_argument("--cache", type=Path, help="directory for exports and latency tables (default: temporary)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for every figure (default 1)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and plan (fastest counts)")
    parser.add_argument("--table-runs", type=int, default=10, help="timed runs per latency-table point")
    parser.add_argument("--turn", type=int, default=10, help="runs of one model in a row for the steady figures")
    args = parser.parse_args()
    from onnxprune.latency import clock_for

    print(f"ORT {ort.__version__}, CPUExecutionProvider, {args.threads} thread(s), {clock_for(args.threads)[0]}, "
          f"batch 1; share = (1 - latency ratio) / (1 - MACs ratio)")
    print(" | ".join(COLS))
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.models:
            rows += rows_for(export(name, cache), cache, args.threads, args.runs, args.table_runs, args.turn)
    print("\nsummary (ratio 0.5 and target 0.5):")
    for row in rows:
        if "0.5" in row["plan"]:
            verdict = ", ".join(f"{what} {'meets' if row[key] >= 0.9 else 'below'} 0.9"
                                for what, key in (("alternating", "share"), ("steady", "steady_share")))
            print(f"  {row['model']:14s} {row['plan']:16s} MACs {row['macs_ratio']:.3f}  latency "
                  f"{row['latency_ratio']:.3f} / steady {row['steady_ratio']:.3f}  share {row['share']:.2f} / "
                  f"{row['steady_share']:.2f}  ({verdict})")


if __name__ == "__main__":
    main()
