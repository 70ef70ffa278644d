"""Reading Kaggle CSV files: streamed and validated chunk by chunk, for training and for scoring.

:class:`CsvChunks` streams one file (local or a URI, ``.csv`` or ``.csv.gz``) as validated
chunks of whole lines, in constant memory whatever its size: the bytes come from
:mod:`mnist_ray.data.csv_files`, the rules from :mod:`mnist_ray.data.csv_rules`.
Training (:func:`read_training_csv`) refuses a file at its first problem; scoring
quarantines bad rows and keeps going. :func:`write_kaggle_csv` writes the format.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from mnist_ray.data.csv_files import LongLine, gunzip, line_chunks, raw_blocks
from mnist_ray.data.csv_rules import (
    BLANK_LINE,
    LONG_LINE,
    CsvLayout,
    RowProblem,
    empty_rows,
    is_text_header,
    parse_chunk,
    parse_header,
    truncate_text,
)
from mnist_ray.data.schema import (
    ID_COLUMNS,
    IMAGE,
    LABEL,
    LABEL_COLUMN,
    PIXEL_COLUMNS,
    ROW,
    DataValidationError,
    refusal,
)

# Whole lines per parsed chunk: ~4,500 MNIST rows, ~60 MB of working memory in the parser.
CHUNK_BYTES = 8 << 20


class CsvChunks:
    """Streams one CSV file as validated chunks, in constant memory whatever its size.

    Iterating yields ``(valid, rejects)`` per chunk (see :func:`parse_chunk`).
    ``layout`` is known once the first chunk is read; afterwards ``data_lines``
    counts the physical lines after the header but the blank ones at the end of the
    file (as pandas and Spark read them: a trailing blank line is not a row), and
    ``size`` and ``sha256`` describe the stored bytes that were read (compressed, for
    ``.gz``): the whole file if ``read_to_end``. Problems of the file as a whole raise
    ``DataValidationError``: before the first chunk for the header (``data_lines`` then
    counts the lines of a text file whose header is off-contract: what arrived, unread),
    midway for a damaged gzip stream.
    """

    def __init__(self, path: str, *, require_label: bool, read_id: bool, chunk_bytes: int = CHUNK_BYTES):
        self.path = path
        self.require_label = require_label
        self.read_id = read_id
        self.chunk_bytes = chunk_bytes
        self.layout: CsvLayout | None = None
        self.data_lines = 0
        self.size = 0
        self.read_to_end = False
        self._digest = hashlib.sha256()
        # Blank lines at the end of the last chunk: rejected if more lines follow, else not lines.
        self._trailing_blanks: list[RowProblem] = []

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], list[RowProblem]]]:
        pieces = line_chunks(self._decompressed(), self.chunk_bytes)
        _, head = next(pieces, (1, b""))
        first_bytes = head.prefix if isinstance(head, LongLine) else head
        try:
            self.layout = parse_header(first_bytes, self.path, require_label=self.require_label,
                                       read_id=self.read_id)
        except DataValidationError:
            if is_text_header(first_bytes) and not isinstance(head, LongLine):
                self._count_unread(head.partition(b"\n")[2], pieces)
            raise
        if isinstance(head, LongLine):
            raise DataValidationError("header line is longer than 1 MiB: not a digit CSV", source=self.path)
        rest = head.partition(b"\n")[2]
        try:
            if rest:
                yield self._parse(rest, 2)
            for line, piece in pieces:
                yield self._parse(piece, line)
        finally:
            # Blank lines that nothing followed end the file: they are not rows.
            self.data_lines -= len(self._trailing_blanks)
            self._trailing_blanks = []

    def _parse(self, piece: bytes | LongLine, line: int) -> tuple[dict[str, np.ndarray], list[RowProblem]]:
        held, self._trailing_blanks = self._trailing_blanks, []
        if isinstance(piece, LongLine):
            self.data_lines += 1
            return empty_rows(self.layout), [*held, RowProblem(line - 1, LONG_LINE,
                                                               raw=truncate_text(piece.prefix))]
        lines = piece.count(b"\n") + (not piece.endswith(b"\n"))
        self.data_lines += lines
        valid, rejects = parse_chunk(piece, self.layout, line)
        # The chunk's last rows, if blank, wait for what follows them.
        blanks = {r.row: r for r in rejects if r.problem == BLANK_LINE}
        last = line - 1 + lines - 1
        while last in blanks:
            self._trailing_blanks.insert(0, blanks.pop(last))
            last -= 1
        tail = {r.row for r in self._trailing_blanks}
        return valid, [*held, *(r for r in rejects if r.row not in tail or r.problem != BLANK_LINE)]

    def _count_unread(self, rest: bytes, pieces: Iterator[tuple[int, bytes | LongLine]]) -> None:
        """Count the data lines of a file refused for its header (trailing blank lines aside)."""
        blank_run = 0
        try:
            for piece in [rest, *(piece for _, piece in pieces)]:
                if isinstance(piece, LongLine):
                    self.data_lines, blank_run = self.data_lines + 1, 0
                    continue
                for text in piece.split(b"\n")[: piece.count(b"\n") + (not piece.endswith(b"\n"))]:
                    blank_run = blank_run + 1 if text in (b"", b"\r") else 0
                    self.data_lines += 1
        except DataValidationError:  # a damaged gzip stream: the lines before the damage are counted
            pass
        self.data_lines -= blank_run

    def _decompressed(self) -> Iterator[bytes]:
        blocks = self._hashed(raw_blocks(self.path))
        return gunzip(blocks, self.path) if self.path.lower().endswith(".gz") else blocks

    def _hashed(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        for block in blocks:
            self._digest.update(block)
            self.size += len(block)
            yield block
        self.read_to_end = True



# --- training: the whole file or nothing --------------------------------------------------------


def training_rows(path: str) -> tuple[dict[str, np.ndarray], list[DataValidationError]]:
    """Read one labelled Kaggle CSV file whole: (its valid rows, every problem in file order).

    Rows are ``{"image": uint8 (n, 28, 28), "label": int64 (n,), "row": int64 (n,)}`` with
    ``row`` the 1-based data row number. Blank lines are skipped; a file with a header and no
    rows is valid and empty. A problem of the file as a whole is its only problem.
    """
    chunks = CsvChunks(path, require_label=True, read_id=False)
    problems = []
    parts = []
    try:
        for valid, rejects in chunks:
            problems += [r.error(path) for r in rejects if r.problem != BLANK_LINE]
            parts.append(valid)
    except DataValidationError as exc:
        return {}, [exc]
    problems.sort(key=lambda p: p.row)
    parts = parts or [empty_rows(chunks.layout)]  # a header and nothing else
    return {key: np.concatenate([p[key] for p in parts]) for key in (IMAGE, LABEL, ROW)}, problems


def read_training_csv(path: str) -> dict[str, np.ndarray]:
    """Read one labelled Kaggle CSV file, refusing anything off-contract: :func:`training_rows`'s
    rows, or ``DataValidationError`` naming every problem (:func:`~mnist_ray.data.schema.refusal`)."""
    rows, problems = training_rows(path)
    if problems:
        raise refusal(problems)
    return rows


def write_kaggle_csv(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    image_ids: bool = False,
) -> None:
    """Write uint8 images (n, 28, 28) as a Kaggle CSV: ``[ImageId,][label,]pixel0..pixel783``.

    ``.gz`` in the name compresses the file. Written to a temporary name and
    renamed, so a reader never sees half a file.
    """
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    columns: dict[str, pa.Array] = {}
    if image_ids:
        columns[ID_COLUMNS[0]] = pa.array(np.arange(1, len(images) + 1, dtype=np.int64))
    if labels is not None:
        columns[LABEL_COLUMN] = pa.array(np.asarray(labels, dtype=np.int64))
    for k, name in enumerate(PIXEL_COLUMNS):
        columns[name] = pa.array(flat[:, k])
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    compression = "gzip" if path.endswith(".gz") else None
    with pa.CompressedOutputStream(tmp, "gzip") if compression else pa.OSFile(tmp, "wb") as out:
        # The header by hand: Kaggle's names are bare (pixel0), pyarrow would quote them.
        out.write((",".join(columns) + "\n").encode())
        options = pacsv.WriteOptions(include_header=False, quoting_style="none")
        pacsv.write_csv(pa.table(columns), out, options)
    os.replace(tmp, path)

