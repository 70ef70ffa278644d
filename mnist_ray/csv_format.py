"""Reading Kaggle "Digit Recognizer" CSV files into validated arrays.

A training file has a header ``label,pixel0,...,pixel783`` (any column order;
an ``ImageId``/``id`` column is allowed and ignored) and one image per row.
Files may be gzip-compressed (``.csv.gz``). Rows are numbered from 1 after the
header, the way Kaggle numbers ``ImageId``.

Validation is strict: the first problem found is raised as a
:class:`~mnist_ray.schema.DataValidationError` naming file, row, column and value.
Nothing is coerced: ``7.0`` is not an integer pixel, an empty field is not 0.
"""

from __future__ import annotations

import glob
import os
import re
from typing import NoReturn

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
                m for m in glob.glob(spec, recursive=True) if os.path.isfile(m) and m.endswith(CSV_SUFFIXES)
            ]
        elif os.path.isdir(spec):
            matches = [
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if name.endswith(CSV_SUFFIXES)
            ]
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            raise FileNotFoundError(f"{spec}: no such file or directory")
        if not matches:
            raise FileNotFoundError(f"{spec}: matched no .csv or .csv.gz file")
        paths.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(paths))


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
        if i.type == pafs.FileType.File and i.path.endswith(CSV_SUFFIXES)
    ]
    if not found:
        raise FileNotFoundError(f"{uri}: matched no .csv or .csv.gz file")
    return found


def open_input(path: str) -> pa.NativeFile:
    """Open a local path or URI for reading, decompressing ``.gz`` transparently."""
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
    else:
        fs, inner = pafs.LocalFileSystem(), path
    return fs.open_input_stream(inner, compression="detect")


def read_training_csv(path: str) -> dict[str, np.ndarray]:
    """Read one labelled Kaggle CSV file, refusing anything off-contract.

    Returns ``{"image": uint8 (n, 28, 28), "label": int64 (n,), "row": int64 (n,)}``
    with ``row`` the 1-based data row number. Raises ``DataValidationError``.
    """
    header = _read_header(path)
    _check_columns(path, header, require_label=True)
    table = _read_table(path, header)
    if table.num_rows == 0:
        raise DataValidationError("has a header but no data rows", source=path)
    label = _checked_int_column(path, table, LABEL_COLUMN, 0, NUM_CLASSES - 1)
    pixels = np.empty((table.num_rows, len(PIXEL_COLUMNS)), dtype=np.uint8)
    for k, name in enumerate(PIXEL_COLUMNS):
        pixels[:, k] = _checked_int_column(path, table, name, PIXEL_MIN, PIXEL_MAX)
    return {
        "image": pixels.reshape((-1, *IMAGE_SHAPE)),
        "label": label.astype(np.int64),
        "row": np.arange(1, table.num_rows + 1, dtype=np.int64),
    }


def _read_header(path: str) -> list[str]:
    with open_input(path) as stream:
        first = stream.read(1 << 16)
    if not first.strip():
        raise DataValidationError("file is empty: expected a header row", source=path)
    if b"\x00" in first:
        raise DataValidationError("is not a text CSV file (binary content)", source=path)
    line = first.splitlines()[0]
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataValidationError("header is not UTF-8 text", source=path) from exc
    return [name.strip().strip('"') for name in text.split(",")]


def _check_columns(path: str, header: list[str], *, require_label: bool) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataValidationError("duplicated column in the header", source=path, column=name)
        seen.add(name)
    expected = set(PIXEL_COLUMNS) | ({LABEL_COLUMN} if require_label else set())
    missing = [c for c in [LABEL_COLUMN, *PIXEL_COLUMNS] if c in expected and c not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataValidationError(
            f"missing column(s) {shown}; a training file has 'label' and 'pixel0'..'pixel783'",
            source=path,
        )
    extra = [c for c in header if c not in expected and c not in ID_COLUMNS]
    if extra:
        raise DataValidationError(
            f"unexpected column(s) {', '.join(map(repr, extra[:5]))}; expected only "
            f"'label', 'pixel0'..'pixel783' and optionally one of {', '.join(ID_COLUMNS)}",
            source=path,
        )


def _read_table(path: str, header: list[str]) -> pa.Table:
    """Parse with every needed column typed int64; diagnose precisely on failure."""
    wanted = [c for c in header if c not in ID_COLUMNS]
    try:
        table, bad_rows = _parse(path, wanted, use_threads=True)
    except pa.ArrowInvalid:
        _raise_first_non_integer(path, wanted)
    if bad_rows:
        if bad_rows[0].number is None:
            # Threaded parsing does not know line numbers; a serial re-parse does.
            _, bad_rows = _parse(path, wanted, use_threads=False)
        first = bad_rows[0]
        raise DataValidationError(
            f"has {first.actual_columns} values, expected {first.expected_columns} "
            f"(one per header column; line {first.number} of the file)",
            source=path,
            row=first.number - 1,  # the header is line 1
            value=first.text[:60],
        )
    return table


def _parse(path: str, columns: list[str], *, use_threads: bool) -> tuple[pa.Table, list]:
    bad_rows: list = []

    def on_invalid(row) -> str:
        bad_rows.append(row)
        return "skip"

    with open_input(path) as stream:
        table = pacsv.read_csv(
            stream,
            read_options=pacsv.ReadOptions(use_threads=use_threads),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.int64() for c in columns},
                include_columns=columns,
                null_values=[""],
                strings_can_be_null=False,
            ),
        )
    return table, bad_rows


def _raise_first_non_integer(path: str, columns: list[str]) -> NoReturn:
    with open_input(path) as stream:
        table = pacsv.read_csv(
            stream,
            parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns},
                include_columns=columns,
                strings_can_be_null=False,
            ),
        )
    for name in [LABEL_COLUMN, *PIXEL_COLUMNS]:
        if name not in table.column_names:
            continue
        text = table[name]
        # 18 digits always fit int64; longer numbers are out of any valid range anyway.
        is_int = pc.match_substring_regex(text, r"^-?[0-9]{1,18}$")
        if not pc.all(is_int).as_py():
            index = int(pc.index(is_int, False).as_py())
            value = text[index].as_py()
            if value == "":
                problem = "empty value"
            elif re.fullmatch(r"[+-]?[0-9]+", value):
                problem = "not a plain integer in range (digits only, at most 18)"
            else:
                problem = "not an integer"
            raise DataValidationError(problem, source=path, row=index + 1, column=name, value=value)
    raise DataValidationError("could not be parsed as CSV", source=path)


def _checked_int_column(path: str, table: pa.Table, name: str, low: int, high: int) -> np.ndarray:
    column = table[name]
    if column.null_count:
        index = int(pc.index(pc.is_null(column), True).as_py())
        raise DataValidationError("empty value", source=path, row=index + 1, column=name, value="")
    values = column.to_numpy()
    bad = (values < low) | (values > high)
    if bad.any():
        index = int(np.argmax(bad))
        raise DataValidationError(
            f"outside {low}..{high}", source=path, row=index + 1, column=name, value=int(values[index])
        )
    return values


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
