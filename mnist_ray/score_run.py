"""One scoring batch end to end: model → inputs → Ray Data → staged Parquet → publication → summary.

This is what ``jobs/score.py`` runs. Inputs the manifest says this model has
already scored (same path, same content) are skipped unless ``--force``; the
rest are read, validated and scored by :mod:`mnist_ray.scoring` (with Ray Data,
or in this process for small inputs on one machine: :func:`~mnist_ray.scoring.choose_executor`)
and written by :mod:`mnist_ray.scoring_output`, which publishes the batch atomically.
Exit codes are documented in :mod:`mnist_ray.cli`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray

from mnist_ray import artifacts, scoring_output
from mnist_ray.cli import EXIT_OK, EXIT_REJECTS, JobFailed, score_parser
from mnist_ray.csv_format import file_digest, resolve_csv_paths
from mnist_ray.digit_samples import DigitSampler
from mnist_ray.evaluation import classification_metrics
from mnist_ray.ray_setup import connect_ray
from mnist_ray.reports import write_report
from mnist_ray.schema import IMAGE_SHAPE, NUM_CLASSES
from mnist_ray.scoring import (
    ABSENT,
    END_OF_FILE,
    FILE,
    IMAGE_ID,
    IMAGE_ROW,
    KIND,
    LABEL,
    PIXELS,
    PROBS,
    RAW,
    REASON,
    REJECTED_FILE,
    REJECTED_ROW,
    ROW,
    InferenceOptions,
    choose_executor,
    enable_gpu_memory_growth,
    load_model_file,
    local_stream,
    scored_stream,
)
from mnist_ray.scoring_output import PREDICTION_SCHEMA, PREDICTIONS, REJECTS, StagedBatch

PROGRESS_SECONDS = 10.0
MAX_SKIPS_LISTED = 20


@dataclass
class InputFile:
    """One resolved input and what the driver knows of it before scoring."""

    path: str
    size: int | None = None
    sha256: str | None = None
    unreadable: str | None = None  # why its bytes could not be read for hashing
    previous: dict | None = None  # the manifest entry of an earlier scoring of this content


@dataclass
class FileResult:
    """What came back for one input: counts, the reader's own digest, labels for metrics."""

    path: str
    rows_in: int | None = None  # data lines the reader counted; None until its end arrives
    scored: int = 0
    rejected: int = 0
    file_error: str | None = None
    read_sha256: str | None = None  # of the bytes the reader read, if it read the whole file
    y_true: list[np.ndarray] = field(default_factory=list)
    y_pred: list[np.ndarray] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.rows_in is not None and self.scored + self.rejected == self.rows_in

    @property
    def status(self) -> str:
        if self.file_error is not None:
            return "incomplete" if self.rows_in else "rejected"
        return "rows_rejected" if self.rejected else "scored"


@dataclass(frozen=True)
class ScoringModel:
    """The model a batch scores with: where it came from, its bytes (sent to the actors), its id."""

    run_dir: Path
    model_file: bytes
    model_id: str
    # The training data's class counts (metadata.json): the batch report's reference distribution.
    train_class_counts: list[int] | None = None


@dataclass
class Staged:
    """A batch written to staging, ready to publish."""

    summary: dict
    metrics: dict | None
    published: list[InputFile]  # the inputs whose rows (or rejection) this batch publishes
    changed: list[InputFile]  # inputs that changed while read: left out, scored by the next run
    results: dict[str, FileResult]


def main(args: argparse.Namespace) -> int:
    """The scoring job for parsed flags (``mnist_ray.cli.score_parser``)."""
    if "://" in args.output:
        score_parser().error("--output must be a local or mounted directory (atomic renames need one)")
    paths = resolve_csv_paths(args.input)
    if args.submission and len(paths) != 1:
        score_parser().error(f"--submission needs exactly one input file; {len(paths)} matched")
    run_dir = artifacts.resolve_run_dir(args.model)
    model = load_scoring_model(run_dir)
    output_dir = Path(args.output).resolve()
    executor = choose_executor(
        args.executor, address=args.address, use_gpu=args.use_gpu, input_bytes=input_size(paths)
    )
    # Both take seconds, mostly in other processes or threads: Ray's start overlaps the model's
    # safe-mode load (TensorFlow's import), unless the inputs look already scored.
    with ThreadPoolExecutor(max_workers=1) as pool:
        loaded = pool.submit(check_model_file, run_dir / artifacts.MODEL_FILE, model.model_file)
        if executor == "ray" and (
            args.force or not looks_scored(paths, scoring_output.read_manifest(output_dir), model.model_id)
        ):
            connect_ray(args.address)
        keras_model = loaded.result()  # RunDirError (exit 2) before anything is written
    date = args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    options = InferenceOptions(
        batch_size=args.batch_size, concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu,
    )
    # In this process, the model the check loaded scores; with Ray, each actor loads its own.
    local_model = keras_model if executor == "local" else None
    try:
        with scoring_output.locked(output_dir):
            recovered = [show_batch(batch_dir) for batch_dir in scoring_output.recover(output_dir)]
            code = score_batch(
                paths, model, output_dir, date, options, force=args.force, address=args.address,
                local_model=local_model,
            )
            # The batch an interrupted job could not report on is reported now.
            if code == EXIT_OK and EXIT_REJECTS in recovered:
                code = EXIT_REJECTS
            if args.submission:
                write_submission(output_dir, paths[0], model.model_id, Path(args.submission))
    except scoring_output.OutputInUse as exc:
        raise JobFailed(str(exc)) from None
    return code


def looks_scored(paths: list[str], manifest: list[dict], model_id: str) -> bool:
    """Whether every input is in the manifest, at its current size, scored by this model: a hint
    only (read without the output's lock, sizes not contents) that Ray may not be needed."""
    scored = {(e["path"], e["size"]) for e in manifest if e["model_id"] == model_id}
    for path in paths:
        try:
            if (path, os.path.getsize(path)) not in scored:
                return False
        except OSError:
            return False
    return True


def input_size(paths: list[str]) -> int | None:
    """The inputs' total stored size in bytes; None if one cannot be had cheaply (a URI, an error)."""
    try:
        return sum(os.path.getsize(path) for path in paths)
    except OSError:
        return None


def load_scoring_model(run_dir: Path) -> ScoringModel:
    """The model of a run fit to score, but for the safe-mode load of its file (:func:`check_model_file`);
    raises ``RunDirError`` if the run is not fit (before anything is written)."""
    metadata = artifacts.check_scoring_run(run_dir)
    model_file = (run_dir / artifacts.MODEL_FILE).read_bytes()
    counts = metadata.get("data", {}).get("train_class_counts")
    return ScoringModel(run_dir, model_file, artifacts.content_id(model_file), counts)


def check_model_file(path: Path, model_file: bytes):
    """The model in ``model_file``, loaded in safe mode; raises ``RunDirError`` unless it loads and
    maps 28×28 images to 10 classes."""
    # The first TensorFlow work of the job's process: on a GPU node, before it claims every GPU's memory.
    enable_gpu_memory_growth()
    try:
        model = load_model_file(model_file)
    except Exception as exc:  # any failure to load means the same thing: this file cannot score
        raise artifacts.RunDirError(f"{path} cannot be loaded: {exc}") from exc
    if tuple(model.input_shape) != (None, *IMAGE_SHAPE) or tuple(model.output_shape) != (None, NUM_CLASSES):
        raise artifacts.RunDirError(
            f"{path} takes {model.input_shape} and returns {model.output_shape}; "
            f"expected (None, 28, 28) → (None, {NUM_CLASSES})"
        )
    return model


def score_batch(
    paths: list[str],
    model: ScoringModel,
    output_dir: Path,
    date: str,
    options: InferenceOptions,
    *,
    force: bool,
    address: str | None,
    local_model=None,
) -> int:
    """Score the inputs this model has not scored yet as one batch and publish it; returns the exit code.

    With ``local_model`` (the model, loaded) they are scored in this process, else with Ray
    (``address``, or a Ray started here)."""
    inputs = plan_inputs(paths, scoring_output.read_manifest(output_dir), model.model_id, force=force)
    todo = [i for i in inputs if i.previous is None]
    if not todo:
        print(f"nothing to score: all {len(inputs)} input(s) were scored before by model {model.model_id}",
              flush=True)
        return EXIT_OK
    started = datetime.datetime.now(datetime.timezone.utc)
    batch = StagedBatch(output_dir, scoring_output.new_batch_id(started), date, model.model_id, started)
    print(
        f"batch {batch.batch_id}: scoring {len(todo)} file(s) with model {model.model_id} ({model.run_dir}), "
        f"date {date}",
        flush=True,
    )
    try:
        staged = stage(batch, model, inputs, options, address, local_model)
    except BaseException:
        batch.remove()  # nothing was published; the next job would remove it anyway
        raise
    manifest = scoring_output.read_manifest(output_dir)
    entries, replaced = manifest_entries(batch, staged.published, staged.results, manifest)
    batch_dir = scoring_output.publish(batch, entries, replaced)
    print_summary(staged.summary, staged.metrics, batch_dir)
    write_report(batch_dir)
    if staged.changed:
        raise JobFailed(
            f"{', '.join(i.path for i in staged.changed)} changed while being scored: not published; "
            "the next run scores it"
        )
    return staged.summary["exit_code"]


def stage(
    batch: StagedBatch, model: ScoringModel, inputs: list[InputFile], options: InferenceOptions,
    address: str | None, local_model=None,
) -> Staged:
    """Score the inputs not skipped into ``batch``, check the counts, stage summary and metrics."""
    clock = time.monotonic()
    todo = [i for i in inputs if i.previous is None]
    readable = [i for i in todo if i.unreadable is None]
    results = {i.path: FileResult(i.path) for i in todo}
    digits = DigitSampler()
    paths = [i.path for i in readable]
    if readable and local_model is not None:
        print(f"inference: in this process (no Ray), batch size {options.batch_size}", flush=True)
        if options.concurrency is not None or options.cpus_per_actor != InferenceOptions.cpus_per_actor:
            print("note: --concurrency and --cpus-per-actor size Ray's actor pool; scoring in this process, "
                  "TensorFlow uses all of this machine's cores (--executor ray to apply them)", flush=True)
        stream_into(batch, readable, results, digits, local_stream(paths, local_model, options))
    elif readable:
        connect_ray(address)
        options = options.resolved(ray.cluster_resources())
        print(
            f"inference: Ray Data, up to {options.concurrency} actor(s) × {options.cpus_per_actor} CPU"
            f"{' + 1 GPU' if options.use_gpu else ''}, batch size {options.batch_size}",
            flush=True,
        )
        input_bytes = sum(i.size or 0 for i in readable)
        records = scored_stream(paths, model.model_file, options, input_bytes=input_bytes)
        stream_into(batch, readable, results, digits, records)
    for item in todo:
        if item.unreadable is not None:
            batch.add_rejects(item.path, [None], [item.unreadable], [""])
            results[item.path] = FileResult(item.path, rows_in=0, file_error=item.unreadable)
    check_counts(results.values())
    changed = [i for i in readable if results[i.path].read_sha256 not in (None, i.sha256)]
    for item in changed:
        batch.discard(item.path)
    published = [i for i in todo if i not in changed]
    seconds = time.monotonic() - clock
    summary = build_summary(batch, model, inputs, published, changed, results, seconds)
    summary["executor"] = "local" if local_model is not None else "ray"
    metrics = labelled_metrics([results[i.path] for i in published])
    batch.write_parquet(scoring_output.DIGITS_FILE, digits.table(exclude=[i.path for i in changed]))
    batch.write_json(scoring_output.SUMMARY_FILE, summary)
    if metrics is not None:
        batch.write_json(scoring_output.METRICS_FILE, metrics)
    return Staged(summary, metrics, published, changed, results)


def plan_inputs(paths: list[str], manifest: list[dict], model_id: str, *, force: bool) -> list[InputFile]:
    """Hash every input and find those this model already scored (printing what is skipped)."""
    inputs = []
    for path in paths:
        item = InputFile(path)
        try:
            item.size, item.sha256 = file_digest(path)
        except OSError as exc:
            item.unreadable = f"cannot be read: {exc.strerror or exc}"
        if not force and item.sha256 is not None:
            item.previous = scoring_output.previous_scoring(manifest, path, item.sha256, model_id)
        inputs.append(item)
    skipped = [i for i in inputs if i.previous is not None]
    # A directory that keeps old files would repeat them every night: name a few, count the rest.
    for item in skipped[:MAX_SKIPS_LISTED]:
        print(
            f"skipping {item.path}: already scored by model {model_id} in batch {item.previous['batch_id']} "
            f"(date {item.previous['date']}); --force scores it again",
            flush=True,
        )
    if len(skipped) > MAX_SKIPS_LISTED:
        print(f"skipping {len(skipped) - MAX_SKIPS_LISTED} more input(s) already scored by model {model_id}",
              flush=True)
    return inputs


def stream_into(
    batch: StagedBatch,
    inputs: list[InputFile],
    results: dict[str, FileResult],
    digits: DigitSampler,
    stream: Iterable[dict[str, np.ndarray]],
) -> None:
    """Stage the scored records of ``inputs`` (:func:`~mnist_ray.scoring.scored_stream` or
    :func:`~mnist_ray.scoring.local_stream`), count them in ``results`` and offer the report's
    candidate digits to ``digits``."""
    paths = [i.path for i in inputs]
    progress = Progress(len(paths))
    for records in stream:
        files = records[FILE]
        for index in np.unique(files).tolist():
            result = results[paths[index]]
            own = {key: value[files == index] for key, value in records.items()}
            take_records(batch, result, own)
            keep_digits(digits, result.path, own)
            if result.complete:
                batch.flush(result.path)
                progress.file_done(result)
        progress.tick(results.values())
    batch.flush()


def take_records(batch: StagedBatch, result: FileResult, records: dict[str, np.ndarray]) -> None:
    """Stage one file's share of a streamed batch and count it."""
    kind = records[KIND]
    images = kind == IMAGE_ROW
    if images.any():
        labels = records[LABEL][images]
        probs = records[PROBS][images]
        batch.add_predictions(
            result.path, records[ROW][images], records[IMAGE_ID][images], labels, probs, absent=ABSENT
        )
        result.scored += int(images.sum())
        labelled = labels != ABSENT
        if labelled.any():
            result.y_true.append(labels[labelled])
            result.y_pred.append(probs[labelled].argmax(axis=1))
    bad = kind == REJECTED_ROW
    if bad.any():
        batch.add_rejects(
            result.path, records[ROW][bad].tolist(), records[REASON][bad].tolist(), records[RAW][bad].tolist()
        )
        result.rejected += int(bad.sum())
    for reason in records[REASON][kind == REJECTED_FILE].tolist():
        batch.add_rejects(result.path, [None], [reason], [""])
        result.file_error = reason
    end = kind == END_OF_FILE
    for rows_in, raw in zip(records[ROW][end].tolist(), records[RAW][end].tolist(), strict=True):
        result.rows_in = rows_in
        digest = json.loads(raw)
        result.read_sha256 = digest["sha256"] if digest["whole_file"] else None


def keep_digits(digits: DigitSampler, path: str, records: dict[str, np.ndarray]) -> None:
    """Offer the images whose pixels the actors forwarded (report candidates) to ``digits``."""
    pixels = records[PIXELS]
    offered = (records[KIND] == IMAGE_ROW) & (np.frompyfunc(len, 1, 1)(pixels).astype(np.int64) > 0)
    if not offered.any():
        return
    labels = records[LABEL][offered]
    probs = records[PROBS][offered]
    digits.add(
        groups=records[FILE][offered].astype(np.int64), sources=np.full(int(offered.sum()), path, object),
        rows=records[ROW][offered], labelled=labels != ABSENT, labels=labels,
        predicted=probs.argmax(axis=1), confidence=probs.max(axis=1),
        images=np.frombuffer(b"".join(pixels[offered].tolist()), np.uint8),
    )


def check_counts(results: Iterable[FileResult]) -> None:
    """Rows in = rows scored + rows rejected, for every file: otherwise rows were lost or duplicated."""
    for r in results:
        if not r.complete:
            counted = "never reported its count" if r.rows_in is None else f"counted {r.rows_in:,} data rows"
            raise RuntimeError(
                f"{r.path}: the reader {counted}, but {r.scored:,} rows were scored and {r.rejected:,} "
                "rejected: rows were lost or duplicated on the way; nothing was published"
            )


class Progress:
    """Prints a line per finished file and, every PROGRESS_SECONDS, the rows done so far."""

    def __init__(self, files: int) -> None:
        self.files = files
        self.done = 0
        self.started = self.last = time.monotonic()

    def file_done(self, result: FileResult) -> None:
        self.done += 1
        error = f"; {result.file_error}" if result.file_error else ""
        print(
            f"  [{self.done}/{self.files}] {result.path}: {result.rows_in:,} rows: {result.scored:,} scored, "
            f"{result.rejected:,} rejected{error}",
            flush=True,
        )

    def tick(self, results: Iterable[FileResult]) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        scored = sum(r.scored for r in results)
        rejected = sum(r.rejected for r in results)
        rate = (scored + rejected) / (now - self.started)
        print(
            f"  ... {scored:,} rows scored, {rejected:,} rejected so far ({rate:,.0f} rows/s); "
            f"{self.done}/{self.files} files done",
            flush=True,
        )


def labelled_metrics(results: list[FileResult]) -> dict | None:
    """Training's metrics over every labelled row scored in this batch; None if there are none."""
    y_true = [a for r in results for a in r.y_true]
    if not y_true:
        return None
    y_pred = [a for r in results for a in r.y_pred]
    return classification_metrics(np.concatenate(y_true), np.concatenate(y_pred))


def build_summary(
    batch: StagedBatch,
    model: ScoringModel,
    inputs: list[InputFile],
    published: list[InputFile],
    changed: list[InputFile],
    results: dict[str, FileResult],
    seconds: float,
) -> dict:
    """The batch summary: per input and in total (rows in = scored + rejected), skipped and unpublished."""
    files = [_file_summary(batch, item, results[item.path]) for item in published]
    total = {key: sum(f[key] for f in files) for key in ("rows_in", "scored", "rejected")}
    total["files"] = len(files)
    total["files_rejected"] = sum(f["status"] == "rejected" for f in files)
    total["files_skipped"] = sum(i.previous is not None for i in inputs)
    if total["rows_in"] != total["scored"] + total["rejected"]:
        raise RuntimeError(f"counts do not add up: {total}")
    problems = total["rejected"] or any(f["file_error"] for f in files)
    return {
        "batch_id": batch.batch_id,
        "date": batch.date,
        "model_id": batch.model_id,
        "model_run": str(model.run_dir),
        "model_train_class_counts": model.train_class_counts,
        "scored_at": batch.scored_at.isoformat(),
        "inputs": files,
        "total": total,
        "skipped": [
            {"path": i.path, "sha256": i.sha256, "batch_id": i.previous["batch_id"],
             "date": i.previous["date"]}
            for i in inputs if i.previous is not None
        ],
        "not_published": [
            {"path": i.path, "reason": "the file changed while it was being scored; the next run scores it"}
            for i in changed
        ],
        "seconds": round(seconds, 1),
        "rows_per_s": round(total["rows_in"] / seconds, 1) if seconds > 0 else None,
        "exit_code": EXIT_REJECTS if problems else EXIT_OK,
    }


def _file_summary(batch: StagedBatch, item: InputFile, result: FileResult) -> dict:
    labelled = sum(len(a) for a in result.y_true)
    correct = sum(int((t == p).sum()) for t, p in zip(result.y_true, result.y_pred, strict=True))
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
        "labelled": labelled,
        "accuracy": correct / labelled if labelled else None,
        PREDICTIONS: parts[PREDICTIONS],
        REJECTS: parts[REJECTS],
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
        old_parts, old_batches = scoring_output.superseded(manifest, item.path, batch.model_id, batch.date)
        replaced += old_parts
        result = results[item.path]
        parts = batch.parts.get(item.path, {PREDICTIONS: [], REJECTS: []})
        entries.append({
            "path": item.path, "size": item.size, "sha256": item.sha256, "model_id": batch.model_id,
            "batch_id": batch.batch_id, "date": batch.date, "scored_at": batch.scored_at.isoformat(),
            "status": result.status, "rows_in": result.rows_in, "scored": result.scored,
            "rejected": result.rejected, "file_error": result.file_error,
            PREDICTIONS: parts[PREDICTIONS], REJECTS: parts[REJECTS], "replaces": old_batches,
        })
    return entries, replaced


def show_batch(batch_dir: Path) -> int:
    """Print a published batch's summary and write its report, as its job would; returns its exit code."""
    batch = scoring_output.read_batch(batch_dir)
    print_summary(batch["summary"], batch["metrics"], batch_dir)
    write_report(batch_dir)
    return batch["summary"]["exit_code"]


def print_summary(summary: dict, metrics: dict | None, batch_dir: Path) -> None:
    """The summary as a table: a line per input, the total, the accuracy when labels exist."""
    lines = [f"\nbatch {summary['batch_id']}  date {summary['date']}  model {summary['model_id']}",
             f"{'rows in':>12} {'scored':>12} {'rejected':>10}  file"]
    for f in summary["inputs"]:
        note = f"  ({f['status']}: {f['file_error']})" if f["file_error"] else ""
        lines.append(f"{f['rows_in']:>12,} {f['scored']:>12,} {f['rejected']:>10,}  {f['path']}{note}")
    total = summary["total"]
    lines.append(
        f"{total['rows_in']:>12,} {total['scored']:>12,} {total['rejected']:>10,}  total: "
        f"{total['files']} file(s), {total['files_rejected']} rejected whole, "
        f"{total['files_skipped']} skipped as already scored"
    )
    for item in summary["not_published"]:
        lines.append(f"not published: {item['path']}: {item['reason']}")
    if metrics is not None:
        lines.append(
            f"accuracy {metrics['accuracy']:.4%} on {metrics['count']:,} labelled rows "
            f"({metrics['errors']:,} errors), macro F1 {metrics['macro_f1']:.4f}"
        )
    lines.append(
        f"{summary['rows_per_s'] or 0:,.0f} rows/s over {summary['seconds']:.1f}s; "
        f"batch directory: {batch_dir}"
    )
    print("\n".join(lines), flush=True)


def write_submission(output_dir: Path, path: str, model_id: str, destination: Path) -> None:
    """A Kaggle submission (``ImageId,Label``) from the published predictions of the input ``path``.

    ``ImageId`` is the file's id column where it has one, else the data row number.
    """
    manifest = scoring_output.read_manifest(output_dir)
    entries = [e for e in manifest if (e["path"], e["model_id"]) == (path, model_id)]
    parts = entries[-1][PREDICTIONS] if entries else []
    table = scoring_output.read_parts(output_dir, parts, PREDICTION_SCHEMA)
    if not table.num_rows:
        print(f"no submission written: no row of {path} has been scored by model {model_id}", flush=True)
        return
    image_id = pc.coalesce(table["image_id"], table["row"])
    submission = pa.table({"ImageId": image_id, "Label": table["predicted"]}).sort_by("ImageId")
    tmp = destination.with_name(f".{destination.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as out:
        out.write(b"ImageId,Label\n")  # by hand: pyarrow would quote the names, Kaggle's sample does not
        pacsv.write_csv(submission, out, pacsv.WriteOptions(include_header=False))
    os.replace(tmp, destination)
    missing = entries[-1]["rejected"]
    note = f"; {missing:,} rejected row(s) are missing from it" if missing else ""
    print(f"submission: {destination} ({submission.num_rows:,} rows){note}", flush=True)
