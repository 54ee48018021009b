"""Verification with ONNX Runtime: numeric comparison and latency, original against pruned.

Comparison runs with graph optimisations off (so the check sees the model as written); timing runs
with them on, a fixed thread count and explicit providers, interleaving the two models so that
machine noise hits both alike. Tolerances follow Polygraphy: pass when |a-b| <= atol + rtol*|a|.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import InputError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


def session(model: onnx.ModelProto, optimize: bool = False, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


_INT_RANGE = (0, 4)


def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = 1, dims: dict[str, int] | None = None
                  ) -> dict[str, np.ndarray]:
    """Seeded inputs matching each graph input's dtype and shape; symbolic dims become `batch` or
    the value in `dims`. Integer inputs get small non-negative values (valid ids and masks)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append((dims or {}).get(d.dim_param, batch))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype=bool)
        else:
            feeds[vi.name] = rng.integers(*_INT_RANGE, size=shape).astype(dtype)
    return feeds


@dataclass
class OutputComparison:
    name: str
    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    top1_agreement: float | None
    passed: bool
    min_atol: float
    """The smallest atol (at the given rtol) under which this output would pass."""


@dataclass
class VerifyReport:
    outputs: list[OutputComparison] = field(default_factory=list)
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol,
                "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
                "outputs": [o.__dict__ for o in self.outputs]}


def compare_outputs(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> OutputComparison:
    if a.shape != b.shape:
        return OutputComparison(name, float("inf"), float("inf"), 0.0, None, False, float("inf"))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    rel = diff / np.maximum(np.abs(a64), 1e-12)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    cosine = float(a64.ravel() @ b64.ravel() / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    top1 = None
    if a.ndim >= 2 and np.issubdtype(a.dtype, np.floating) and a.shape[-1] > 1:
        top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    slack = diff - rtol * np.abs(a64)
    min_atol = float(max(slack.max(), 0.0)) if diff.size else 0.0
    return OutputComparison(name, float(diff.max()) if diff.size else 0.0,
                            float(rel.max()) if rel.size else 0.0, cosine, top1,
                            bool(np.all(diff <= atol + rtol * np.abs(a64))), min_atol)


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]],
            atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> VerifyReport:
    """Run both models on each feed and compare every output (worst case over feeds)."""
    sa, sb = session(original), session(pruned)
    names = [o.name for o in sa.get_outputs()]
    if names != [o.name for o in sb.get_outputs()]:
        raise InputError("the two models have different outputs")
    report = VerifyReport(atol=atol, rtol=rtol)
    worst: dict[str, OutputComparison] = {}
    for feeds in feeds_list:
        ra, rb = sa.run(None, feeds), sb.run(None, feeds)
        for name, a, b in zip(names, ra, rb):
            cmp = compare_outputs(name, np.asarray(a), np.asarray(b), atol, rtol)
            prev = worst.get(name)
            if prev is None or cmp.max_abs_diff > prev.max_abs_diff or not cmp.passed:
                worst[name] = cmp
    report.outputs = [worst[n] for n in names]
    return report


@dataclass
class LatencyReport:
    before_ms: dict[str, float]
    after_ms: dict[str, float]
    threads: int
    provider: str = "CPUExecutionProvider"
    runs: int = 50

    @property
    def ratio(self) -> float:
        return self.after_ms["median"] / self.before_ms["median"] if self.before_ms["median"] else float("nan")

    def to_dict(self) -> dict:
        return {"before": self.before_ms, "after": self.after_ms, "ratio": self.ratio,
                "threads": self.threads, "provider": self.provider, "runs": self.runs}


def benchmark(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
              threads: int = 1, warmup: int = 10, runs: int = 50) -> LatencyReport:
    """Median and p90 latency of both models, runs interleaved, optimisations on."""
    sa, sb = session(original, optimize=True, threads=threads), session(pruned, optimize=True, threads=threads)
    for _ in range(warmup):
        sa.run(None, feeds)
        sb.run(None, feeds)
    ta, tb = [], []
    for _ in range(runs):
        for sess, times in ((sa, ta), (sb, tb)):
            start = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - start) * 1e3)
    stat = lambda t: {"median": float(np.median(t)), "p90": float(np.percentile(t, 90))}  # noqa: E731
    return LatencyReport(stat(ta), stat(tb), threads, runs=runs)
