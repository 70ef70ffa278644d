"""The stream of records scoring passes from the CSV readers through inference to the collector.

A file becomes records chunk by chunk (:func:`file_records`), so memory does not grow
with the file. Every record has a ``kind``:

* ``IMAGE_ROW`` — a valid image (and, after inference, its prediction);
* ``REJECTED_ROW`` — a row that failed validation: ``reason`` and ``raw`` say why and what;
* ``REJECTED_FILE`` — the file could not be read (further): bad header, binary, corrupt gzip;
  ``row`` holds the number of its data lines that this leaves unread (all of them for a CSV
  file with other columns; 0 for one damaged midway, whose lines after the damage are lost);
* ``END_OF_FILE`` — the reader finished the file: ``row`` holds the number of data
  lines it read and ``raw`` a JSON object with the ``sha256`` and ``size`` of the bytes
  read and whether that was the ``whole_file``. The collector checks rows in = images +
  rejected rows against it, independently of how the records travelled, and that the
  file did not change since the job hashed it.

Records of one file may arrive in any order (several actors); each carries its
file's index in ``file`` and its 1-based data row in ``row``. A batch of records is
a dict of numpy arrays, one per column (:func:`make_records` builds one).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from queue import Empty, Queue

import numpy as np

from mnist_ray.data.csv_reader import CsvChunks
from mnist_ray.data.csv_rules import RowProblem
from mnist_ray.data.schema import IMAGE, IMAGE_ID, IMAGE_SHAPE, LABEL, ROW, DataValidationError

# Columns of the stream: the data contract's (image, row, label, image_id) and these.
KIND, FILE, REASON, RAW = "kind", "file", "reason", "raw"
# Added by inference: the ten probabilities, and the pixels of the few images a report may show.
PROBS, PIXELS = "probs", "pixels"
IMAGE_ROW, REJECTED_ROW, REJECTED_FILE, END_OF_FILE = 0, 1, 2, 3
# The label of a record whose file has none (labels are checked to be 0..9); a record without
# an id (the file has no id column, or the id is empty) has NO_ID.
ABSENT = -1
NO_ID = ""
# Chunks read and validated ahead of inference by the in-process path (~4,400 rows, ~4 MB of
# records each). Not started before the model has loaded: reading then slowed the model's
# import and load (both hold the GIL for much of their work) by as much as it read ahead.
LOCAL_READ_AHEAD = 4
_UNREAD = re.compile(r" \(([\d,]+) data lines not read\)$")


def read_files(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the files named in ``batch`` (``path``, ``file``) → records, one block per chunk."""
    for path, index in zip(batch["path"].tolist(), batch[FILE].tolist(), strict=True):
        yield from file_records(str(path), int(index))


def file_records(path: str, index: int) -> Iterator[dict[str, np.ndarray]]:
    """The records of one file: its images and rejected rows chunk by chunk, then its end.

    A problem with the file as a whole becomes one ``REJECTED_FILE`` record;
    rows read before it (a gzip stream damaged midway) are kept. A file with a header
    and no data lines is valid and empty: its end says 0 rows.
    """
    chunks = CsvChunks(path, require_label=False, read_id=True)
    accounted = 0  # data lines yielded as records
    try:
        for valid, rejects in chunks:
            if len(valid[ROW]) or rejects:
                accounted += len(valid[ROW]) + len(rejects)
                yield chunk_records(index, valid, rejects)
    except DataValidationError as exc:
        unread = chunks.data_lines - accounted
        reason = file_problem(exc) + unread_note(unread)
        yield make_records(index, REJECTED_FILE, rows=[unread], reasons=[reason], raws=[""])
    summary = json.dumps({"sha256": chunks.sha256, "size": chunks.size, "whole_file": chunks.read_to_end})
    yield make_records(index, END_OF_FILE, rows=[chunks.data_lines], reasons=[""], raws=[summary])


def unread_note(unread: int) -> str:
    """What a whole-file rejection's reason ends with when it left ``unread`` data lines unread."""
    return f" ({unread:,} data lines not read)" if unread else ""


def unread_lines(reason: str) -> int:
    """The data lines a whole-file rejection left unread, read back from its reason (:func:`unread_note`)."""
    match = _UNREAD.search(reason)
    return int(match.group(1).replace(",", "")) if match else 0


def file_problem(error: DataValidationError) -> str:
    """The error's message without the file name (which has its own column)."""
    return str(error).removeprefix(error.source).lstrip(",: ")


def chunk_records(
    index: int, valid: dict[str, np.ndarray], rejects: list[RowProblem]
) -> dict[str, np.ndarray]:
    """The records of one parsed chunk of file ``index``: its valid rows, then its rejected ones."""
    n = len(valid[ROW])
    images = make_records(
        index, IMAGE_ROW, rows=valid[ROW], reasons=[""] * n, raws=[""] * n, images=valid[IMAGE],
        labels=valid.get(LABEL), image_ids=valid.get(IMAGE_ID),
    )
    if not rejects:
        return images
    bad = make_records(
        index, REJECTED_ROW, rows=np.array([r.row for r in rejects], np.int64),
        reasons=[r.reason for r in rejects], raws=[r.raw for r in rejects],
    )
    return {key: np.concatenate([images[key], bad[key]]) for key in images}


def make_records(
    index: int,
    kind: int,
    *,
    rows: np.ndarray | list[int],
    reasons: list[str],
    raws: list[str],
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    image_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A batch of ``kind`` records of file ``index``: every column of the stream but those inference adds.

    ``images`` uint8 (n, 28, 28), ``labels`` int64 (n,), ``image_ids`` str objects (n,);
    absent ones are filled (blank pixels, ``ABSENT``, ``NO_ID``), so that every batch has the
    same columns.
    """
    n = len(rows)
    return {
        KIND: np.full(n, kind, np.int8),
        FILE: np.full(n, index, np.int32),
        ROW: np.asarray(rows, np.int64),
        # Records that are not images carry blank pixels: one schema for every block.
        IMAGE: images if images is not None else np.zeros((n, *IMAGE_SHAPE), np.uint8),
        LABEL: labels if labels is not None else np.full(n, ABSENT, np.int64),
        IMAGE_ID: image_ids if image_ids is not None else np.full(n, NO_ID, object),
        REASON: np.array(reasons, dtype=object),
        RAW: np.array(raws, dtype=object),
    }


class ChunkReader:
    """The records of :func:`file_records` for ``paths`` in turn, read by a thread up to ``depth``
    chunks ahead of the consumer (so memory does not grow with the input).

    Iterate it once; the thread's errors are raised to the consumer after the records read
    before them. ``close`` (or leaving a ``with``) stops the thread.
    """

    def __init__(self, paths: list[str], *, depth: int = LOCAL_READ_AHEAD) -> None:
        self.paths = list(paths)
        self._queue: Queue = Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="csv-read-ahead", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for index, path in enumerate(self.paths):
                for records in file_records(path, index):
                    if self._stop.is_set():
                        return
                    self._queue.put(records)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)
            return
        self._queue.put(None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
            with contextlib.suppress(Empty):
                self._queue.get_nowait()
            self._thread.join(timeout=0.1)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
