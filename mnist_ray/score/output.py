"""The scoring output directory: layout, Parquet schemas, staging, atomic publication, the manifest.

```
OUTPUT/
  predictions/date=YYYY-MM-DD/part-<batch_id>-<n>.parquet   one row per scored image
  rejects/date=YYYY-MM-DD/part-<batch_id>-<n>.parquet       one row per rejected row or file
  batches/<batch_id>/summary.json                          counts per input and in total
                    /metrics.json                          when labels exist (as training's)
                    /digits.parquet                        pixels of the few digits the report shows
                                                           (mnist_ray.digit_samples)
                    /_SUCCESS                              the batch is complete
                    /report.html, report.md, report/*.png  the batch report, rendered after publication
  _manifest.jsonl     one line per input scored: path, size, sha256, model id, batch, date, counts, files
  _staging/<batch_id>/  a batch being written, in the same layout; nothing there is visible output
  _lock               held by the running job: one job per output directory at a time
```

Each Parquet part holds the rows of one input file, so that rescoring an input
(``--force``, or a file that changed) replaces exactly its earlier parts.
Names starting with ``_`` are skipped by Spark, DuckDB and pyarrow when they
read ``predictions/`` or ``rejects/`` as a dataset.

Publication is atomic in effect: a batch is written under ``_staging/``; then a
journal (``_PUBLISH.json``) listing every move, every replaced part and the
manifest lines is written in one rename — the commit point; then the moves, the
deletions, ``_SUCCESS`` and the manifest are applied. A job killed before the
commit leaves only staging, which the next job removes (and scores those inputs
again); a job killed after it leaves a journal, which the next job applies to
the end. Either way nothing is lost or duplicated.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mnist_ray.data.schema import NUM_CLASSES

PREDICTIONS, REJECTS, BATCHES, STAGING = "predictions", "rejects", "batches", "_staging"
MANIFEST = "_manifest.jsonl"
SUCCESS = "_SUCCESS"
JOURNAL = "_PUBLISH.json"
LOCK = "_lock"
SUMMARY_FILE, METRICS_FILE, DIGITS_FILE = "summary.json", "metrics.json", "digits.parquet"
# Rows buffered per input before a part is written: ~10 MB of predictions.
ROWS_PER_PART = 100_000
# Across all inputs: beyond this, every buffer is written out (many files read at once).
MAX_BUFFERED_ROWS = 1_000_000

PROB_COLUMNS = [f"prob_{k}" for k in range(NUM_CLASSES)]
TIMESTAMP = pa.timestamp("us", tz="UTC")
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("predicted", pa.int64(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        *[pa.field(name, pa.float32(), nullable=False) for name in PROB_COLUMNS],
        pa.field("label", pa.int64()),
        pa.field("correct", pa.bool_()),
        pa.field("model_id", pa.string(), nullable=False),
        # The registry version ("mnist-digits/3") or run directory that scored; null in parts
        # written before it was recorded.
        pa.field("model_version", pa.string()),
        pa.field("scored_at", TIMESTAMP, nullable=False),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64()),  # null: the whole file was rejected
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("scored_at", TIMESTAMP, nullable=False),
    ]
)


def new_batch_id(now: datetime.datetime) -> str:
    """``YYYYmmddTHHMMSSZ-xxxxxx``: sorts by start time; the random suffix keeps ids unique."""
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def partition(kind: str, date: str) -> str:
    """The relative directory of one date's predictions or rejects, e.g. ``predictions/date=2026-11-22``."""
    return f"{kind}/date={date}"


# --- one batch, staged ---------------------------------------------------------------------------


class StagedBatch:
    """The outputs of one batch, written under ``OUTPUT/_staging/<batch_id>/`` until published.

    Rows are buffered per input file and written as sorted Parquet parts of at
    most ROWS_PER_PART rows; ``parts[source]`` lists each file's parts (paths
    relative to the output directory).
    """

    def __init__(
        self, output_dir: Path, batch_id: str, date: str, model_id: str, scored_at: datetime.datetime,
        *, model_version: str | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.batch_id = batch_id
        self.date = date
        self.model_id = model_id
        self.model_version = model_version
        self.scored_at = scored_at
        self.root = output_dir / STAGING / batch_id
        self.root.mkdir(parents=True)
        self.parts: dict[str, dict[str, list[str]]] = {}
        self._buffers: dict[tuple[str, str], list[pa.Table]] = {}
        self._buffered_rows = 0
        self._next_part = 0

    def add_predictions(
        self,
        source: str,
        rows: np.ndarray,
        image_ids: np.ndarray,
        labels: np.ndarray,
        probs: np.ndarray,
        *,
        absent: int,
    ) -> None:
        """Buffer scored images of ``source``.

        ``rows``, ``labels``: int64 (n,), ``absent`` where the file has no labels;
        ``image_ids``: str objects (n,), "" where the image has no id; ``probs``: float32
        (n, 10), the model's output.
        """
        predicted = probs.argmax(axis=1).astype(np.int64)
        no_label = labels == absent
        columns = {
            "source": pa.repeat(pa.scalar(source), len(rows)),
            "row": pa.array(rows, pa.int64()),
            "image_id": pa.array(image_ids, pa.string(), mask=image_ids == ""),
            "predicted": pa.array(predicted),
            "confidence": pa.array(probs.max(axis=1), pa.float32()),
            **{name: pa.array(probs[:, k], pa.float32()) for k, name in enumerate(PROB_COLUMNS)},
            "label": pa.array(labels, pa.int64(), mask=no_label),
            "correct": pa.array(predicted == labels, pa.bool_(), mask=no_label),
            "model_version": pa.repeat(pa.scalar(self.model_version, pa.string()), len(rows)),
        }
        self._add(PREDICTIONS, source, columns, PREDICTION_SCHEMA)

    def add_rejects(self, source: str, rows: list[int | None], reasons: list[str], raws: list[str]) -> None:
        """Buffer rejected rows of ``source`` (row None: the whole file)."""
        columns = {
            "source": pa.repeat(pa.scalar(source), len(rows)),
            "row": pa.array(rows, pa.int64()),
            "reason": pa.array(reasons, pa.string()),
            "raw": pa.array(raws, pa.string()),
        }
        self._add(REJECTS, source, columns, REJECT_SCHEMA)

    def _add(self, kind: str, source: str, columns: dict[str, pa.Array], schema: pa.Schema) -> None:
        n = len(columns["row"])
        columns["model_id"] = pa.repeat(pa.scalar(self.model_id), n)
        columns["scored_at"] = pa.repeat(pa.scalar(self.scored_at, TIMESTAMP), n)
        self._buffers.setdefault((kind, source), []).append(pa.table(columns, schema=schema))
        self.parts.setdefault(source, {PREDICTIONS: [], REJECTS: []})
        self._buffered_rows += n
        if sum(t.num_rows for t in self._buffers[(kind, source)]) >= ROWS_PER_PART:
            self._write(kind, source)
        if self._buffered_rows >= MAX_BUFFERED_ROWS:
            self.flush()

    def flush(self, source: str | None = None) -> None:
        """Write out the buffered rows of ``source`` (default: of every input)."""
        for kind, buffered_source in list(self._buffers):
            if source is None or buffered_source == source:
                self._write(kind, buffered_source)

    def _write(self, kind: str, source: str) -> None:
        tables = self._buffers.pop((kind, source))
        table = pa.concat_tables(tables).sort_by("row")
        self._buffered_rows -= table.num_rows
        relative = f"{partition(kind, self.date)}/part-{self.batch_id}-{self._next_part:05d}.parquet"
        self._next_part += 1
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pq.write_table(table, f)
            _sync(f)
        self.parts[source][kind].append(relative)

    def discard(self, source: str) -> None:
        """Drop everything staged for ``source``: it will not be published."""
        for kind in (PREDICTIONS, REJECTS):
            self._buffers.pop((kind, source), None)
            for relative in self.parts.get(source, {}).get(kind, []):
                (self.root / relative).unlink()
        self.parts.pop(source, None)
        self._buffered_rows = sum(t.num_rows for ts in self._buffers.values() for t in ts)

    def remove(self) -> None:
        """Delete the whole staged batch (it will not be published)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def write_json(self, name: str, payload: object) -> str:
        """Stage ``batches/<batch_id>/<name>``; returns its path relative to the output directory."""
        return self._write_batch_file(name, (json.dumps(payload, indent=2) + "\n").encode())

    def write_parquet(self, name: str, table: pa.Table) -> str:
        """Stage ``batches/<batch_id>/<name>`` as Parquet; returns its path relative to the output dir."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self._write_batch_file(name, sink.getvalue().to_pybytes())

    def _write_batch_file(self, name: str, data: bytes) -> str:
        relative = f"{BATCHES}/{self.batch_id}/{name}"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            _sync(f)
        return relative

    def staged_files(self) -> list[str]:
        """Every staged file, relative to the staging root (= its place in the output directory).

        Parts first, then the batch's own files: the summary appears once the rows are in place.
        """
        files = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        return sorted(files, key=lambda relative: relative.startswith(f"{BATCHES}/"))


def _sync(f) -> None:
    # Data on disk before the rename that publishes it: a crash must not leave empty files visible.
    f.flush()
    os.fsync(f.fileno())


# --- publication ---------------------------------------------------------------------------------


def publish(batch: StagedBatch, manifest_entries: list[dict], replaced: list[str]) -> Path:
    """Move a complete staged batch into place; returns its ``batches/<batch_id>`` directory.

    ``replaced``: earlier parts (relative paths) that this batch's parts supersede.
    """
    journal = {
        "batch_id": batch.batch_id,
        "moves": batch.staged_files(),
        "delete": replaced,
        "manifest": manifest_entries,
    }
    tmp = batch.root / f".{JOURNAL}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(journal) + "\n")
        _sync(f)
    os.replace(tmp, batch.root / JOURNAL)  # the commit point
    _apply_journal(batch.output_dir, journal)
    return batch.output_dir / BATCHES / batch.batch_id


def _apply_journal(output_dir: Path, journal: dict) -> None:
    """Carry out a journal; safe to repeat after being interrupted at any point."""
    root = output_dir / STAGING / journal["batch_id"]
    # Old parts go first: a reader may briefly miss an input's rows, never see them twice.
    for relative in journal["delete"]:
        (output_dir / relative).unlink(missing_ok=True)
    for relative in journal["moves"]:
        source = root / relative
        if source.exists():
            (output_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, output_dir / relative)
    batch_dir = output_dir / BATCHES / journal["batch_id"]
    batch_dir.mkdir(parents=True, exist_ok=True)
    (batch_dir / SUCCESS).touch()
    _append_manifest(output_dir, journal["batch_id"], journal["manifest"])
    shutil.rmtree(root)


def recover(output_dir: Path) -> list[Path]:
    """Finish or remove the batches an earlier job left in staging, saying so on stdout.

    Returns the ``batches/<batch_id>`` directories of the batches it finished publishing.
    """
    staging = output_dir / STAGING
    finished = []
    for root in sorted(staging.iterdir()) if staging.is_dir() else []:
        journal_path = root / JOURNAL
        if journal_path.is_file():
            _apply_journal(output_dir, json.loads(journal_path.read_text()))
            print(f"finished publishing batch {root.name}, which an earlier job left half-published",
                  flush=True)
            finished.append(output_dir / BATCHES / root.name)
        else:
            shutil.rmtree(root)
            print(
                f"removed the unpublished batch {root.name} that an earlier job left in {STAGING}/ "
                "(its inputs are scored again)",
                flush=True,
            )
    return finished


class OutputInUse(RuntimeError):
    """Another job holds the output directory's lock."""


@contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Hold ``OUTPUT/_lock`` for the duration: a second job on the same output fails at once.

    Raises ``OutputInUse`` if another process holds it. The lock dies with its
    process, so a killed job never leaves the directory locked.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(
                f"{output_dir} is being written by another scoring job ({LOCK} is held); "
                "run again when it has finished"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the manifest --------------------------------------------------------------------------------


def read_manifest(output_dir: Path) -> list[dict]:
    """Every input ever published to ``output_dir``, oldest first."""
    path = output_dir / MANIFEST
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_manifest(output_dir: Path, batch_id: str, entries: list[dict]) -> None:
    existing = read_manifest(output_dir)
    if any(e["batch_id"] == batch_id for e in existing):
        return  # already appended before an interruption
    lines = [json.dumps(e) for e in existing + entries]
    # Rewritten whole and renamed: a crash never leaves half a line (a year of nights is a few MB).
    tmp = output_dir / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
        _sync(f)
    os.replace(tmp, output_dir / MANIFEST)


def previous_scoring(manifest: list[dict], sha256: str, model_id: str) -> dict | None:
    """The latest manifest entry of this content scored by this model, under any path, if any.

    An input is its content: a copy of a scored file delivered under a new name holds the
    same images, and scoring it again would put each of them in the output twice."""
    matches = [e for e in manifest if (e["sha256"], e["model_id"]) == (sha256, model_id)]
    return matches[-1] if matches else None


def superseded(manifest: list[dict], path: str, model_id: str, date: str) -> tuple[list[str], list[str]]:
    """(parts, batch ids) of earlier scorings of ``path`` by ``model_id`` in the ``date`` partition."""
    earlier = [e for e in manifest if (e["path"], e["model_id"], e["date"]) == (path, model_id, date)]
    parts = [p for e in earlier for p in e[PREDICTIONS] + e[REJECTS]]
    return parts, [e["batch_id"] for e in earlier]


# --- reading back ---------------------------------------------------------------------------------


def read_parts(output_dir: Path, relative_paths: list[str], schema: pa.Schema) -> pa.Table:
    """The rows of some published parts as one table (``schema``: PREDICTION_SCHEMA or REJECT_SCHEMA)."""
    tables = [pq.read_table(output_dir / p, schema=schema) for p in relative_paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_batch(batch_dir: Path) -> dict:
    """A published batch, for its report: what reports render pictures and tables from.

    ``summary`` and ``metrics`` (None without labels) are dicts; ``digits`` the path of the
    digit samples (None for batches scored before they existed); ``predictions`` and
    ``rejects`` are lazy ``pyarrow.dataset.Dataset``\\ s over the batch's parts that
    are still published (``--force`` may have replaced some since).
    """
    output_dir = batch_dir.parent.parent
    summary = json.loads((batch_dir / SUMMARY_FILE).read_text())
    if not isinstance(summary["seconds"], dict):  # a batch scored before the parts were recorded
        summary["seconds"] = {"scoring": summary["seconds"]}
    metrics_path = batch_dir / METRICS_FILE

    def live(kind: str, schema: pa.Schema) -> pads.Dataset:
        parts = [output_dir / p for f in summary["inputs"] for p in f[kind]]
        return pads.dataset([str(p) for p in parts if p.is_file()], schema=schema, format="parquet")

    return {
        "summary": summary,
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        "digits": batch_dir / DIGITS_FILE if (batch_dir / DIGITS_FILE).is_file() else None,
        "predictions": live(PREDICTIONS, PREDICTION_SCHEMA),
        "rejects": live(REJECTS, REJECT_SCHEMA),
    }
