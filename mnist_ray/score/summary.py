"""What a batch says about itself: the per-file record (summary and manifest), the summary, its table.

One record per published input (:func:`file_record`) goes both into the batch's
``summary.json`` and, with the batch's identity, into the output's manifest.
"""

from __future__ import annotations

from pathlib import Path

from mnist_ray.errors import EXIT_OK, EXIT_REJECTS
from mnist_ray.reports import write_report
from mnist_ray.score import output
from mnist_ray.score.collect import FileResult
from mnist_ray.score.inference import ScoringModel
from mnist_ray.score.inputs import InputFile
from mnist_ray.score.output import PREDICTIONS, REJECTS, StagedBatch


def build_summary(
    batch: StagedBatch,
    model: ScoringModel,
    inputs: list[InputFile],
    published: list[InputFile],
    changed: list[InputFile],
    results: dict[str, FileResult],
    seconds: dict[str, float],
) -> dict:
    """The batch summary: per input and in total (rows in = scored + rejected), skipped and unpublished.

    ``seconds``: the job's wall time so far (``wall``, from its process's start) and its parts
    (``start_up`` until scoring began, ``scoring``), rounded here.
    """
    files = [_file_summary(batch, item, results[item.path]) for item in published]
    total = {key: sum(f[key] for f in files) for key in ("rows_in", "scored", "rejected")}
    total["files"] = len(files)
    total["files_rejected"] = sum(f["status"] == "rejected" for f in files)
    total["files_empty"] = sum(f["status"] == "empty" for f in files)
    total["files_skipped"] = sum(i.previous is not None for i in inputs)
    if total["rows_in"] != total["scored"] + total["rejected"]:
        raise RuntimeError(f"counts do not add up: {total}")
    problems = total["rejected"] or any(f["file_error"] for f in files)
    return {
        "batch_id": batch.batch_id,
        "date": batch.date,
        "model_id": batch.model_id,
        "model_version": model.version,
        "model_run": str(model.run_dir),
        "model_train_class_counts": model.train_class_counts,
        "scored_at": batch.scored_at.isoformat(),
        "inputs": files,
        "total": total,
        "skipped": [
            # same_as: the earlier copy's path; an input repeating one of this batch has its batch id
            {"path": i.path, "sha256": i.sha256, "same_as": i.previous["path"],
             "batch_id": i.previous["batch_id"] or batch.batch_id, "date": i.previous["date"] or batch.date}
            for i in inputs if i.previous is not None
        ],
        "not_published": [
            {"path": i.path, "reason": "the file changed while it was being scored; the next run scores it"}
            for i in changed
        ],
        "seconds": {part: round(value, 1) for part, value in seconds.items()},
        # Over the scoring part: what the engine does; the wall time includes start-up.
        "rows_per_s": round(total["rows_in"] / seconds["scoring"], 1) if seconds["scoring"] > 0 else None,
        "exit_code": EXIT_REJECTS if problems else EXIT_OK,
    }


def file_record(batch: StagedBatch, item: InputFile, result: FileResult) -> dict:
    """What the summary and the manifest both say of one published input: identity, counts, parts."""
    parts = batch.parts.get(item.path, {PREDICTIONS: [], REJECTS: []})
    return {
        "path": item.path,
        "size": item.size,
        "sha256": item.sha256,
        "status": result.status,
        "rows_in": result.rows_in,
        "scored": result.scored,
        "rejected": result.rejected,
        "file_error": result.file_error,
        PREDICTIONS: parts[PREDICTIONS],
        REJECTS: parts[REJECTS],
    }


def _file_summary(batch: StagedBatch, item: InputFile, result: FileResult) -> dict:
    labelled = sum(len(a) for a in result.y_true)
    correct = sum(int((t == p).sum()) for t, p in zip(result.y_true, result.y_pred, strict=True))
    return file_record(batch, item, result) | {
        "labelled": labelled, "accuracy": correct / labelled if labelled else None,
    }


def manifest_entries(
    batch: StagedBatch, published: list[InputFile], results: dict[str, FileResult], manifest: list[dict]
) -> tuple[list[dict], list[str]]:
    """The manifest lines of the published inputs, and the earlier parts they replace.

    Inputs that could not be hashed are not recorded: the next run tries them again.
    """
    entries, replaced = [], []
    for item in published:
        if item.sha256 is None:
            continue
        old_parts, old_batches = output.superseded(manifest, item.path, batch.model_id, batch.date)
        replaced += old_parts
        entries.append(file_record(batch, item, results[item.path]) | {
            "model_id": batch.model_id, "model_version": batch.model_version, "batch_id": batch.batch_id,
            "date": batch.date,
            "scored_at": batch.scored_at.isoformat(), "replaces": old_batches,
        })
    return entries, replaced


def show_batch(batch_dir: Path) -> int:
    """Print a published batch's summary and write its report, as its job would; returns its exit code."""
    batch = output.read_batch(batch_dir)
    print_summary(batch["summary"], batch["metrics"], batch_dir)
    write_report(batch_dir)
    return batch["summary"]["exit_code"]


def print_summary(summary: dict, metrics: dict | None, batch_dir: Path) -> None:
    """The summary as a table: a line per input, the total, the accuracy when labels exist."""
    version = f" ({summary['model_version']})" if summary.get("model_version") else ""
    lines = [f"\nbatch {summary['batch_id']}  date {summary['date']}  model {summary['model_id']}{version}",
             f"{'rows in':>12} {'scored':>12} {'rejected':>10}  file"]
    for f in summary["inputs"]:
        note = f"  ({f['status']}: {f['file_error']})" if f["file_error"] else ""
        note = note or ("  (empty: a header and no data rows)" if f["status"] == "empty" else "")
        lines.append(f"{f['rows_in']:>12,} {f['scored']:>12,} {f['rejected']:>10,}  {f['path']}{note}")
    total = summary["total"]
    lines.append(
        f"{total['rows_in']:>12,} {total['scored']:>12,} {total['rejected']:>10,}  total: "
        f"{total['files']} file(s), {total['files_rejected']} rejected whole, "
        f"{total.get('files_empty', 0)} empty, "
        f"{total['files_skipped']} skipped as already scored"
    )
    for item in summary["not_published"]:
        lines.append(f"not published: {item['path']}: {item['reason']}")
    if metrics is not None:
        lines.append(
            f"accuracy {metrics['accuracy']:.4%} on {metrics['count']:,} labelled rows "
            f"({metrics['errors']:,} errors), macro F1 {metrics['macro_f1']:.4f}"
        )
    seconds = summary["seconds"]
    wall = f", {seconds['wall']:.1f}s since the job started" if "wall" in seconds else ""
    lines.append(
        f"{summary['rows_per_s'] or 0:,.0f} rows/s over {seconds['scoring']:.1f}s of scoring{wall}; "
        f"batch directory: {batch_dir}"
    )
    print("\n".join(lines), flush=True)
