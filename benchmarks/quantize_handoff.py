"""Prune then quantize the shipped digits CNN: size, latency and test accuracy of the original,
pruned and pruned+int8 models, for a few ratios and both ONNX Runtime quantization modes.

Run: python benchmarks/quantize_handoff.py
Latencies are medians of one interleaved run per row (batch 32, 1 thread): compare within a row.
"""

from __future__ import annotations

import onnxprune
from onnxprune.demo import demo_files


def main() -> None:
    model, test, calib = demo_files()
    print(f"{'ratio':>5} {'mode':>8} | {'KiB orig/pruned/int8':>22} | {'latency ms orig/pruned/int8':>27} | "
          f"{'accuracy orig/pruned/int8':>25}")
    for ratio in (0.1, 0.25, 0.4):
        for mode in ("dynamic", "static"):
            result = onnxprune.prune(model, ratio=ratio, criterion="bn_scale", round_to=8, quantize=mode,
                                     data=str(calib), eval_data=str(test), bench=True, quiet=True)
            figs = [result.report.models[n] for n in ("original", "pruned", "quantized")]
            size = "/".join(f"{f.bytes / 1024:.0f}" for f in figs)
            lat = "/".join(f"{f.latency_ms['median']:.3f}" for f in figs)
            acc = "/".join(f"{f.accuracy:.4f}" for f in figs)
            print(f"{ratio:>5} {mode:>8} | {size:>22} | {lat:>27} | {acc:>25}")


if __name__ == "__main__":
    main()
