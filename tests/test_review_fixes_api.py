"""Regression tests for review findings on the API, verification and CLI (real tiny ONNX models, ORT)."""

from __future__ import annotations

import inspect
import weakref

import numpy as np
import pytest
from onnx import TensorProto

import onnxprune
from builders import GraphBuilder
from onnxprune import api
from onnxprune.errors import InputError
from onnxprune.passes.recover import RECOVER_METHODS
from onnxprune.verify import DEFAULT_ATOL, DEFAULT_RTOL, compare


def _scale_models():
    """y = x (original) and y = 1.0005 x + 2e-4 (pruned): fails near 0 with a small diff, passes at
    large |x| (within rtol) with a larger diff."""
    models = []
    for scale, shift in ((1.0, 0.0), (1.0005, 2e-4)):
        b = GraphBuilder()
        x = b.input([1, 4])
        y = b.op("Add", [b.op("Mul", [x, b.const(np.array(scale, np.float32))]), b.const(np.array(shift, np.float32))])
        b.output(y, TensorProto.FLOAT, [1, 4])  # same builder sequence: same output name in both models
        models.append(b.model())
    return models


def _cnn(spread: bool = False):
    """conv A (3->8) relu conv B (8->8) relu conv C (8->4); with `spread`, A has 7 tiny channels and one large."""
    b = GraphBuilder(seed=1)
    x = b.input([1, 3, 8, 8])
    wa = b.rng.standard_normal([8, 3, 3, 3]).astype(np.float32)
    if spread:
        wa[1:] *= 1e-3
    h = b.op("Conv", [x, b.const(wa, "w"), b.weight([8], "b")], kernel_shape=[3, 3], pads=[1] * 4)
    h = b.op("Relu", [h])
    h = b.op("Relu", [b.conv(h, 8, 8)])
    out = b.conv(h, 8, 4)
    b.output(out, TensorProto.FLOAT, [1, 4, 8, 8])
    return b.model()


def _feeds(n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal([1, 3, 8, 8]).astype(np.float32)} for _ in range(n)]


# finding 1: a later passing batch with a larger diff must not hide an earlier failing one
def test_compare_failing_batch_not_replaced_by_passing_batch():
    a, b = _scale_models()
    failing = {"x": np.zeros([1, 4], np.float32)}
    passing = {"x": np.full([1, 4], 100.0, np.float32)}
    assert not compare(a, b, [failing]).passed
    report = compare(a, b, [failing, passing])
    assert not report.passed
    assert report.max_abs_diff > 0.04  # the larger diff of the passing batch is still reported
    assert not compare(a, b, [passing, failing]).passed


# finding 12: verification streams its batches instead of holding them all
def test_verify_streams_batches():
    model = _cnn()
    refs: list[weakref.ref] = []

    def batches():
        rng = np.random.default_rng(0)
        for k in range(5):  # each batch made here, held by nobody else
            feed = {"x": rng.standard_normal([1, 3, 8, 8]).astype(np.float32)}
            if k >= 2:
                assert refs[k - 2]() is None, "an earlier batch is still held: data was not streamed"
            refs.append(weakref.ref(feed["x"]))
            yield feed

    assert onnxprune.verify(model, model, data=batches()).passed


# finding 3: one-shot sources (generators, get_next readers) are read by several steps
def test_prune_with_generator_data_and_verify():
    model = _cnn()
    result = onnxprune.prune(model, ratio=0.25, data=(f for f in _feeds()), verify=True, atol=1e6)
    assert result.report.verify is not None and result.report.verify.outputs and result.report.channels_removed > 0


class _Reader:
    """Like ONNX Runtime's CalibrationDataReader: get_next() until None."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def test_prune_with_reader_lstsq_seq_and_verify():
    model = _cnn()
    result = onnxprune.prune(model, ratio=0.25, data=_Reader(_feeds()), recover="lstsq-seq", verify=True,
                             atol=1e6, quiet=True)
    assert result.report.verify is not None and result.report.verify.outputs  # batches were read


def test_sensitivity_with_generator_data():
    from onnxprune.sensitivity import sensitivity

    result = sensitivity(_cnn(), (f for f in _feeds()), ratios=[0.5], criterion="activation", recover="bias",
                         quiet=True)
    assert result.samples == 3


# finding 4: --plan auto with --recover lstsq-seq passes the data on to each measurement
def test_auto_plan_with_lstsq_seq():
    result = onnxprune.prune(_cnn(), plan="auto", target_macs=0.8, recover="lstsq-seq", data=_feeds(), quiet=True)
    assert result.report.channels_removed > 0


# finding 8: options are honoured or refused, never silently ignored
def test_global_scope_honours_max_ratio():
    model = _cnn(spread=True)
    default = onnxprune.prune(model, ratio=0.5, scope="global")
    assert max(layer["removed"] for layer in default.report.layers) > 4  # the tiny channels of conv A go first
    capped = onnxprune.prune(model, ratio=0.5, scope="global", max_ratio=0.5)
    assert all(layer["removed"] <= layer["channels"] // 2 for layer in capped.report.layers)


def test_auto_plan_honours_round_to():
    result = onnxprune.prune(_cnn(), plan="auto", target_macs=0.5, round_to=4, data=_feeds(), quiet=True)
    for layer in result.report.layers:
        kept = layer["channels"] - layer["removed"]
        assert kept % 4 == 0 or kept == layer["channels"], layer


@pytest.mark.parametrize("options, words", [
    ({"ratio": 0.3, "target_macs": 0.5}, "ratio"),
    ({"head_ratio": 0.5, "target_macs": 0.5}, "head_ratio"),
    ({"head_ratio": 0.5, "target_latency": 0.5}, "head_ratio"),
    ({"lossless": True, "ratio": 0.3}, "lossless"),
    ({"lossless": True, "target_params": 0.5}, "lossless"),
    ({"lossless": True, "head_ratio": 0.5}, "lossless"),
])
def test_ignored_option_combinations_are_refused(options, words):
    with pytest.raises(InputError, match=words):
        onnxprune.prune(_cnn(), **options)


def test_plan_replay_refuses_selection_options():
    model = _cnn()
    plan = onnxprune.prune(model, ratio=0.25).plan
    for options in ({"criterion": "l2"}, {"ratio": 0.3}, {"scope": "global"}, {"round_to": 2}, {"head_ratio": 0.5}):
        with pytest.raises(InputError, match="replayed plan"):
            onnxprune.prune(model, plan=plan, **options)
    onnxprune.prune(model, plan=plan, recover="none")  # defaults still replay


# finding 23: one list of recovery methods, the verify defaults from verify.py
def test_cli_uses_shared_constants():
    from onnxprune.cli import _parser

    parser = _parser()
    args = parser.parse_args(["verify", "a.onnx", "b.onnx"])
    assert (args.atol, args.rtol) == (DEFAULT_ATOL, DEFAULT_RTOL)
    prune_sub = parser._subparsers._group_actions[0].choices
    for command in ("prune", "sensitivity"):
        action = next(a for a in prune_sub[command]._actions if a.dest == "recover")
        assert tuple(action.choices) == RECOVER_METHODS


# finding 26: the choice helpers and feed loaders are typed
@pytest.mark.parametrize("name", ["_choose", "_choose_for_target", "_choose_for_latency", "load_feeds", "iter_feeds"])
def test_helpers_are_typed(name):
    sig = inspect.signature(getattr(api, name))
    assert sig.return_annotation is not inspect.Signature.empty
    assert all(p.annotation is not inspect.Parameter.empty for n, p in sig.parameters.items() if n != "data")
