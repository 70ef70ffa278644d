"""The rules of a Kaggle "Digit Recognizer" CSV file: its header and its values, one chunk of lines at a time.

A file has a header naming ``pixel0``..``pixel783`` (``pixelK`` is image row
``K // 28``, column ``K % 28``), optionally ``label`` and one id column
(``ImageId`` or ``id``), in any order, then one image per line. Rows are numbered by
physical line: data row = line number − 1 (the header is line 1), which is Kaggle's
``ImageId`` numbering for a file without blank lines.

Nothing is coerced: ``7.0`` is not an integer pixel, an empty field is not 0; but spaces
or tabs around a value are allowed (``0, 0, 12``), as pandas and Spark read them. An id
column (``ImageId`` / ``id``) holds any text up to MAX_ID_CHARS characters.
:func:`parse_header` reads the layout, :func:`parse_chunk` validates whole lines and
returns the valid rows and one :class:`RowProblem` per rejected row. Training and
scoring share these rules (:mod:`mnist_ray.data.csv_reader`); problems of a file as a
whole raise :class:`~mnist_ray.data.schema.DataValidationError`.

One cohesive thing of ~400 lines: the validation is vectorised (pyarrow parses, numpy
checks) and the rare bad row is then explained precisely, which takes both halves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mnist_ray.data.csv_files import MAX_LINE_BYTES
from mnist_ray.data.schema import (
    ID_COLUMNS,
    IMAGE,
    IMAGE_ID,
    IMAGE_SHAPE,
    LABEL,
    LABEL_COLUMN,
    NUM_CLASSES,
    PIXEL_COLUMNS,
    PIXEL_MAX,
    PIXEL_MIN,
    ROW,
    DataValidationError,
)

# Rejects keep this much of a bad line's text: every plausible digit row fits whole.
RAW_TEXT_CHARS = 4096
BINARY_SNIFF_BYTES = 1 << 16
BLANK_LINE = "blank line (no values)"
LONG_LINE = f"line is longer than {MAX_LINE_BYTES:,} bytes: not a digit row"
BOM_LINE = "starts with a byte-order mark (U+FEFF), which belongs only at the start of the file"
_BOM = b"\xef\xbb\xbf"
# 18 digits always fit int64; longer numbers are out of any valid range anyway.
_INTEGER = r"^-?[0-9]{1,18}$"
# Spaces and tabs around a value, which the value does not include.
_AROUND = r"^[ \t]+|[ \t]+$"
# An id is provenance, not data: any text, but not a whole line's worth.
MAX_ID_CHARS = 256
# Bytes, and longest field (a CR included), for which pyarrow's int64 parse accepts only _INTEGER.
_PLAIN_BYTES = b"0123456789,-\r\n"
_MAX_PLAIN_FIELD = 18
# A field wholly in double quotes, with nothing a number could not hold inside: "12" → 12.
_QUOTED_FIELD = re.compile(rb'(?<![^,\n])"([^",\r\n]*)"(?=[,\r\n]|\Z)')
_GZIP_MAGIC = b"\x1f\x8b"


# --- the header ---------------------------------------------------------------------------------


# (column, lowest, highest) of one checked column; highest None: no upper bound.
Check = tuple[str, int, int | None]


@dataclass(frozen=True)
class CsvLayout:
    """What a file's header says: its columns and which of them are read, in checking order."""

    source: str
    header: tuple[str, ...]
    has_label: bool
    id_column: str | None  # read as text (scoring); training ignores id columns

    def checks(self) -> list[Check]:
        """``(column, lowest, highest)`` of the integer columns, in the order rows are checked:
        label, pixel0..783."""
        checks: list[Check] = []
        if self.has_label:
            checks.append((LABEL_COLUMN, 0, NUM_CLASSES - 1))
        checks.extend((name, PIXEL_MIN, PIXEL_MAX) for name in PIXEL_COLUMNS)
        return checks


def is_text_header(first_bytes: bytes) -> bool:
    """Whether a file starts like a CSV file at all (text, not empty, not binary or compressed):
    a header refused beyond that is a CSV file with other columns, whose lines are counted."""
    try:
        first_bytes.split(b"\n", 1)[0].decode("utf-8-sig")
    except UnicodeDecodeError:
        return False
    sniff = first_bytes[:BINARY_SNIFF_BYTES]
    return bool(sniff.strip()) and not first_bytes.startswith(_GZIP_MAGIC) and b"\x00" not in sniff


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
    file has labels, ``image_id`` str objects (n,) if ``layout.id_column`` ("" for an
    empty id). ``rejects`` has one :class:`RowProblem` per refused line (blank lines
    included), in the order the checks find them: values that are not integers (by
    column: label, pixel0.., then row), lines with the wrong number of values, then
    empty and out-of-range values (by column, then row), then ids too long.
    """
    if not data:
        return empty_rows(layout), []
    lines = _Lines(data, first_line)
    unparseable = lines.unparseable()
    rejects = [lines.reject(i, problem) for i, problem in unparseable.items()]
    checks = layout.checks()
    columns = [name for name, _, _ in checks]
    table, wrong_count, typed = _parse(lines.parser_input(unparseable), layout.header, columns,
                                       layout.id_column)
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
    if layout.id_column:
        columns[layout.id_column], found = _read_ids(table[layout.id_column], layout.id_column, open_rows,
                                                     row_lines, lines)
        rejects += found
    return _valid_rows(columns, open_rows, lines.rows[row_lines], layout), rejects


def empty_rows(layout: CsvLayout) -> dict[str, np.ndarray]:
    """The valid rows of a chunk that has none, with the columns ``layout`` gives them."""
    out = {IMAGE: np.empty((0, *IMAGE_SHAPE), np.uint8), ROW: np.empty(0, np.int64)}
    if layout.has_label:
        out[LABEL] = np.empty(0, np.int64)
    if layout.id_column:
        out[IMAGE_ID] = np.empty(0, object)
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


def _parse(
    data: bytes, header: tuple[str, ...], columns: list[str], id_column: str | None
) -> tuple[pa.Table, list, bool]:
    """pyarrow's parse of ``data``: ``columns`` typed int64, or as bytes if some value is not an
    integer; ``id_column`` (if any) as bytes.

    Returns (table, wrong-count lines as (line number in chunk, values, expected), typed).
    """
    if _only_plain_integers(data):
        try:
            return (*_pyarrow_parse(data, header, columns, pa.int64(), id_column), True)
        except pa.ArrowInvalid:
            pass
    return (*_pyarrow_parse(data, header, columns, pa.binary(), id_column), False)


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
    data: bytes, header: tuple[str, ...], columns: list[str], kind: pa.DataType, id_column: str | None
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
            column_types={c: kind for c in columns} | ({id_column: pa.binary()} if id_column else {}),
            include_columns=columns + ([id_column] if id_column else []),
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
        column = pc.replace_substring_regex(table[name], _AROUND, b"")
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
    for name, column in converted.items():
        table = table.set_column(table.column_names.index(name), name, column)
    return table, rejects


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


def _read_ids(
    column: pa.ChunkedArray, name: str, open_rows: np.ndarray, row_lines: np.ndarray, lines: _Lines
) -> tuple[np.ndarray, list[RowProblem]]:
    """The ids as str objects (spaces around them dropped, bytes that are not UTF-8 escaped, ""
    for an empty one); reject the open rows whose id is longer than MAX_ID_CHARS.

    ``open_rows`` loses the rows rejected here.
    """
    values = pc.replace_substring_regex(column, _AROUND, b"").to_pylist()
    ids = np.array([v.decode("utf-8", "backslashreplace") if v else "" for v in values], dtype=object)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    too_long = np.flatnonzero((lengths > MAX_ID_CHARS) & open_rows)
    open_rows[too_long] = False
    rejects = [
        lines.reject(int(row_lines[i]), f"longer than the {MAX_ID_CHARS} characters an id may have "
                     f"({lengths[i]:,})", column=name, value=ids[i])
        for i in too_long.tolist()
    ]
    return ids, rejects


def _valid_rows(
    columns: dict[str, np.ndarray], keep: np.ndarray, rows: np.ndarray, layout: CsvLayout
) -> dict[str, np.ndarray]:
    # Column by column into uint8, then the kept rows: never an int64 copy of the whole chunk.
    # Values of rejected rows may wrap in the cast; those rows are dropped right after.
    pixels = np.empty((len(keep), len(PIXEL_COLUMNS)), dtype=np.uint8, order="F")
    for j, name in enumerate(PIXEL_COLUMNS):
        pixels[:, j] = columns[name]
    out = {IMAGE: pixels[keep].reshape((-1, *IMAGE_SHAPE)), ROW: rows[keep]}
    if layout.has_label:
        out[LABEL] = columns[LABEL_COLUMN][keep]
    if layout.id_column:
        out[IMAGE_ID] = columns[layout.id_column][keep]
    return out

