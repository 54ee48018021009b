"""Pass speed: onnxprune's load → analyze → plan → rewrite → save against a plain onnx.load +
onnx.save of the same file, in one run (ratios, not absolute times, are the figure to quote).

    python benchmarks/pass_speed.py                 # exports torchvision ResNet-50 (random init)
    python benchmarks/pass_speed.py model.onnx ...  # any models

Prints one row per model: load+save seconds, onnxprune seconds per phase, their ratio, and the
peak RSS the prune run adds (over the process after imports) relative to the model's weight
bytes, measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

_CHILD = r"""
import json, resource, sys, time
import onnx, onnxruntime, numpy
from onnxprune.api import prune
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
r = prune(sys.argv[1], ratio=0.5)
r.save(sys.argv[2])
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": elapsed, "peak_rss": peak - base}))
"""


def export_resnet50(directory: Path) -> Path:
    import torch
    import torchvision

    path = directory / "resnet50.onnx"
    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), dynamo=False, opset_version=17)
    return path


def time_load_save(path: Path, out: Path, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        onnx.save(onnx.load(str(path)), str(out))
        best = min(best, time.perf_counter() - start)
    return best


def time_phases(path: Path, out: Path) -> dict[str, float]:
    """Phase times of one in-process run (after a warm-up run that imports everything)."""
    from onnxprune.importance import score_groups
    from onnxprune.ir import ModelMeta, from_graph, load_model, opset_version, save_model, to_graph
    from onnxprune.passes.dependency import analyze_graph
    from onnxprune.passes.rewrite import attach_inferred_shapes, rewrite
    from onnxprune.plan import uniform_plan

    phases: dict[str, float] = {}
    t = time.perf_counter()
    model = load_model(path)
    meta = ModelMeta.of(model)
    graph = to_graph(model)
    phases["load"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis = analyze_graph(graph, opset_version(model))
    phases["analyze"] = time.perf_counter() - t
    t = time.perf_counter()
    units = uniform_plan(analysis, score_groups(analysis, "l1"), 0.5).resolve(analysis)
    phases["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    rewrite(analysis, units)
    graph.cleanup().toposort()
    pruned = from_graph(graph, meta)
    attach_inferred_shapes(pruned)
    phases["rewrite"] = time.perf_counter() - t
    t = time.perf_counter()
    save_model(pruned, out)
    phases["save"] = time.perf_counter() - t
    phases["total"] = sum(phases.values())
    return phases


def weight_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def measure(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        baseline = time_load_save(path, out)
        time_phases(path, out)  # warm-up: imports and caches
        phases = min((time_phases(path, out) for _ in range(3)), key=lambda p: p["total"])
        child = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(out)], capture_output=True, text=True,
                               check=True)
        rss = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss"]
    return {"model": path.name, "load_save_s": baseline, **{f"{k}_s": v for k, v in phases.items()},
            "ratio": phases["total"] / baseline, "peak_rss_over_weights": rss / weight_bytes(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or [export_resnet50(Path(tmp))]
        rows = [measure(m) for m in models]
    cols = ["model", "load_save_s", "load_s", "analyze_s", "plan_s", "rewrite_s", "save_s", "total_s", "ratio",
            "peak_rss_over_weights"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))


if __name__ == "__main__":
    main()
