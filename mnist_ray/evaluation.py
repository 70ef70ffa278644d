"""Classification metrics from true labels and predictions (training and scoring share this)."""

from __future__ import annotations

import numpy as np

from mnist_ray.schema import CLASS_NAMES, NUM_CLASSES


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true`` and ``y_pred`` are integer class ids 0–9 of equal length. The
    confusion matrix is indexed ``[true][predicted]``. JSON-serialisable.
    """
    # Imported here: sklearn takes ~1.4 s to import, and a scoring job without labels never needs it.
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    labels = list(range(NUM_CLASSES))
    present = np.isin(labels, np.concatenate([y_true, y_pred]))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "count": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
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
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def metrics_table(metrics: dict) -> str:
    """The per-class metrics as a Markdown table, for terminals and reports."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        )
    return "\n".join(lines)
