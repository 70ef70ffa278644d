"""The report of a training run, from its run directory alone (see :mod:`mnist_ray.artifacts`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from mnist_ray import artifacts
from mnist_ray.digit_samples import read_digits
from mnist_ray.reports import figures, sections
from mnist_ray.reports.page import Page


def render_run_report(run_dir: Path) -> tuple[Path, list[str]]:
    """Write ``report.html``, ``report.md`` and ``report/*.png`` into a finished run directory.

    Returns the HTML's path and the warnings worth printing (none for a run).
    """
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    history = artifacts.read_json(run_dir / artifacts.HISTORY_JSON)
    # An ensemble's history holds every member's epochs: the curves show member 0's.
    history = [record for record in history if record.get("member", 0) == 0]
    metrics = artifacts.read_json(run_dir / artifacts.METRICS_FILE)
    page = Page(run_dir, f"Training run {run_dir.name}")
    selected = metadata.get("selected_epoch", {}).get("epoch")
    page.paragraph(
        f"Test accuracy {metrics['accuracy']:.2%} ({metrics['count'] - metrics['errors']:,} of "
        f"{metrics['count']:,} images right), macro F1 {metrics['macro_f1']:.4f}. "
        f"The model is epoch {selected} of {len(history)}, chosen by validation accuracy; "
        "the test set was used for this report only."
    )
    page.paragraph(
        f"Created {metadata.get('created', '?')}; wall time {metadata.get('wall_seconds', '?')} s; "
        f"code {metadata.get('git_commit') or 'unknown'}; model id {artifacts.model_id(run_dir)}.",
        kind="note",
    )
    if "ensemble" in metadata:
        _ensemble_section(page, metadata["ensemble"], metrics)
    _data_section(page, metadata)
    _config_section(page, metadata["config"])
    page.heading("Training curves")
    page.figure("curves", figures.training_curves(history, selected),
                "Accuracy and loss per epoch on the training data (with augmentation and dropout) and on "
                "the validation split; the learning rate; the dotted line marks the selected epoch.")
    _test_section(page, run_dir, metrics)
    page.heading("Versions")
    page.table(["package", "version"], [[k, v] for k, v in metadata.get("versions", {}).items()])
    return page.write(), []


def _ensemble_section(page: Page, members: list[dict], metrics: dict) -> None:
    page.heading("Ensemble")
    page.paragraph(f"The model averages the probabilities of {len(members)} members, each trained as a Ray "
                   "Train run of its own with its own seed and selected at its best validation epoch "
                   "(the curves below are member 0's).")
    rows = [[m["member"], m["seed"], m["selected_epoch"], f"{m['val_accuracy']:.4f}",
             f"{m['test_accuracy']:.2%}"] for m in members]
    rows.append(["ensemble", "", "", "", f"{metrics['accuracy']:.2%}"])
    page.table(["member", "seed", "selected epoch", "val accuracy", "test accuracy"], rows)


def _data_section(page: Page, metadata: dict) -> None:
    data = metadata["data"]
    rows = data["rows"]
    page.heading("Data")
    page.table(
        ["split", "images"],
        [["training", f"{rows['train']:,}"], ["validation", f"{rows['val']:,}"],
         [f"test ({data.get('test_set', 'held out')})", f"{rows['test']:,}"]],
    )
    page.paragraph(
        f"Sources: {', '.join(data['data'])}"
        + (f"; test data: {', '.join(data['test_data'])}" if data.get("test_data") else "")
        + f". Fingerprint {data.get('fingerprint', '?')}; seed {data.get('seed')}"
        + (f"; limited to {data['limit']:,} images" if data.get("limit") else "") + "."
    )
    if data.get("train_class_counts"):
        counts = data["train_class_counts"]
        page.table(["class", *map(str, range(len(counts)))],
                   [["training images", *[f"{c:,}" for c in counts]]])


def _config_section(page: Page, settings: dict) -> None:
    page.heading("Configuration")
    train = settings.get("train", {})
    page.table(["setting", "value"], [[k, v] for k, v in train.items()])


def _test_section(page: Page, run_dir: Path, metrics: dict) -> None:
    page.heading("Test set")
    predictions_path = run_dir / artifacts.TEST_PREDICTIONS_FILE
    digits_path = run_dir / artifacts.TEST_DIGITS_FILE
    confidence = correct = digits = None
    if predictions_path.is_file() and digits_path.is_file():
        predictions = pq.read_table(predictions_path, columns=["label", "predicted", "confidence"])
        confidence = predictions["confidence"].to_numpy()
        correct = predictions["label"].to_numpy() == predictions["predicted"].to_numpy()
        digits = read_digits(digits_path)
    else:
        page.paragraph(
            f"This run directory has no {artifacts.TEST_PREDICTIONS_FILE} / {artifacts.TEST_DIGITS_FILE} "
            "(it was trained by an earlier version): no confidence histogram or digit grids.", kind="note",
        )
    sections.evaluation(page, metrics, what="test", sample_of="the test digits", confidence=confidence,
                        correct=correct, digits=digits)
