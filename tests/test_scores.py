"""Accuracy and macro precision / recall / F1 (onnxprune.scores)."""

import numpy as np
import pytest

from onnxprune.scores import class_scores


def test_perfect_predictions_score_one():
    s = class_scores(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2]))
    assert (s.accuracy, s.precision, s.recall, s.f1, s.samples) == (1.0, 1.0, 1.0, 1.0, 4)


def test_macro_scores_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    s = class_scores(predicted, labels)
    # class 0: P 2/2 R 2/3; class 1: P 1/2 R 1/2; class 2: P 1/2 R 1/1
    precision = (1 + 0.5 + 0.5) / 3
    recall = (2 / 3 + 0.5 + 1) / 3
    f1 = (2 * 1 * (2 / 3) / (1 + 2 / 3) + 0.5 + 2 * 0.5 / 1.5) / 3
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.precision == pytest.approx(precision)
    assert s.recall == pytest.approx(recall)
    assert s.f1 == pytest.approx(f1)


def test_a_class_never_predicted_has_zero_precision_and_recall():
    s = class_scores(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
    # class 0: P 3/4 R 1; class 1: P 0 (never predicted) R 0
    assert s.precision == pytest.approx(0.375)
    assert s.recall == pytest.approx(0.5)
    assert s.accuracy == pytest.approx(0.75)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        class_scores(np.array([0, 1]), np.array([0]))
