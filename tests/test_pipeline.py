"""End-to-end: prune real tiny models and check them in ONNX Runtime."""

import onnx
import pytest

import onnxprune
from builders import small_cnn
from reference import assert_matches_masked


def test_prune_small_cnn_is_valid_and_matches_masked_reference():
    model = small_cnn()
    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.after.params < result.report.before.params
    assert_matches_masked(model, result)


def test_input_model_is_not_modified():
    model = small_cnn()
    before = model.SerializeToString()
    onnxprune.prune(model, ratio=0.5)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_every_criterion_and_scope(criterion, scope):
    model = small_cnn(seed=3)
    result = onnxprune.prune(model, ratio=0.4, criterion=criterion, scope=scope)
    assert result.report.channels_removed > 0
    assert_matches_masked(model, result)
