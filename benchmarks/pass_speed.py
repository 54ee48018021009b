"""Pass speed and memory: onnxprune's load -> analyze -> plan -> rewrite -> save against a plain
`onnx.load` + `onnx.save` of the same file, against onnxsim's structured pruning (the ONNX-level
peer) and Torch-Pruning's dependency graph + prune of the same torch model, all in one run.

    python benchmarks/pass_speed.py                       # torchvision ResNet-50 and BERT-base
    python benchmarks/pass_speed.py --models resnet50 --repeat 5
    python benchmarks/pass_speed.py --cache DIR           # keep/reuse the exports in DIR
    python benchmarks/pass_speed.py --no-torch            # onnxprune, load+save and onnxsim only
    python benchmarks/pass_speed.py model.onnx ...        # any ONNX files (no torch comparison)

Timings interleave the compared operations round by round, and each timed job is preceded by one
plain read of the input file, so every side starts from the same warm page cache. Each row gives
the median and the minimum seconds of every job, and the ratios onnxprune / (load + save) and
onnxsim / onnxprune of each round (median and range): machine noise hits the jobs of a round
alike, so quote the ratios, not the seconds. Outputs are deleted before each job (every side writes
a fresh file). Peak RSS is measured in a fresh process running the CLI (`ru_maxrss` at the end
minus the same figure after imports) and divided by the weight bytes.
The analysis-scaling row times the dependency analysis of a synthetic CNN at two depths (10x).
Models are random-init exports (legacy TorchScript exporter, opset 17); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx

from cli_rss import run_cli_measured

RATIO = 0.5
def export(name: str, directory: Path) -> Path:
    """Export a random-init torch model once (cached in `directory`)."""
    path = directory / f"{name}.onnx"
    if path.exists():
        return path
    import torch

    model, args, names = torch_model(name)
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=names)
    return path


def torch_model(name: str):
    """(module, example args, input names) for the named architecture, random weights."""
    import torch

    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None).eval(), (torch.randn(1, 3, 224, 224),), ["input"]
    if name == "mobilenet_v2":
        import torchvision

        return torchvision.models.mobilenet_v2(weights=None).eval(), (torch.randn(1, 3, 224, 224),), ["input"]
    if name == "bert":
        from transformers import BertConfig, BertModel

        class Bert(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(BertConfig()).eval()

            def forward(self, input_ids, attention_mask):
                out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
                return out[0], out[1]

        ids = torch.ones(1, 128, dtype=torch.long)
        return Bert().eval(), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"]
    raise SystemExit(f"unknown model {name!r} (resnet50, mobilenet_v2, bert)")


def weight_bytes(path: Path) -> int:
    from onnxprune.ir import load_model

    return sum(len(t.raw_data) for t in load_model(path).graph.initializer)


def interleaved(jobs: dict[str, Callable[[], object]], repeat: int, path: Path | None = None,
                outputs: Path | None = None) -> dict[str, list[float]]:
    """Seconds of each job per round, the jobs taking turns so that noise hits all of them.

    With `path`, the file is read once before each job: the same warm page cache for every side.
    With `outputs`, the files in that folder are deleted before each job, so every side writes a
    fresh file (overwriting one still being flushed to disk waits for the flush, which would
    penalise whichever job truncates in place rather than renames a temporary file).
    """
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeat):
        for name, job in jobs.items():
            if path is not None:
                path.read_bytes()
            for old in list(outputs.iterdir()) if outputs is not None else ():
                old.unlink()
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_figures(times: dict[str, list[float]], over: str, under: str) -> tuple[float, float, float]:
    """(median, min, max) over the rounds of times[over] / times[under] within the same round."""
    ratios = [a / b for a, b in zip(times[over], times[under])]
    return statistics.median(ratios), min(ratios), max(ratios)


def onnxsim_job(path: Path, out: Path) -> Callable[[], object] | None:
    try:
        from onnxsim import apply_structured_pruning
    except ImportError:
        return None
    return lambda: onnx.save(apply_structured_pruning(str(path), sparsity=RATIO), str(out))


def torch_pruning_seconds(name: str, repeat: int) -> float | str:
    """Median seconds of Torch-Pruning's DependencyGraph build + magnitude prune at RATIO."""
    try:
        import torch_pruning as tp
    except ImportError:
        return "not installed"
    runs = []
    for _ in range(repeat):
        model, args, _ = torch_model(name)
        ignored = [model.fc] if name == "resnet50" else [model.bert.pooler]
        start = time.perf_counter()
        try:
            pruner = tp.pruner.MagnitudePruner(model, args, importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=RATIO, ignored_layers=ignored)
            pruner.step()
        except Exception as exc:  # noqa: BLE001 - report the peer's failure, do not hide our figures
            return f"failed ({type(exc).__name__})"
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def peak_rss(path: Path, out: Path) -> tuple[int, int]:
    figures = run_cli_measured(["prune", str(path), "-o", str(out), "--ratio", str(RATIO)])
    return figures["peak_rss"], figures["base_rss"]


def measure(path: Path, torch_name: str | None, repeat: int) -> dict:
    from onnxprune.api import prune

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        jobs = {"load_save": lambda: onnx.save(onnx.load(str(path)), str(out / "plain.onnx")),
                "onnxprune": lambda: prune(str(path), ratio=RATIO).save(out / "pruned.onnx")}
        peer = onnxsim_job(path, out / "onnxsim.onnx")
        if peer is not None:
            jobs["onnxsim"] = peer
        prune(str(path), ratio=RATIO)  # warm-up: lazy imports
        times = interleaved(jobs, repeat, path, out)
        peak, base = peak_rss(path, out / "child.onnx")
    seconds = {name: statistics.median(t) for name, t in times.items()}
    weights = weight_bytes(path)
    row = {"model": path.stem, "weights_MiB": weights / 2**20,
           **{f"{k}_s": f"{statistics.median(t):.3f} (min {min(t):.3f})" for k, t in times.items()},
           "ratio_to_load_save": "{:.2f} ({:.2f}-{:.2f})".format(*ratio_figures(times, "onnxprune", "load_save")),
           "peak_rss_MiB": (peak - base) / 2**20, "peak_rss_over_weights": (peak - base) / weights}
    row["onnxsim"] = ("{:.2f} ({:.2f}-{:.2f}) x our time".format(*ratio_figures(times, "onnxsim", "onnxprune"))
                      if "onnxsim" in times else "onnxsim has no apply_structured_pruning")
    if torch_name is not None:
        tp_seconds = torch_pruning_seconds(torch_name, max(1, repeat // 2))
        row["torch_pruning"] = (f"{tp_seconds:.2f} s = {tp_seconds / seconds['onnxprune']:.2f}x our time"
                                if isinstance(tp_seconds, float) else tp_seconds)
    return row


def deep_cnn(blocks: int, width: int = 16) -> onnx.ModelProto:
    """conv-bn-relu x blocks on a 8x8 map: the node count grows linearly with `blocks`."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(array: np.ndarray, name: str) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    h = "x"
    for i in range(blocks):
        w = const(rng.standard_normal([width, width, 3, 3]), f"w{i}")
        nodes.append(helper.make_node("Conv", [h, w], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        bn = [const(rng.random(width) + 0.5, f"{p}{i}") for p in ("g", "b", "m", "v")]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *bn], [f"n{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
        h = f"r{i}"
    w = const(rng.standard_normal([4, width, 1, 1]), "head")
    nodes.append(helper.make_node("Conv", [h, w], ["y"], name="head"))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", 1, [1, width, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def analysis_scaling(depth: int = 50, repeat: int = 3) -> tuple[float, float]:
    """Median analysis seconds at `depth` and 10 x `depth` blocks."""
    from onnxprune.ir import opset_version
    from onnxprune.passes.dependency import analyze_graph
    from onnxprune.passes.fold_constants import folded_graph

    models = {n: deep_cnn(n) for n in (depth, 10 * depth)}
    graphs = {n: [folded_graph(m) for _ in range(repeat)] for n, m in models.items()}
    times: dict[int, list[float]] = {n: [] for n in models}
    for k in range(repeat):
        for n in models:
            start = time.perf_counter()
            analyze_graph(graphs[n][k], opset_version(models[n]))
            times[n].append(time.perf_counter() - start)
    return statistics.median(times[depth]), statistics.median(times[10 * depth])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="ONNX files (default: export --models)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert"])
    parser.add_argument("--cache", type=Path, help="directory for the exports (default: temporary)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the Torch-Pruning comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        todo = [(f, None) for f in args.files] or [(export(name, cache), name) for name in args.models]
        rows = [measure(path, None if args.no_torch else name, args.repeat) for path, name in todo]
    cols = ["model", "weights_MiB", "load_save_s", "onnxprune_s", "ratio_to_load_save", "onnxsim_s",
            "peak_rss_MiB", "peak_rss_over_weights", "onnxsim", "torch_pruning"]
    print(f"ratio {RATIO}, {args.repeat} interleaved rounds: median (min) seconds; per-round ratios: median (range)")
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols))
    small, large = analysis_scaling()
    print(f"analysis scaling: 50 blocks {small * 1e3:.1f} ms, 500 blocks {large * 1e3:.1f} ms: "
          f"{large / small:.1f}x for 10x the nodes")


if __name__ == "__main__":
    main()
