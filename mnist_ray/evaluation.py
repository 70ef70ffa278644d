"""Classification metrics from true labels and predictions (training and scoring share this)."""

from __future__ import annotations

import numpy as np

from mnist_ray.data.schema import CLASS_NAMES, NUM_CLASSES


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true`` and ``y_pred`` are integer class ids 0–9 of equal length. The
    confusion matrix is indexed ``[true][predicted]``. JSON-serialisable.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    for name, ids in (("y_true", y_true), ("y_pred", y_pred)):
        if ids.size and not 0 <= ids.min() <= ids.max() < NUM_CLASSES:
            raise ValueError(f"{name} holds a class id outside 0..{NUM_CLASSES - 1}")
    # Counted with numpy rather than sklearn.metrics: importing sklearn took ~0.6 s of a 10,000-row
    # scoring job's ~5 s. The figures are sklearn's (zero_division=0); a test holds them equal.
    confusion = np.bincount(y_true * NUM_CLASSES + y_pred, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES)
    hits = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * hits, support + predicted)
    present = (support + predicted) > 0
    return {
        "count": int(len(y_true)),
        "accuracy": float(hits.sum() / len(y_true)) if len(y_true) else 0.0,
        "errors": int((y_true != y_pred).sum()),
        # Over the classes present (in truth or prediction), as sklearn's "macro":
        # a digit absent from a small sample must not count as F1 = 0.
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(CLASS_NAMES)
        },
        "confusion_matrix": confusion.tolist(),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def metrics_table(metrics: dict) -> str:
    """The per-class metrics as a Markdown table, for terminals and reports."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        )
    return "\n".join(lines)
