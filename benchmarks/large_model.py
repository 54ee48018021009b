"""A > 2 GB model round trip: build a Llama-style decoder (random fp32 weights, external data),
prune it with the CLI in a fresh process, and report time and peak RSS against the weight bytes.

    python benchmarks/large_model.py                      # ~2.4 GB of weights in a temp directory
    python benchmarks/large_model.py --layers 2 --keep DIR  # smaller, keep the files

The model is written with onnx.helper (no download, no torch): token embedding, per layer RMSNorm,
multi-head attention (q/k/v/o projections, heads via Reshape/Transpose), a SwiGLU MLP and residual
adds, a final norm and an LM head. The pruned model must pass the ONNX checker (run by path) and
run in ONNX Runtime with the original's output shape.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cli_rss import run_cli_measured

class _Builder:
    """Accumulates a decoder graph; weights go straight into the model proto, one at a time."""

    def __init__(self, model: onnx.ModelProto, seed: int) -> None:
        self.model, self.graph = model, model.graph
        self.rng = np.random.default_rng(seed)
        self.n = 0
        self.weight_bytes = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def weight(self, shape: list[int], prefix: str, scale: float = 0.02) -> str:
        name = self.name(prefix)
        array = (self.rng.standard_normal(shape, dtype=np.float32) * scale)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.weight_bytes += array.nbytes
        return name

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.graph.node.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def rms_norm(self, x: str, hidden: int) -> str:
        mean = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [mean, self.const(np.float32(1e-5))])])])
        return self.op("Mul", [self.op("Mul", [x, inv]), self.const(np.ones(hidden, np.float32), "norm")])

    def attention(self, x: str, hidden: int, heads: int, seq: int) -> str:
        dim = hidden // heads
        split = self.const(np.array([1, seq, heads, dim], np.int64), "shape")
        q, k, v = (self.op("Transpose", [self.op("Reshape", [self.op("MatMul", [x, self.weight([hidden, hidden], p)]),
                                                            split])], perm=perm)
                   for p, perm in (("q_proj", [0, 2, 1, 3]), ("k_proj", [0, 2, 3, 1]), ("v_proj", [0, 2, 1, 3])))
        scores = self.op("Mul", [self.op("MatMul", [q, k]), self.const(np.float32(dim ** -0.5))])
        context = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])
        merged = self.op("Reshape", [self.op("Transpose", [context], perm=[0, 2, 1, 3]),
                                     self.const(np.array([1, seq, hidden], np.int64), "shape")])
        return self.op("MatMul", [merged, self.weight([hidden, hidden], "o_proj")])

    def mlp(self, x: str, hidden: int, inner: int) -> str:
        gate = self.op("MatMul", [x, self.weight([hidden, inner], "gate_proj")])
        up = self.op("MatMul", [x, self.weight([hidden, inner], "up_proj")])
        act = self.op("Mul", [gate, self.op("Sigmoid", [gate])])
        return self.op("MatMul", [self.op("Mul", [act, up]), self.weight([inner, hidden], "down_proj")])


def build_llama(layers: int, hidden: int, inner: int, heads: int, vocab: int, seq: int, seed: int = 0
                ) -> tuple[onnx.ModelProto, int]:
    """A Llama-style decoder ModelProto (weights inline in memory) and its weight bytes."""
    model = helper.make_model(helper.make_graph([], "llama", [], []), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    b = _Builder(model, seed)
    model.graph.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq]))
    h = b.op("Gather", [b.weight([vocab, hidden], "embed_tokens"), "input_ids"], axis=0)
    for _ in range(layers):
        h = b.op("Add", [h, b.attention(b.rms_norm(h, hidden), hidden, heads, seq)])
        h = b.op("Add", [h, b.mlp(b.rms_norm(h, hidden), hidden, inner)])
    logits = b.op("MatMul", [b.rms_norm(h, hidden), b.weight([hidden, vocab], "lm_head")])
    model.graph.node[-1].output[0] = "logits"
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, seq, vocab]))
    return model, b.weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inner", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.1,
                        help="default 0.1: the pruned model stays above 2 GiB, so its weights must go to a data file")
    parser.add_argument("--keep", type=Path, help="directory to keep the models in (default: a temp dir)")
    args = parser.parse_args()
    from onnxprune.ir import save_model

    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        model, weight_bytes = build_llama(args.layers, args.hidden, args.inner, args.heads, args.vocab, args.seq)
        src = work / "llama.onnx"
        save_model(model, src, external_data="llama.onnx.data")
        del model
        print(f"built {src.name}: {weight_bytes / 2**30:.2f} GiB of weights ({weight_bytes} bytes, "
              f"{'above' if weight_bytes > 2**31 else 'below'} the 2 GiB protobuf limit) in "
              f"{time.perf_counter() - start:.1f} s")
        out = work / "pruned.onnx"
        report = work / "report.json"
        result = run_cli_measured(["prune", str(src), "-o", str(out), "--ratio", str(args.ratio), "--report", str(report)])
        added = result["peak_rss"] - result["base_rss"]
        figures = json.loads(report.read_text())
        print(f"params {figures['params_before']:,} -> {figures['params_after']:,}, groups pruned "
              f"{figures['groups_pruned']} of {figures['groups_total']}")
        data = sorted(f"{p.name} ({p.stat().st_size / 2**30:.2f} GiB)" for p in work.iterdir()
                      if p.name.startswith("pruned"))
        print(f"prune --ratio {args.ratio}: exit {result['code']}, {result['seconds']:.1f} s, peak RSS "
              f"{result['peak_rss'] / 2**30:.2f} GiB (+{added / 2**30:.2f} GiB over the process after imports) "
              f"= {added / weight_bytes:.2f}x weight bytes; files: {', '.join(data)}")
        start = time.perf_counter()
        onnx.checker.check_model(str(out), full_check=True)
        print(f"checker by path (full_check) on the pruned model: ok ({time.perf_counter() - start:.1f} s)")
        _run_in_ort(src, out, args.seq)


def _run_in_ort(src: Path, out: Path, seq: int) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    feeds = {"input_ids": np.arange(seq, dtype=np.int64)[None]}
    shapes = []
    for path in (src, out):
        start = time.perf_counter()
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        shapes.append(session.run(None, feeds)[0].shape)
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
        print(f"ORT ({ort.__version__}, CPUExecutionProvider, 2 threads) runs {path.name} "
              f"({size / 2**30:.2f} GiB on disk): output {shapes[-1]} in {time.perf_counter() - start:.1f} s")
        del session
    print("output shapes match" if shapes[0] == shapes[1] else f"OUTPUT SHAPES DIFFER: {shapes}")


if __name__ == "__main__":
    main()
