"""`onnxprune demo`: prune the shipped digits CNN and show what changed, with no network access."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from onnxprune.api import prune
from onnxprune.ir import load_model
from onnxprune.report import table
from onnxprune.verify import benchmark, session, top1_accuracy


def demo_files() -> tuple[Path, Path, Path]:
    """Paths of the shipped model, its held-out test split and a calibration split."""
    data = resources.files("onnxprune") / "data"
    return Path(str(data / "digits_cnn.onnx")), Path(str(data / "digits_test.npz")), Path(str(data / "digits_calib.npz"))


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the digits CNN on `images` (the shipped test split's input is "image")."""
    return top1_accuracy(session(model).run(None, {"image": images})[0], labels)


def run_demo(ratio: float = 0.5, output: str | None = None) -> int:
    """Prune with the best retraining-free setting measured (benchmarks/recovery.py): l1 channel
    selection, then least-squares re-fitting of the next layers on the shipped calibration split."""
    model_path, test_path, calib_path = demo_files()
    with np.load(test_path, allow_pickle=False) as test:
        images, labels = test["image"], test["label"]
    original = load_model(model_path)
    result = prune(original, ratio=ratio, criterion="l1", data=calib_path, recover="lstsq", quiet=True)
    plain = prune(original, ratio=ratio, criterion="l1", recover="none")
    result.report.latency = benchmark(original, result.model, {"image": images[:64]})
    before, after = accuracy(original, images, labels), accuracy(result.model, images, labels)
    without = accuracy(plain.model, images, labels)
    print(f"onnxprune demo: digits CNN ({len(labels)} held-out test images), {ratio:.0%} of channels removed (l1),")
    print(f"next layers re-fitted by least squares on {calib_path.name} (no retraining)")
    print(table(result.report))
    print(f"{'accuracy':<16}{before:>12.4f}{after:>12.4f}{after - before:>+9.4f}")
    print(f"accuracy without recovery (--recover none): {without:.4f}")
    target = Path(output) if output else Path(tempfile.mkdtemp(prefix="onnxprune-demo-")) / "digits_cnn_pruned.onnx"
    result.save(target)
    print(f"wrote {target}")
    return 0
