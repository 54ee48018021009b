"""Classification scores from predicted and true class ids: top-1 accuracy and macro-averaged
precision, recall and F1 (pure numpy).

Macro averages weigh every class alike, so a model that gives up a rare class shows it even when
accuracy barely moves. Classes are those seen in the labels or the predictions; a class never
predicted has precision 0, a class never present recall 0 (as scikit-learn does with
`zero_division=0`), and F1 is the mean of per-class F1 scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassScores:
    accuracy: float
    precision: float
    recall: float
    f1: float
    samples: int


def class_scores(predicted: np.ndarray, labels: np.ndarray) -> ClassScores:
    """Accuracy and macro precision / recall / F1 of integer `predicted` against `labels`."""
    predicted, labels = np.asarray(predicted).reshape(-1), np.asarray(labels).reshape(-1)
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.size} predictions for {labels.size} labels")
    if labels.size == 0:
        raise ValueError("no samples")
    classes, index = np.unique(np.concatenate([labels, predicted]), return_inverse=True)
    truth, guess = index[:labels.size], index[labels.size:]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (truth, guess), 1)
    hits = np.diag(confusion).astype(np.float64)
    predicted_per_class, true_per_class = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted_per_class, out=np.zeros_like(hits), where=predicted_per_class > 0)
    recall = np.divide(hits, true_per_class, out=np.zeros_like(hits), where=true_per_class > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return ClassScores(float(hits.sum() / labels.size), float(precision.mean()), float(recall.mean()),
                       float(f1.mean()), int(labels.size))
