"""The collector: scored records → staged Parquet rows and per-file counts, on the driver.

It consumes the record stream (:mod:`mnist_ray.score.records`) as it arrives, from Ray or
from this process, in any order across files: each file's rows go to its staging buffers
(:class:`~mnist_ray.score.output.StagedBatch`), its counts to a :class:`FileResult`, its
report candidates to the digit sampler. Rows in = rows scored + rows rejected is checked
for every file before anything is published (:func:`check_counts`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mnist_ray.digit_samples import DigitSampler
from mnist_ray.evaluation import classification_metrics
from mnist_ray.score.inputs import InputFile
from mnist_ray.score.output import StagedBatch
from mnist_ray.score.records import (
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
)

PROGRESS_SECONDS = 10.0


@dataclass
class FileResult:
    """What came back for one input: counts, the reader's own digest, labels for metrics."""

    path: str
    rows_in: int | None = None  # data lines the reader counted; None until its end arrives
    scored: int = 0
    rejected: int = 0  # rows rejected one by one, and those a file error left unread
    unread: int = 0  # of ``rejected``, the rows a file error left unread
    file_error: str | None = None
    read_sha256: str | None = None  # of the bytes the reader read, if it read the whole file
    y_true: list[np.ndarray] = field(default_factory=list)
    y_pred: list[np.ndarray] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.rows_in is not None and self.scored + self.rejected == self.rows_in

    @property
    def status(self) -> str:
        """``scored``, ``rows_rejected``, ``empty`` (a header and no data lines), ``rejected`` (the
        file, whole) or ``incomplete`` (rows were read before the file broke)."""
        if self.file_error is not None:
            return "incomplete" if self.scored + self.rejected - self.unread else "rejected"
        if self.rows_in == 0:
            return "empty"
        return "rows_rejected" if self.rejected else "scored"


def stream_into(
    batch: StagedBatch,
    inputs: list[InputFile],
    results: dict[str, FileResult],
    digits: DigitSampler,
    stream: Iterable[dict[str, np.ndarray]],
) -> None:
    """Stage the scored records of ``inputs`` (:func:`~mnist_ray.score.inference.scored_stream` or
    :func:`~mnist_ray.score.inference.local_stream`), count them in ``results`` and offer the report's
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
    whole = kind == REJECTED_FILE
    for reason, unread in zip(records[REASON][whole].tolist(), records[ROW][whole].tolist(), strict=True):
        batch.add_rejects(result.path, [None], [reason], [""])
        result.file_error = reason
        result.rejected += unread
        result.unread += unread
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
