"""Verification with ONNX Runtime: numeric comparison and latency, original against pruned.

Comparison runs with graph optimisations off (so the check sees the model as written); timing runs
with them on, a fixed thread count and explicit providers, interleaving the two models so that
machine noise hits both alike. Tolerances follow Polygraphy: pass when |a-b| <= atol + rtol*|a|.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import InputError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


def session(model: onnx.ModelProto, optimize: bool = False, threads: int = 1,
            log_severity: int = 3) -> ort.InferenceSession:
    """A CPU session from the in-memory model. Optimisations off by default, so results reflect the
    graph as written; `threads` 0 is ORT's default; `log_severity` 3 shows only ORT's errors, 4
    nothing (for probe runs whose failures are expected). Load failures raise `InputError`."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = log_severity
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


def top1_classes(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's arg-max class, aligned with its integer label. Classes lie on the last axis
    ((N, C) with labels (N,), (N, T, C) with (N, T)) or fill each sample's row ((N, C, 1, 1));
    a count that fits neither raises rather than scoring a misaligned arg-max."""
    scores, target = np.asarray(logits), np.asarray(labels).reshape(-1)
    per_sample = scores.size // target.size if target.size else 0
    last = scores.shape[-1] if scores.ndim else 1
    row = int(np.prod(scores.shape[1:])) if scores.ndim else 1
    if not per_sample or scores.size != per_sample * target.size or per_sample not in (last, row):
        raise InputError(f"{target.size} labels do not match outputs of shape {scores.shape}")
    return scores.reshape(target.size, per_sample).argmax(1)


def top1_correct(logits: np.ndarray, labels: np.ndarray) -> int:
    """How many samples' arg-max class equals their integer label (see `top1_classes`)."""
    return int(np.sum(top1_classes(logits, labels) == np.asarray(labels).reshape(-1)))


def top1_accuracy(logits: "np.ndarray | list[np.ndarray]", labels: "np.ndarray | list[np.ndarray]") -> float:
    """Top-1 accuracy of class scores against integer labels, over one array or a list of batches
    (each sample counts once); the one accuracy that the demo, sensitivity and quantize report."""
    pairs = list(zip(logits, labels)) if isinstance(logits, list) else [(logits, labels)]
    total = sum(int(np.size(lab)) for _, lab in pairs)
    if total == 0:
        raise InputError("no labelled samples to measure accuracy on")
    return sum(top1_correct(out, lab) for out, lab in pairs) / total


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds_list: "Iterable[dict[str, np.ndarray]]",
            atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> VerifyReport:
    """Run both models on each feed and compare every output, worst case over feeds.

    `feeds_list` is streamed (any iterable, read once), so large data never sits in memory. Per
    output, `passed` holds only if every batch passes and each diff figure is its own maximum over
    batches: a later passing batch with a larger diff must never hide an earlier failing one.
    """
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
            worst[name] = cmp if prev is None else _merge(prev, cmp)
    if not worst:
        raise InputError("no input data to compare the models on")
    report.outputs = [worst[n] for n in names]
    return report


def _merge(prev: OutputComparison, cmp: OutputComparison) -> OutputComparison:
    """Worst case of two batches' comparisons of one output, figure by figure."""
    tops = [t for t in (prev.top1_agreement, cmp.top1_agreement) if t is not None]
    return OutputComparison(prev.name, max(prev.max_abs_diff, cmp.max_abs_diff),
                            max(prev.max_rel_diff, cmp.max_rel_diff), min(prev.cosine, cmp.cosine),
                            min(tops) if tops else None, prev.passed and cmp.passed,
                            max(prev.min_atol, cmp.min_atol))


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
    before, after = interleaved_latency([original, pruned], feeds, threads, warmup, runs)
    return LatencyReport(before, after, threads, runs=runs)


def clock_for(threads: int) -> tuple[str, Callable[[], float]]:
    """The clock latency is read with: with one intra-op thread ORT computes on the calling thread,
    so its CPU time is the run's latency without the time other processes steal (on a shared
    machine wall time mostly measures them); with more threads only wall time covers the pool."""
    return ("thread CPU time", time.thread_time) if threads == 1 else ("wall time", time.perf_counter)


def interleaved_latency(models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], threads: int = 1,
                        warmup: int = 10, runs: int = 50) -> list[dict[str, float]]:
    """Median and p90 milliseconds per model, runs interleaved (drift hits all alike), optimisations
    on, read with `clock_for(threads)`."""
    clock = clock_for(threads)[1]
    sessions = [session(m, optimize=True, threads=threads) for m in models]
    for _ in range(warmup):
        for s in sessions:
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for s, t in zip(sessions, times):
            start = clock()
            s.run(None, feeds)
            t.append((clock() - start) * 1e3)
    return [{"median": float(np.median(t)), "p90": float(np.percentile(t, 90))} for t in times]
