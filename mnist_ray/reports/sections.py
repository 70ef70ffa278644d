"""Report sections that training runs and scoring batches share: evaluation on labelled digits, grids."""

from __future__ import annotations

import numpy as np

from mnist_ray.digit_samples import CONFIDENT_MISTAKES, SAMPLE
from mnist_ray.evaluation import metrics_table
from mnist_ray.reports import figures
from mnist_ray.reports.monitoring import LOW_CONFIDENCE, low_confidence_share
from mnist_ray.reports.page import Page


def evaluation(
    page: Page,
    metrics: dict,
    *,
    what: str,
    sample_of: str,
    confidence: np.ndarray | None,
    correct: np.ndarray | None,
    digits: dict[str, dict[str, np.ndarray]] | None,
) -> None:
    """Metrics table, confusion matrices, per-class scores, confidence right vs wrong, digit grids.

    ``what`` names the images (e.g. "test", "labelled"), ``sample_of`` those the random sample
    is drawn from (a batch's sample includes its unlabelled rows); ``confidence`` float (n,) and
    ``correct`` bool (n,) of every labelled prediction, or None when not saved; ``digits``
    as :func:`mnist_ray.digit_samples.read_digits` returns, or None.
    """
    page.markdown_table(metrics_table(metrics))
    page.figure("confusion", figures.confusion_matrices(metrics["confusion_matrix"]),
                f"Confusion matrix of the {what} images: rows are the true class, columns the predicted one; "
                "off-diagonal cells are mistakes.")
    page.figure("per_class", figures.per_class_scores(metrics["per_class"]),
                f"Precision, recall and F1 of each class (n = {what} images of the class).")
    if confidence is not None and correct is not None:
        page.paragraph(
            f"{low_confidence_share(confidence):.2%} of the {what} predictions have confidence below "
            f"{LOW_CONFIDENCE}; accuracy among them {_accuracy(correct[confidence < LOW_CONFIDENCE])}, "
            f"among the rest {_accuracy(correct[confidence >= LOW_CONFIDENCE])}."
        )
        page.figure("confidence", figures.confidence_histogram(confidence, correct, LOW_CONFIDENCE),
                    f"The probability the model gave its predicted class, for right and wrong {what} "
                    "predictions.")
    if digits is None:
        return
    digit_grid(page, "digits_sample", digits[SAMPLE], f"A random sample of {sample_of}",
               "Predicted class and confidence above each digit: green when right, red when wrong (with the "
               "true class), dark grey when the row has no label; its data row below.")
    digit_grid(page, "digits_mistakes", digits[CONFIDENT_MISTAKES], "The most confident mistakes",
               f"The {what} digits the model got wrong with the highest confidence: predicted class, "
               "confidence, true class.")


def digit_grid(page: Page, name: str, digits: dict[str, np.ndarray], title: str, caption: str) -> None:
    """A grid of digits (``digits`` as one set of ``read_digits``), or a line saying there are none.

    Under each digit its data row; when they come from several files, the file's number too,
    with the numbers' files in the caption (row numbers repeat from file to file).
    """
    if not len(digits["image"]):
        page.paragraph(f"{title}: none.", kind="note")
        return
    sources = list(dict.fromkeys(digits["source"].tolist()))
    rows = digits["row"].tolist()
    if len(sources) > 1:
        number = {source: k for k, source in enumerate(sources, start=1)}
        where = [f"#{number[s]} row {r:,}" for s, r in zip(digits["source"].tolist(), rows, strict=True)]
        caption += " Files: " + "; ".join(f"#{k} {source}" for k, source in enumerate(sources, start=1)) + "."
    else:
        where = [f"row {r:,}" for r in rows]
    page.figure(name, figures.digit_grid(digits["image"], digits["label"], digits["predicted"],
                                         digits["confidence"], where, title), caption)


def _accuracy(correct: np.ndarray) -> str:
    return f"{correct.mean():.2%} of {len(correct):,}" if len(correct) else "n/a (none)"
