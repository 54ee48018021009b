"""Scale-out on Ray against the single-process run on the same machine.

1. Statistics over N samples (default 100,000; --quick 10,000) of a ResNet-style CNN (three stages of
   basic blocks, 32-64-128 channels, 16x16 inputs, random weights) stored as 8 Parquet shards:
   `collect` in this process, then `onnxprune.ray.stats` with 1 and 2 actors.
2. A sensitivity sweep of ResNet-50 (random weights, 64x64 inputs; --quick: ResNet-18 at 32x32),
   every prunable group x 3 ratios on 32 evaluation samples: serially, then as Ray tasks on 1 and 2
   workers.

Every ONNX Runtime session (serial run and workers) uses one thread. Printed per run: wall time
(without Ray start-up), throughput relative to the serial run, whether the results equal the serial
ones (statistics: largest relative difference of any sum; sweep: identical JSON), and the peak RSS
of the serial process / of each worker process. Needs the zoo extra (torch, torchvision: export only)
and the ray extra.

    python benchmarks/scale.py --quick          # a few minutes
    python benchmarks/scale.py                   # the figures in docs/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the Ray workers started below

_EXPORT = r"""
import sys, torch, torchvision
from torch import nn
torch.set_num_threads(1)
kind, path = sys.argv[1], sys.argv[2]

def block(cin, cout, stride):
    return torchvision.models.resnet.BasicBlock(cin, cout, stride, downsample=None if cin == cout and stride == 1
        else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

if kind == "cnn":
    model, size = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        block(32, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)), 16
else:
    model, size = getattr(torchvision.models, kind)(weights=None, num_classes=10), int(sys.argv[3])
torch.manual_seed(0)
model.eval()
torch.onnx.export(model, torch.randn(1, 3, size, size), path, input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": {0: "batch"}}, dynamo=False)
"""


def export(kind: str, path: Path, size: int = 0) -> Path:
    """A random-weight model exported in a child (torch never shares a process with the runs)."""
    if not path.exists():
        subprocess.run([sys.executable, "-c", _EXPORT, kind, str(path), str(size)], check=True)
    return path


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def record_rss(folder: str) -> None:
    """A worker's peak RSS, one file per process (the last write is its peak over the run)."""
    Path(folder, f"{os.getpid()}.rss").write_text(str(peak_rss()))


def worker_rss(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in folder.glob("*.rss")]


def write_shards(folder: Path, samples: int, shards: int) -> Path:
    from onnxprune.shards import write_parquet

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    for k in range(shards):
        path = folder / f"part{k:02d}.parquet"
        if not path.exists():
            n = min(per, samples - k * per)
            write_parquet({"image": rng.standard_normal((n, 3, 16, 16), dtype=np.float32)}, path, rows_per_group=1024)
    return folder


def stats_worker_class(folder: str):
    from onnxprune.ray.stats import StatsWorker

    class Measured(StatsWorker):
        def __call__(self, batch):
            out = super().__call__(batch)
            record_rss(folder)
            return out

    return Measured


def sweep_task(folder: str):
    from onnxprune.ray.sweep import _evaluate

    def evaluate(shared, plan):
        out = _evaluate(shared, plan)
        record_rss(folder)
        return out

    return evaluate


def on_ray(cpus: int, call):
    """`call(rss folder)` on a Ray started for it with `cpus` CPUs: its result, its wall seconds
    (without Ray start-up) and the peak RSS of each worker process."""
    import ray

    with tempfile.TemporaryDirectory() as folder:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        result = call(folder)
        seconds = time.perf_counter() - start
        ray.shutdown()
        return result, seconds, worker_rss(Path(folder))


def max_rel_diff(a, b) -> float:
    worst = 0.0
    for slot, s in b.slots.items():
        for part in ("sum", "abs", "sq", "zeros"):
            x, y = getattr(a.slots[slot], part), getattr(s, part)
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))))
    return worst if a.samples == b.samples else float("inf")


def run_stats(model: Path, shards: Path, workers: list[int], rows: list[dict]) -> None:
    import onnxprune.ray as onnxprune_ray
    from onnxprune.api import analyze
    from onnxprune.ir import load_model
    from onnxprune.passes.stats import collect

    original = load_model(model)
    analysis = analyze(original)
    reset_peak()
    start = time.perf_counter()
    serial = collect(original, analysis, shards, grams=False, quiet=True)
    base = time.perf_counter() - start
    rows.append(dict(task="stats", mode="serial", seconds=base, ratio=1.0, equal="-", samples=serial.samples,
                     rss=[peak_rss()]))
    for n in workers:
        result, seconds, rss = on_ray(max(workers), lambda folder: onnxprune_ray.stats(
            model, shards, workers=n, grams=False, worker=stats_worker_class(folder)))
        rows.append(dict(task="stats", mode=f"ray x{n}", seconds=seconds, ratio=base / seconds,
                         equal=f"max rel diff {max_rel_diff(result, serial):.1e}", samples=result.samples, rss=rss))


def run_sweep(model: Path, data: Path, workers: list[int], ratios: list[float], samples: int, rows: list[dict]) -> None:
    import onnxprune.ray as onnxprune_ray
    from onnxprune.sensitivity import sensitivity

    reset_peak()
    start = time.perf_counter()
    serial = sensitivity(model, data, ratios=ratios, samples=samples, quiet=True)
    base = time.perf_counter() - start
    points = len(serial.groups) * len(ratios)
    rows.append(dict(task="sweep", mode="serial", seconds=base, ratio=1.0, equal="-", samples=points, rss=[peak_rss()]))
    for n in workers:
        result, seconds, rss = on_ray(max(workers), lambda folder: onnxprune_ray.sensitivity(
            model, data, workers=n, ratios=ratios, samples=samples, evaluate=sweep_task(folder)))
        same = json.dumps(result.to_json()) == json.dumps(serial.to_json())
        rows.append(dict(task="sweep", mode=f"ray x{n}", seconds=seconds, ratio=base / seconds,
                         equal="identical JSON" if same else "DIFFERENT", samples=points, rss=rss))


def table(rows: list[dict]) -> str:
    lines = [f"{'task':<7}{'run':<10}{'units':>9}{'wall s':>9}{'vs serial':>11}  {'peak RSS per process (MiB)':<30}result",
             "-" * 100]
    for r in rows:
        rss = ", ".join(f"{v / 2**20:.0f}" for v in sorted(r["rss"])) or "-"
        lines.append(f"{r['task']:<7}{r['mode']:<10}{r['samples']:>9}{r['seconds']:>9.1f}{r['ratio']:>10.2f}x  "
                     f"{rss:<30}{r['equal']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 samples and a ResNet-18 sweep")
    parser.add_argument("--samples", type=int, help="statistics samples (default 100,000; --quick 10,000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip", choices=["stats", "sweep"], action="append", default=[])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "onnxprune-scale-bench"),
                        help="where models and shards are kept between runs")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    samples = args.samples or (10_000 if args.quick else 100_000)
    rows: list[dict] = []
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one ORT thread per process")
    if "stats" not in args.skip:
        model = export("cnn", cache / "resnet_cnn16.onnx")
        shards = write_shards(cache / f"shards_{samples}", samples, 8)
        run_stats(model, shards, args.workers, rows)
        print(table(rows), flush=True)
    if "sweep" not in args.skip:
        kind, size = ("resnet18", 32) if args.quick else ("resnet50", 64)
        model = export(kind, cache / f"{kind}_{size}.onnx", size)
        data = cache / f"eval_{size}.npz"
        np.savez(data, image=np.random.default_rng(1).standard_normal((32, 3, size, size), dtype=np.float32))
        run_sweep(model, data, args.workers, [0.25, 0.5, 0.75], 32, rows)
        print(table(rows))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
