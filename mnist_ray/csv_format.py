"""Kaggle "Digit Recognizer" CSV files: one set of reading and validation rules for training and scoring.

A file has a header naming ``pixel0``..``pixel783`` (``pixelK`` is image row
``K // 28``, column ``K % 28``), optionally ``label`` and one id column
(``ImageId`` or ``id``), in any order, then one image per line. Files may be
gzip-compressed (``.csv.gz``), use CRLF line ends and start with a UTF-8 BOM.
Rows are numbered by physical line: data row = line number − 1 (the header is
line 1), which is Kaggle's ``ImageId`` numbering for a file without blank lines.

Nothing is coerced: ``7.0`` is not an integer pixel, an empty field is not 0.
:class:`CsvChunks` streams a file in chunks of whole lines (memory bounded
whatever the file size) and :func:`parse_chunk` validates one chunk, returning
the valid rows and one :class:`RowProblem` per rejected row. Training
(:func:`read_training_csv`) refuses a file at its first problem; scoring
quarantines bad rows and keeps going. Problems of a whole file (empty, binary,
bad header, corrupt gzip) raise :class:`~mnist_ray.schema.DataValidationError`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from mnist_ray.schema import (
    ID_COLUMNS,
    IMAGE_SHAPE,
    LABEL_COLUMN,
    NUM_CLASSES,
    PIXEL_COLUMNS,
    PIXEL_MAX,
    PIXEL_MIN,
    DataValidationError,
)

CSV_SUFFIXES = (".csv", ".csv.gz")
# Whole lines per parsed chunk: ~4,500 MNIST rows, ~60 MB of working memory in the parser.
CHUNK_BYTES = 8 << 20
READ_BLOCK_BYTES = 1 << 20
# A longer line is not a digit row (the longest valid one is ~3 KB); it is rejected unread.
MAX_LINE_BYTES = 1 << 20
# Rejects keep this much of a bad line's text: every plausible digit row fits whole.
RAW_TEXT_CHARS = 4096
BINARY_SNIFF_BYTES = 1 << 16
BLANK_LINE = "blank line (no values)"
LONG_LINE = f"line is longer than {MAX_LINE_BYTES:,} bytes: not a digit row"
BOM_LINE = "starts with a byte-order mark (U+FEFF), which belongs only at the start of the file"
_BOM = b"\xef\xbb\xbf"
# 18 digits always fit int64; longer numbers are out of any valid range anyway.
_INTEGER = r"^-?[0-9]{1,18}$"
# Bytes, and longest field (a CR included), for which pyarrow's int64 parse accepts only _INTEGER.
_PLAIN_BYTES = b"0123456789,-\r\n"
_MAX_PLAIN_FIELD = 18
# A field wholly in double quotes, with nothing a number could not hold inside: "12" → 12.
_QUOTED_FIELD = re.compile(rb'(?<![^,\n])"([^",\r\n]*)"(?=[,\r\n]|\Z)')
_GZIP_MAGIC = b"\x1f\x8b"


# --- where the files are ------------------------------------------------------------------------


def resolve_csv_paths(specs: list[str]) -> list[str]:
    """Expand files, directories and globs into a sorted list of CSV paths.

    Local paths become absolute (Ray tasks may run in another working
    directory). URIs (``s3://``, ``gs://``, ...) are passed to pyarrow's
    filesystems; a URI that names a directory is listed. Raises
    ``FileNotFoundError`` naming the spec that matched nothing.
    """
    paths: list[str] = []
    for spec in specs:
        if "://" in spec:
            paths.extend(_list_uri(spec))
            continue
        if any(ch in spec for ch in "*?["):
            matches = [
                m for m in glob.glob(spec, recursive=True) if os.path.isfile(m) and is_csv_name(m)
            ]
        elif os.path.isdir(spec):
            matches = [
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if is_csv_name(name)
            ]
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            raise FileNotFoundError(f"{spec}: no such file or directory")
        if not matches:
            raise FileNotFoundError(f"{spec}: matched no .csv or .csv.gz file")
        paths.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(paths))


def is_csv_name(path: str) -> bool:
    """``.csv`` or ``.csv.gz``, in any case: a nightly drop of ``DIGITS.CSV`` must not be skipped unseen."""
    return path.lower().endswith(CSV_SUFFIXES)


def _list_uri(uri: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such file or directory")
    scheme = uri.split("://", 1)[0]
    selector = pafs.FileSelector(path, recursive=True)
    found = [
        f"{scheme}://{i.path}"
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File and is_csv_name(i.path)
    ]
    if not found:
        raise FileNotFoundError(f"{uri}: matched no .csv or .csv.gz file")
    return found


def raw_blocks(path: str) -> Iterator[bytes]:
    """The stored bytes of a local path or URI (still compressed), in blocks of up to 1 MiB."""
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
    else:
        fs, inner = pafs.LocalFileSystem(), path
    with fs.open_input_stream(inner, compression=None) as stream:
        while block := stream.read(READ_BLOCK_BYTES):
            yield block


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of the stored file, as ``sha256sum`` prints it."""
    digest, size = hashlib.sha256(), 0
    for block in raw_blocks(path):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


# --- the header ---------------------------------------------------------------------------------


# (column, lowest, highest) of one checked column; highest None: no upper bound.
Check = tuple[str, int, int | None]


@dataclass(frozen=True)
class CsvLayout:
    """What a file's header says: its columns and which of them are read, in checking order."""

    source: str
    header: tuple[str, ...]
    has_label: bool
    id_column: str | None  # read and checked (scoring); training ignores id columns

    def checks(self) -> list[Check]:
        """``(column, lowest, highest)`` in the order rows are checked: label, id, pixel0..783."""
        checks: list[Check] = []
        if self.has_label:
            checks.append((LABEL_COLUMN, 0, NUM_CLASSES - 1))
        if self.id_column:
            checks.append((self.id_column, 0, None))
        checks.extend((name, PIXEL_MIN, PIXEL_MAX) for name in PIXEL_COLUMNS)
        return checks


def parse_header(first_bytes: bytes, source: str, *, require_label: bool, read_id: bool) -> CsvLayout:
    """The layout of a file from its first bytes (the header line and whatever follows it).

    ``require_label``: training files must have ``label``; files to score may.
    ``read_id``: read the ``ImageId``/``id`` column (scoring) instead of ignoring it.
    Raises ``DataValidationError`` for an empty, binary or off-contract header.
    """
    if not first_bytes[:BINARY_SNIFF_BYTES].strip():
        raise DataValidationError("file is empty: expected a header row", source=source)
    if first_bytes.startswith(_GZIP_MAGIC):
        raise DataValidationError("is gzip-compressed but its name does not end in .gz", source=source)
    if b"\x00" in first_bytes[:BINARY_SNIFF_BYTES]:
        raise DataValidationError("is not a text CSV file (binary content)", source=source)
    line = first_bytes.split(b"\n", 1)[0]
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataValidationError("header is not UTF-8 text", source=source) from exc
    header = tuple(name.strip().strip('"') for name in text.rstrip("\r").split(","))
    _check_columns(source, header, require_label=require_label)
    ids = [c for c in ID_COLUMNS if c in header]
    if read_id and len(ids) > 1:
        raise DataValidationError(
            f"has both {' and '.join(map(repr, ids))} columns: keep one id column", source=source
        )
    return CsvLayout(
        source=source,
        header=header,
        has_label=LABEL_COLUMN in header,
        id_column=ids[0] if read_id and ids else None,
    )


def _check_columns(path: str, header: tuple[str, ...], *, require_label: bool) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataValidationError("duplicated column in the header", source=path, column=name)
        seen.add(name)
    expected = set(PIXEL_COLUMNS) | {LABEL_COLUMN}
    required = set(PIXEL_COLUMNS) | ({LABEL_COLUMN} if require_label else set())
    missing = [c for c in [LABEL_COLUMN, *PIXEL_COLUMNS] if c in required and c not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        contract = (
            "a training file has 'label' and 'pixel0'..'pixel783'"
            if require_label
            else "a file to score has 'pixel0'..'pixel783' (and optionally 'label' and an id column)"
        )
        separator = next((s for s in ";\t|" if len(header) == 1 and s in header[0]), None)
        hint = f" (the header has no commas: is the file separated by {separator!r}?)" if separator else ""
        raise DataValidationError(f"missing column(s) {shown}; {contract}{hint}", source=path)
    extra = [c for c in header if c not in expected and c not in ID_COLUMNS]
    if extra:
        raise DataValidationError(
            f"unexpected column(s) {', '.join(map(repr, extra[:5]))}; expected only "
            f"'label', 'pixel0'..'pixel783' and optionally one of {', '.join(ID_COLUMNS)}",
            source=path,
        )


# --- one chunk of lines -------------------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    """Why one data row was refused: a ``DataValidationError``'s fields plus the line's text."""

    row: int
    problem: str
    column: str | None = None
    value: object = None
    raw: str = ""

    def error(self, source: str) -> DataValidationError:
        return DataValidationError(
            self.problem, source=source, row=self.row, column=self.column, value=self.value
        )

    @property
    def reason(self) -> str:
        """One sentence for a person, e.g. ``pixel37 is 300, outside 0..255``."""
        if self.column is None:
            return self.problem
        if self.value == "":
            return f"{self.column} is empty"
        shown = repr(self.value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{self.column} is {shown}, {self.problem}"


def parse_chunk(
    data: bytes, layout: CsvLayout, first_line: int
) -> tuple[dict[str, np.ndarray], list[RowProblem]]:
    """Parse and validate whole CSV lines (no header) whose first is physical line ``first_line``.

    Returns ``(valid, rejects)``. ``valid`` holds the good rows in file order:
    ``image`` uint8 (n, 28, 28), ``row`` int64 (n,), ``label`` int64 (n,) if the
    file has labels, ``image_id`` int64 (n,) if ``layout.id_column``. ``rejects``
    has one :class:`RowProblem` per refused line (blank lines included), in the
    order the checks find them: values that are not integers (by column: label,
    id, pixel0.., then row), lines with the wrong number of values, then empty
    and out-of-range values (by column, then row). Training raises the first.
    """
    if not data:
        return _no_rows(layout), []
    lines = _Lines(data, first_line)
    unparseable = lines.unparseable()
    rejects = [lines.reject(i, problem) for i, problem in unparseable.items()]
    checks = layout.checks()
    columns = [name for name, _, _ in checks]
    table, wrong_count, typed = _parse(lines.parser_input(unparseable), layout.header, columns)
    # Every line is a table row, but those pyarrow skipped for their number of values.
    row_lines = np.delete(np.arange(len(lines)), [number - 1 for number, _, _ in wrong_count])
    if len(row_lines) != table.num_rows:
        raise RuntimeError(
            f"{layout.source}: the CSV parser saw {table.num_rows + len(wrong_count)} lines from line "
            f"{first_line}, expected {len(lines)}"
        )
    blank = lines.blank(row_lines)
    open_rows = ~blank & ~np.isin(row_lines, list(unparseable))
    rejects += [lines.reject(i, BLANK_LINE) for i in row_lines[blank].tolist()]
    if not typed:
        table, found = _reject_non_integers(table, checks, open_rows, row_lines, lines)
        rejects += found
    rejects += [
        lines.reject(
            number - 1,
            f"has {actual} values, expected {expected} "
            f"(one per header column; line {number + first_line - 1} of the file)",
            value=lines.text(number - 1)[:60],
        )
        for number, actual, expected in wrong_count
    ]
    columns, found = _check_ranges(table, checks, open_rows, row_lines, lines)
    rejects += found
    return _valid_rows(columns, open_rows, lines.rows[row_lines], layout), rejects


def _no_rows(layout: CsvLayout) -> dict[str, np.ndarray]:
    out = {"image": np.empty((0, *IMAGE_SHAPE), np.uint8), "row": np.empty(0, np.int64)}
    if layout.has_label:
        out["label"] = np.empty(0, np.int64)
    if layout.id_column:
        out["image_id"] = np.empty(0, np.int64)
    return out


class _Lines:
    """The physical lines of a chunk: where each is, its data row number, its text for rejects."""

    def __init__(self, data: bytes, first_line: int) -> None:
        self.data = data
        newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
        self.starts = np.concatenate([[0], newlines + 1])
        self.ends = np.concatenate([newlines, [len(data)]])  # exclusive, before the \n
        if self.starts[-1] == len(data):  # data ends with \n: no line after it
            self.starts, self.ends = self.starts[:-1], self.ends[:-1]
        self.rows = np.arange(len(self.starts), dtype=np.int64) + first_line - 1  # data row = line - 1

    def __len__(self) -> int:
        return len(self.starts)

    def text(self, i: int) -> str:
        return truncate_text(self.data[int(self.starts[i]) : int(self.ends[i])].rstrip(b"\r"))

    def reject(self, i: int, problem: str, *, column: str | None = None, value: object = None) -> RowProblem:
        return RowProblem(int(self.rows[i]), problem, column=column, value=value, raw=self.text(i))

    def blank(self, lines: np.ndarray) -> np.ndarray:
        """Which of ``lines`` are empty (a lone CR of a CRLF end counts as empty)."""
        length = self.ends[lines] - self.starts[lines]
        first_byte = np.frombuffer(self.data, np.uint8)[np.minimum(self.starts[lines], len(self.data) - 1)]
        return (length == 0) | ((length == 1) & (first_byte == ord("\r")))

    def unparseable(self) -> dict[int, str]:
        """Line → problem, for lines pyarrow must not see as they are: a lone CR would split one
        line in two and shift every later row number; an overlong line is not a digit row.
        """
        problems = {int(i): LONG_LINE for i in np.flatnonzero(self.ends - self.starts > MAX_LINE_BYTES)}
        if _BOM in self.data:
            # pyarrow drops a BOM that starts its input, so a line's fate would depend on where
            # the chunk begins (found by tests/test_fuzz_csv.py): refuse such lines wherever they are.
            for i, start in enumerate(self.starts.tolist()):
                if i not in problems and self.data.startswith(_BOM, start):
                    problems[i] = BOM_LINE
        if self.data.count(b"\r") != self.data.count(b"\r\n"):
            for i, (start, end) in enumerate(zip(self.starts.tolist(), self.ends.tolist(), strict=True)):
                if i not in problems and b"\r" in self.data[start:end].removesuffix(b"\r"):
                    problems[i] = "contains a carriage return (\\r) inside the line"
        return dict(sorted(problems.items()))

    def parser_input(self, unparseable: dict[int, str]) -> bytes:
        """The chunk as pyarrow parses it: unparseable lines emptied, quotes around numbers removed."""
        data = self.data
        if unparseable:
            parts, pos = [], 0
            for i in unparseable:
                parts.append(data[pos : int(self.starts[i])])
                pos = int(self.ends[i])
            data = b"".join([*parts, data[pos:]])
            if len(self) - 1 in unparseable and not self.data.endswith(b"\n"):
                # The emptied line was the last one, with no end: without a "\n" the parser would
                # not see it at all (found by tests/test_fuzz_csv.py).
                data += b"\n"
        return _QUOTED_FIELD.sub(rb"\1", data) if b'"' in data else data


def truncate_text(line: bytes) -> str:
    """A line's bytes as text for a person: undecodable bytes escaped, long lines cut with a note."""
    text = line[: RAW_TEXT_CHARS * 4].decode("utf-8", "backslashreplace")
    if len(text) > RAW_TEXT_CHARS or len(line) > RAW_TEXT_CHARS * 4:
        return text[:RAW_TEXT_CHARS] + f"... [{len(line):,} bytes in all]"
    return text


def _parse(data: bytes, header: tuple[str, ...], columns: list[str]) -> tuple[pa.Table, list, bool]:
    """pyarrow's parse of ``data``: typed int64, or as bytes if some value is not an integer.

    Returns (table, wrong-count lines as (line number in chunk, values, expected), typed).
    """
    if _only_plain_integers(data):
        try:
            return (*_pyarrow_parse(data, header, columns, pa.int64()), True)
        except pa.ArrowInvalid:
            pass
    return (*_pyarrow_parse(data, header, columns, pa.binary()), False)


def _only_plain_integers(data: bytes) -> bool:
    """Whether pyarrow's int64 parse of ``data`` can accept only what ``_INTEGER`` accepts.

    pyarrow also takes `` 12``, ``12\t``, ``0x1f`` and 19 digits: in a chunk of such
    values a row's fate would depend on its neighbours (found by tests/test_fuzz_csv.py).
    Digits, commas, minus and line ends only, no field longer than 18 bytes, is every
    ordinary chunk; anything else goes through the regex. ~10 ms per 8 MB chunk.
    """
    if data.translate(None, _PLAIN_BYTES):
        return False
    codes = np.frombuffer(data, np.uint8)
    separators = np.flatnonzero((codes == ord(",")) | (codes == ord("\n")))
    return int(np.diff(separators, prepend=-1, append=len(data)).max()) - 1 <= _MAX_PLAIN_FIELD


def _pyarrow_parse(
    data: bytes, header: tuple[str, ...], columns: list[str], kind: pa.DataType
) -> tuple[pa.Table, list[tuple[int, int, int]]]:
    wrong_count: list[tuple[int, int, int]] = []

    def on_invalid(row) -> str:
        wrong_count.append((row.number, row.actual_columns, row.expected_columns))
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(data),
        # Serial parsing numbers the invalid rows; blank lines are kept so they can be
        # reported; no quoting, so that a physical line is always one row.
        read_options=pacsv.ReadOptions(
            use_threads=False, column_names=list(header), block_size=len(data) + 1
        ),
        parse_options=pacsv.ParseOptions(
            invalid_row_handler=on_invalid, ignore_empty_lines=False, quote_char=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: kind for c in columns},
            include_columns=columns,
            null_values=[""],
            strings_can_be_null=False,
            check_utf8=False,
        ),
    )
    return table, wrong_count


def _reject_non_integers(
    table: pa.Table, checks: list[Check], open_rows: np.ndarray, row_lines: np.ndarray, lines: _Lines
) -> tuple[pa.Table, list[RowProblem]]:
    """Reject the open rows holding a value that is not a plain integer; return the table as int64.

    ``table`` has binary columns; ``open_rows`` (bool per table row) loses the rows rejected here.
    """
    rejects = []
    converted = {}
    for name, _, _ in checks:
        column = table[name]
        is_int = pc.match_substring_regex(column, _INTEGER).to_numpy(zero_copy_only=False)
        newly_bad = np.flatnonzero(~is_int & open_rows)
        # A row is rejected once, for its first bad column: this loop runs once per bad row.
        open_rows[newly_bad] = False
        for i in newly_bad.tolist():
            value = column[i].as_py().decode("utf-8", "backslashreplace")
            problem = _non_integer_problem(value)
            rejects.append(lines.reject(int(row_lines[i]), problem, column=name, value=value))
        placeholder = pa.scalar(b"0", pa.binary())  # in rejected rows only, so that the cast succeeds
        converted[name] = pc.cast(pc.if_else(pa.array(is_int), column, placeholder), pa.int64())
    return pa.table(converted), rejects


def _non_integer_problem(value: str) -> str:
    if value == "":
        return "empty value"
    if re.fullmatch(r"[+-]?[0-9]+", value):
        return "not a plain integer in range (digits only, at most 18)"
    return "not an integer"


def _check_ranges(
    table: pa.Table, checks: list[Check], open_rows: np.ndarray, row_lines: np.ndarray, lines: _Lines
) -> tuple[dict[str, np.ndarray], list[RowProblem]]:
    """Columns as int64 arrays (empty values as 0); reject the open rows with an empty or out-of-range value.

    ``open_rows`` loses the rows rejected here. The usual chunk has no bad value: each
    column's null count and min/max (one pass in pyarrow) clear it, and only the
    columns they do not clear are checked value by value.
    """
    columns: dict[str, np.ndarray] = {}
    suspects: list[int] = []
    for k, (name, lo, hi) in enumerate(checks):
        column = table[name].combine_chunks() if table[name].num_chunks != 1 else table[name].chunk(0)
        low, high = (scalar.as_py() for scalar in pc.min_max(column).values())
        if column.null_count or (low is not None and low < lo) or (hi is not None and high is not None
                                                                   and high > hi):
            suspects.append(k)
        columns[name] = column
    if not suspects:
        return {name: column.to_numpy() for name, column in columns.items()}, []
    empty = np.zeros((table.num_rows, len(suspects)), dtype=bool)
    bad = np.zeros_like(empty)
    for j, k in enumerate(suspects):
        name, lo, hi = checks[k]
        column = columns[name]
        if column.null_count:
            empty[:, j] = pc.is_null(column).to_numpy(zero_copy_only=False)
            column = columns[name] = pc.fill_null(column, 0)
        values = column.to_numpy()
        bad[:, j] = empty[:, j] | (values < lo) | (False if hi is None else values > hi)
    bad &= open_rows[:, None]
    bad_rows = np.flatnonzero(bad.any(axis=1))
    first_bad = bad[bad_rows].argmax(axis=1)  # suspects are in check order: the row's first bad column
    is_empty = empty[bad_rows, first_bad]
    # The order training reports in: by column, an empty value before an out-of-range one, then by row.
    order = np.lexsort((bad_rows, ~is_empty, first_bad))
    rejects = []
    for i, j, blank in zip(bad_rows[order].tolist(), first_bad[order].tolist(), is_empty[order].tolist(),
                           strict=True):
        name, lo, hi = checks[suspects[j]]
        if blank:
            problem, value = "empty value", ""
        else:
            value = int(columns[name][i].as_py())
            problem = f"outside {lo}..{hi}" if hi is not None else f"below {lo}"
        rejects.append(lines.reject(int(row_lines[i]), problem, column=name, value=value))
    open_rows[bad_rows] = False
    return {name: column.to_numpy() for name, column in columns.items()}, rejects


def _valid_rows(
    columns: dict[str, np.ndarray], keep: np.ndarray, rows: np.ndarray, layout: CsvLayout
) -> dict[str, np.ndarray]:
    # Column by column into uint8, then the kept rows: never an int64 copy of the whole chunk.
    # Values of rejected rows may wrap in the cast; those rows are dropped right after.
    pixels = np.empty((len(keep), len(PIXEL_COLUMNS)), dtype=np.uint8, order="F")
    for j, name in enumerate(PIXEL_COLUMNS):
        pixels[:, j] = columns[name]
    out = {"image": pixels[keep].reshape((-1, *IMAGE_SHAPE)), "row": rows[keep]}
    if layout.has_label:
        out["label"] = columns[LABEL_COLUMN][keep]
    if layout.id_column:
        out["image_id"] = columns[layout.id_column][keep]
    return out


# --- a whole file, streamed ---------------------------------------------------------------------


@dataclass(frozen=True)
class LongLine:
    """A line longer than MAX_LINE_BYTES: rejected without being parsed."""

    line: int
    prefix: bytes


class CsvChunks:
    """Streams one CSV file as validated chunks, in constant memory whatever its size.

    Iterating yields ``(valid, rejects)`` per chunk (see :func:`parse_chunk`).
    ``layout`` is known once the first chunk is read; afterwards ``data_lines``
    counts the physical lines after the header, and ``size`` and ``sha256``
    describe the stored bytes that were read (compressed, for ``.gz``):
    the whole file if ``read_to_end``. Problems
    of the file as a whole raise ``DataValidationError``: before the first chunk
    for the header, midway for a damaged gzip stream.
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

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], list[RowProblem]]]:
        pieces = line_chunks(self._decompressed(), self.chunk_bytes)
        _, head = next(pieces, (1, b""))
        self.layout = parse_header(
            head.prefix if isinstance(head, LongLine) else head,
            self.path, require_label=self.require_label, read_id=self.read_id,
        )
        if isinstance(head, LongLine):
            raise DataValidationError("header line is longer than 1 MiB: not a digit CSV", source=self.path)
        rest = head.partition(b"\n")[2]
        if rest:
            yield self._parse(rest, 2)
        for line, piece in pieces:
            yield self._parse(piece, line)

    def _parse(self, piece: bytes | LongLine, line: int) -> tuple[dict[str, np.ndarray], list[RowProblem]]:
        if isinstance(piece, LongLine):
            self.data_lines += 1
            return _no_rows(self.layout), [RowProblem(line - 1, LONG_LINE, raw=truncate_text(piece.prefix))]
        self.data_lines += piece.count(b"\n") + (not piece.endswith(b"\n"))
        return parse_chunk(piece, self.layout, line)

    def _decompressed(self) -> Iterator[bytes]:
        blocks = self._hashed(raw_blocks(self.path))
        return gunzip(blocks, self.path) if self.path.lower().endswith(".gz") else blocks

    def _hashed(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        for block in blocks:
            self._digest.update(block)
            self.size += len(block)
            yield block
        self.read_to_end = True


def gunzip(blocks: Iterator[bytes], source: str) -> Iterator[bytes]:
    """Decompress a gzip stream (several members allowed) in bounded pieces.

    Raises ``DataValidationError`` for corrupt or truncated data, after yielding
    everything before the damage.
    """
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    in_member = False
    for block in blocks:
        pending = block
        while pending:
            in_member = True
            try:
                # Bounded output: a small block of a "zip bomb" must not expand all at once.
                out = inflater.decompress(pending, READ_BLOCK_BYTES)
            except zlib.error as exc:
                raise DataValidationError(f"is not valid gzip data ({exc})", source=source) from None
            if out:
                yield out
            if inflater.eof:
                pending = inflater.unused_data
                inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                in_member = False
            else:
                pending = inflater.unconsumed_tail
    if in_member:
        out = inflater.flush()
        if out:
            yield out
        raise DataValidationError("gzip data ends early: the file is truncated", source=source)


def line_chunks(blocks: Iterator[bytes], chunk_bytes: int) -> Iterator[tuple[int, bytes | LongLine]]:
    """Regroup byte blocks into ``(first line number, whole lines)`` pieces of about ``chunk_bytes``.

    A line still unfinished after MAX_LINE_BYTES comes out alone as a :class:`LongLine`
    and the rest of it is skipped, so memory stays bounded (chunk_bytes + a block +
    MAX_LINE_BYTES) even for a file without line ends. The last piece may lack a final ``\\n``.
    """
    line = 1
    carry = bytearray()
    skipping = False  # inside a long line, dropping bytes up to its end
    try:
        for block in blocks:
            if skipping:
                end = block.find(b"\n")
                if end < 0:
                    continue
                block, skipping, line = block[end + 1 :], False, line + 1
            carry += block
            while cut := _chunk_end(carry, chunk_bytes):
                piece = bytes(carry[:cut])
                del carry[:cut]
                yield line, piece
                line += piece.count(b"\n")
            tail = carry.rfind(b"\n") + 1
            if len(carry) - tail > MAX_LINE_BYTES:
                if tail:
                    piece = bytes(carry[:tail])
                    yield line, piece
                    line += piece.count(b"\n")
                yield line, LongLine(line, bytes(carry[tail : tail + RAW_TEXT_CHARS * 4]))
                carry.clear()
                skipping = True
    except DataValidationError:
        # The stream broke (a damaged gzip file): the whole lines read before the damage still count.
        if not skipping and (whole := carry.rfind(b"\n") + 1):
            yield line, bytes(carry[:whole])
        raise
    if carry and not skipping:
        yield line, bytes(carry)


def _chunk_end(carry: bytearray, chunk_bytes: int) -> int:
    """Where the next piece ends: after the last whole line within ``chunk_bytes``; 0 if not yet."""
    if len(carry) < chunk_bytes:
        return 0
    end = carry.rfind(b"\n", 0, chunk_bytes)
    if end < 0:  # one line longer than a chunk: the piece is that line
        end = carry.find(b"\n", chunk_bytes)
    return end + 1


# --- training: the whole file or nothing --------------------------------------------------------


def read_training_csv(path: str) -> dict[str, np.ndarray]:
    """Read one labelled Kaggle CSV file, refusing anything off-contract.

    Returns ``{"image": uint8 (n, 28, 28), "label": int64 (n,), "row": int64 (n,)}``
    with ``row`` the 1-based data row number. Blank lines are skipped. Raises
    ``DataValidationError`` for the first problem found.
    """
    parts = []
    for valid, rejects in CsvChunks(path, require_label=True, read_id=False):
        problems = [r for r in rejects if r.problem != BLANK_LINE]
        if problems:
            raise problems[0].error(path)
        parts.append(valid)
    if not parts or not sum(len(p["row"]) for p in parts):
        raise DataValidationError("has a header but no data rows", source=path)
    return {key: np.concatenate([p[key] for p in parts]) for key in ("image", "label", "row")}


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
