"""Prune, then quantize: is the pruned+int8 model faster than the pruned float model and the original,
and does the trained digits CNN keep its accuracy?

    python benchmarks/quantize_handoff.py                        # ResNet-50, MobileNetV2, digits CNN
    python benchmarks/quantize_handoff.py --models resnet50 --threads 1 --cache DIR

Zoo models (random init, legacy exporter, batch 1, 224x224): pruned at `target_macs=0.5` with the
default flags, then `quantize="static"` with the choices onnxprune makes for this CPU (calibrated on
a few random images: ranges only matter for accuracy, which random weights do not have), `bench`
on so that QDQ and QOperator are timed and the faster kept. The original, pruned and pruned+int8
models are then timed in ONE interleaved run per thread count (ORT optimisations on; with 1 thread
the clock is the thread's CPU time, so other processes on a shared machine do not count; with 2
threads wall time). Goals (ResNet-50): int8 >= 2.2x faster than pruned float, >= 4.5x than the
original.

The trained digits CNN (`onnxprune.demo`) is pruned at `target_macs=0.5` and quantized static and
dynamic with its calibration set; accuracy and macro F1 on its test set (goal: int8 within 0.5
point of the pruned float model).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pass_speed import export


def zoo_rows(name: str, cache: Path, thread_counts: list[int], runs: int) -> None:
    import onnxprune
    from onnxprune.ir import load_model
    from onnxprune.verify import clock_for, interleaved_latency, random_inputs

    path = export(name, cache)
    original = load_model(path)
    calib = cache / f"{name}.calib.npz"
    if not calib.exists():
        batch = [random_inputs(original, seed)["input"] for seed in range(4)]
        np.savez(calib, input=np.concatenate(batch))
    result = onnxprune.prune(path, target_macs=0.5, quantize="static", data=str(calib), bench=True, quiet=True)
    choice = result.report.quantization
    print(f"{name}: MACs ratio {result.report.after.macs / result.report.before.macs:.3f}; "
          f"quantized: {choice.summary()}")
    for c in choice.candidates:
        print(f"  candidate {c['quant_format']}: {c['latency_ms']:.2f} ms "
              f"(pruned float {c['float_latency_ms']:.2f} ms)")
    feeds = random_inputs(original)
    for threads in thread_counts:
        orig, pruned, int8 = (lat["median"] for lat in
                              interleaved_latency([original, result.model, result.quantized], feeds, threads,
                                                  warmup=3, runs=runs))
        print(f"  {threads} thread(s), {clock_for(threads)[0]}: original {orig:.2f} ms, pruned {pruned:.2f} ms, "
              f"pruned+int8 {int8:.2f} ms | pruned/original {pruned / orig:.3f}, int8 speedup over pruned "
              f"{pruned / int8:.2f}x, over original {orig / int8:.2f}x", flush=True)


def digits_rows() -> None:
    import onnxprune
    from onnxprune.demo import demo_files

    model, test, calib = demo_files()
    for mode in ("static", "dynamic"):
        result = onnxprune.prune(model, target_macs=0.5, quantize=mode, data=str(calib), eval_data=str(test),
                                 bench=True, quiet=True)
        figs = {n: result.report.models[n] for n in ("original", "pruned", "quantized")}
        print(f"digits CNN, {result.report.quantization.summary()}:")
        for label, key in (("accuracy", "accuracy"), ("macro F1", "f1")):
            print(f"  {label:9s} " + "  ".join(f"{n} {getattr(f, key):.4f}" for n, f in figs.items()))
        drop = (figs["pruned"].accuracy - figs["quantized"].accuracy) * 100
        lat = "  ".join(f"{n} {f.latency_ms['median']:.3f}" for n, f in figs.items())
        print(f"  latency ms (1 thread, one interleaved run): {lat}")
        print(f"  int8 accuracy vs pruned float: {-drop:+.2f} points ({'meets' if drop <= 0.5 else 'misses'} "
              f"the 0.5-point goal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--cache", type=Path, help="directory for exports (default: temporary)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model (median counts)")
    parser.add_argument("--no-digits", dest="digits", action="store_false")
    args = parser.parse_args()
    from onnxprune.quantize import cpu_flags, instruction_set

    print(f"ORT {ort.__version__}, CPUExecutionProvider, int8 instruction set {instruction_set(cpu_flags())}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            zoo_rows(name, cache, args.threads, args.runs)
    if args.digits:
        digits_rows()


if __name__ == "__main__":
    main()
