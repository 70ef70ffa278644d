"""The report of a scoring batch, from its published output alone (``mnist_ray.score.output.read_batch``).

Every batch gets the monitoring sections — predicted classes against the training
data's, confidence, the least confident digits, rejects by reason — which need no
labels. Batches with labelled rows get the evaluation of training's report first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from mnist_ray.data.schema import NUM_CLASSES
from mnist_ray.digit_samples import LEAST_CONFIDENT, read_digits
from mnist_ray.reports import figures, sections
from mnist_ray.reports.monitoring import (
    LOW_CONFIDENCE,
    class_shift,
    low_confidence_share,
    rejects_by_reason,
)
from mnist_ray.reports.page import Page
from mnist_ray.score import output as scoring_output

MAX_REJECT_KINDS = 20


def render_batch_report(batch_dir: Path) -> tuple[Path, list[str]]:
    """Write ``report.html``, ``report.md`` and ``report/*.png`` into a published batch directory.

    Returns the HTML's path and warnings worth printing in the job's log (a class shift).
    """
    batch = scoring_output.read_batch(batch_dir)
    summary, metrics = batch["summary"], batch["metrics"]
    predictions = batch["predictions"].to_table(columns=["predicted", "confidence", "correct"])
    digits = read_digits(batch["digits"]) if batch["digits"] else None
    kind = "evaluation and monitoring" if metrics else "monitoring"
    page = Page(batch_dir, f"Scoring batch {summary['batch_id']} — {kind}")
    _summary_section(page, summary, predictions.num_rows)
    if metrics:
        page.heading(f"Evaluation on the {metrics['count']:,} labelled rows")
        correct = predictions["correct"]
        labelled = pc.is_valid(correct)
        page.paragraph(f"Accuracy {metrics['accuracy']:.2%} ({metrics['count'] - metrics['errors']:,} of "
                       f"{metrics['count']:,}), macro F1 {metrics['macro_f1']:.4f}.")
        sections.evaluation(
            page, metrics, what="labelled", sample_of="the batch's digits",
            confidence=predictions["confidence"].filter(labelled).to_numpy(),
            correct=correct.filter(labelled).to_numpy(zero_copy_only=False).astype(bool),
            digits=digits,
        )
    warnings = _class_section(page, summary, predictions["predicted"].to_numpy())
    _confidence_section(page, predictions["confidence"].to_numpy(), digits)
    _rejects_section(page, summary, batch["rejects"])
    _no_digits_note(page, digits)
    return page.write(), warnings


def _summary_section(page: Page, summary: dict, published_rows: int) -> None:
    total, seconds = summary["total"], summary["seconds"]
    page.paragraph(
        f"Date {summary['date']}; scored {summary['scored_at']} by model {summary['model_id']} "
        f"({summary.get('model_version') or summary['model_run']}), {seconds['scoring']:.1f} s of scoring"
        + (f" ({seconds['wall']:.1f} s since the job started)" if "wall" in seconds else "")
        + f". {total['rows_in']:,} rows in: "
        f"{total['scored']:,} scored, {total['rejected']:,} rejected; {total['files']} file(s), "
        f"{total['files_rejected']} rejected whole, {total['files_skipped']} skipped as scored before."
    )
    if published_rows != total["scored"]:
        page.paragraph(
            f"Only {published_rows:,} of the {total['scored']:,} predictions of this batch are still "
            "published: a later --force run replaced some of its inputs. The pictures below show what "
            "remains; the counts above are the batch's own.", kind="note",
        )
    page.heading("Inputs")
    page.table(
        ["file", "status", "rows in", "scored", "rejected", "accuracy"],
        [[f["path"], f["status"] + (f": {f['file_error']}" if f["file_error"] else ""), f"{f['rows_in']:,}",
          f"{f['scored']:,}", f"{f['rejected']:,}", "" if f["accuracy"] is None else f"{f['accuracy']:.2%}"]
         for f in summary["inputs"]],
    )


def _class_section(page: Page, summary: dict, predicted: np.ndarray) -> list[str]:
    page.heading("Predicted classes against the training data")
    counts = np.bincount(predicted, minlength=NUM_CLASSES)
    reference = summary.get("model_train_class_counts")
    if not reference:
        page.paragraph("The model's run records no training class counts: no reference to compare with.",
                       kind="note")
        page.table(["class", *map(str, range(NUM_CLASSES))], [["predicted", *[f"{c:,}" for c in counts]]])
        return []
    shift = class_shift(counts, np.asarray(reference))
    page.paragraph(shift.describe(), kind="flag" if shift.flagged else "ok")
    page.figure("classes", figures.class_distribution(counts, np.asarray(reference), "predicted classes"),
                "The share of each predicted class in this batch next to its share in the model's training "
                "data. A shift means the inputs differ from what the model learned from (other sources, "
                "other writers, a broken export), or the model fails on them.")
    return [f"batch {summary['batch_id']}: {shift.describe()}"] if shift.flagged else []


def _confidence_section(page: Page, confidence: np.ndarray, digits: dict | None) -> None:
    page.heading("Confidence")
    page.paragraph(
        f"{low_confidence_share(confidence):.2%} of the {len(confidence):,} predictions "
        f"({int((confidence < LOW_CONFIDENCE).sum()):,}) have confidence below {LOW_CONFIDENCE}: worth a "
        "human look."
    )
    if len(confidence):
        page.figure("confidence_all", figures.confidence_histogram(confidence, None, LOW_CONFIDENCE),
                    "The probability the model gave its predicted class, over every prediction of the batch.")
    if digits is not None:
        sections.digit_grid(
            page, "digits_least_confident", digits[LEAST_CONFIDENT], "The least confident digits",
            "The digits the model was least sure about, least confident first: predicted class and "
            "confidence (green / red when the row had a label).",
        )


def _rejects_section(page: Page, summary: dict, rejects) -> None:
    page.heading("Rejects")
    table = rejects.to_table(columns=["source", "row", "reason"])
    if not table.num_rows:
        page.paragraph("No row or file was rejected.", kind="ok")
        return
    rows = table["row"].to_pylist()
    groups = rejects_by_reason(table["reason"].to_pylist(), table["source"].to_pylist(), rows)
    whole_files = sum(r is None for r in rows)
    page.paragraph(f"{len(rows) - whole_files:,} row(s) and {whole_files} whole file(s) rejected, by reason "
                   "(the rows themselves are in rejects/, with the raw line):", kind="flag")
    page.table(["reason", "count", "first example"],
               [[g["reason"], f"{g['count']:,}", g["example"]] for g in groups[:MAX_REJECT_KINDS]])
    if len(groups) > MAX_REJECT_KINDS:
        page.paragraph(f"… and {len(groups) - MAX_REJECT_KINDS} more kinds of reason.", kind="note")


def _no_digits_note(page: Page, digits: dict | None) -> None:
    if digits is None:
        page.paragraph(f"This batch has no {scoring_output.DIGITS_FILE} (scored by an earlier version): "
                       "no digit grids.", kind="note")
