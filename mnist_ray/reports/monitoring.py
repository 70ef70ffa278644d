"""Checks on a batch without labels: has the class mix shifted, how sure is the model, what was rejected.

Class shift. A batch's predicted class distribution is compared with the class
distribution of the data the model was trained on (``train_class_counts`` in the
run's metadata.json) by two numbers, and flagged only when both agree:

* the total variation distance, TVD = ½ Σ |p_k − q_k|: the share of predictions
  that would have to change class for the two distributions to match. At or
  above SHIFT_TVD (0.10: a tenth of the batch) the shift matters in practice;
* a chi-square goodness-of-fit test of the batch's counts against the training
  shares: below SHIFT_P_VALUE the shift is not sampling noise. A small batch
  drifts by chance (TVD ≈ 0.08 on average for 200 images of ten even classes),
  a huge one shows meaningless shifts as significant: each number alone would
  cry wolf.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.special import chdtrc

from mnist_ray.data.schema import NUM_CLASSES

SHIFT_TVD = 0.10
SHIFT_P_VALUE = 0.01
# Predictions whose top-class probability is below this are "low confidence": worth a human look.
LOW_CONFIDENCE = 0.9


@dataclass(frozen=True)
class ClassShift:
    """How far a batch's predicted classes are from the training data's classes."""

    tvd: float
    p_value: float
    flagged: bool

    def describe(self) -> str:
        verdict = ("SHIFT: the batch's class mix differs from the training data" if self.flagged
                   else "no shift")
        # For huge shifts scipy's p-value underflows to 0, which would read as "impossible".
        p_value = f"p = {self.p_value:.2g}" if self.p_value >= 1e-16 else "p < 1e-16"
        return (f"{verdict} (total variation distance {self.tvd:.3f}, threshold {SHIFT_TVD}; "
                f"chi-square {p_value}, threshold {SHIFT_P_VALUE})")


def class_shift(batch_counts: np.ndarray, reference_counts: np.ndarray) -> ClassShift:
    """Compare predicted class counts (int (10,)) with the training class counts (int (10,))."""
    batch_counts = np.asarray(batch_counts, np.float64)
    reference = np.asarray(reference_counts, np.float64)
    if batch_counts.shape != (NUM_CLASSES,) or reference.shape != (NUM_CLASSES,):
        raise ValueError(f"expected {NUM_CLASSES} counts each, got shapes {batch_counts.shape} and "
                         f"{reference.shape}")
    n = batch_counts.sum()
    if n == 0:
        return ClassShift(tvd=0.0, p_value=1.0, flagged=False)
    # Half a pseudo-count: a class absent from a small training set must not have expected count 0.
    expected_share = (reference + 0.5) / (reference + 0.5).sum()
    tvd = 0.5 * float(np.abs(batch_counts / n - reference / max(1.0, reference.sum())).sum())
    # Pearson's chi-square test of the batch's counts against the reference shares, as
    # scipy.stats.chisquare computes it; scipy.special alone imports in a third of the time.
    expected = expected_share * n
    p_value = float(chdtrc(NUM_CLASSES - 1, float(((batch_counts - expected) ** 2 / expected).sum())))
    return ClassShift(tvd=tvd, p_value=p_value, flagged=tvd >= SHIFT_TVD and p_value < SHIFT_P_VALUE)


def low_confidence_share(confidence: np.ndarray) -> float:
    """The share of predictions below LOW_CONFIDENCE (0 for no predictions)."""
    return float((np.asarray(confidence) < LOW_CONFIDENCE).mean()) if len(confidence) else 0.0


# Parts of a reject reason that vary row by row: which pixel, which value.
_VARYING = [(re.compile(r"\bpixel\d+\b"), "pixelN"), (re.compile(r"'[^']*'"), "'…'"),
            (re.compile(r"-?\d+(\.\d+)?"), "N")]


def reason_kind(reason: str) -> str:
    """A reject reason with its row-specific values replaced: ``pixel37 is 300, outside 0..255``
    → ``pixelN is N, outside N..N``; rows rejected for the same kind of problem then group."""
    for pattern, replacement in _VARYING:
        reason = pattern.sub(replacement, reason)
    return reason


def rejects_by_reason(reasons: list[str], sources: list[str], rows: list[int | None]) -> list[dict]:
    """Rejected rows grouped by :func:`reason_kind`, most frequent first, each with a first example."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for reason, source, row in zip(reasons, sources, rows, strict=True):
        kind = reason_kind(reason)
        counts[kind] += 1
        where = f"{source}, whole file" if row is None else f"{source}, data row {row}"
        example.setdefault(kind, f"{where}: {reason}")
    return [{"reason": kind, "count": n, "example": example[kind]} for kind, n in counts.most_common()]
