"""Helpers shared by the tests: writing and editing real Kaggle "Digit Recognizer" CSV files,
and running the scoring job in the test's process.

The CSV writer is deliberately independent of mnist_ray.data.csv_reader.write_kaggle_csv:
the reader is checked against a writer that shares no code with it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KAGGLE_PIXEL_COLUMNS = [f"pixel{k}" for k in range(28 * 28)]


def write_kaggle_csv(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    gz: bool = False,
    shuffle_columns: bool = False,
    id_column: str | None = None,
    seed: int = 0,
) -> Path:
    """Write ``images`` (n, 28, 28) and optional ``labels`` (n,) as a Kaggle CSV file.

    The header is ``label,pixel0,...,pixel783`` (no ``label`` when ``labels`` is None);
    ``pixelK`` is the pixel at image row ``K // 28``, column ``K % 28``. ``id_column``
    (e.g. ``"ImageId"``) adds a first column numbering the rows from 1. ``shuffle_columns``
    writes the columns in a seeded random order. ``gz`` gzip-compresses the file (whatever
    its name). Lines end with ``\\n``. Returns the path.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images must have shape (n, 28, 28), got {images.shape}")
    n = len(images)
    names: list[str] = []
    columns: list[np.ndarray] = []
    if id_column is not None:
        names.append(id_column)
        columns.append(np.arange(1, n + 1, dtype=np.int64)[:, None])
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        names.append("label")
        columns.append(labels.astype(np.int64)[:, None])
    names.extend(KAGGLE_PIXEL_COLUMNS)
    # Row-major flattening is exactly the Kaggle numbering: k = 28 * row + col.
    columns.append(images.reshape(n, 28 * 28).astype(np.int64))
    table = np.concatenate(columns, axis=1)
    if shuffle_columns:
        order = np.random.default_rng(seed).permutation(len(names))
        names = [names[i] for i in order]
        table = table[:, order]

    buffer = io.StringIO()
    buffer.write(",".join(names) + "\n")
    for values in table:
        buffer.write(",".join(map(str, values.tolist())) + "\n")
    data = buffer.getvalue().encode("ascii")

    path = Path(path)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def rewrite_csv(path: str | Path, edit: Callable[[list[list[str]]], None]) -> None:
    """Edit a plain (not gzip) ``\n``-terminated CSV in place, cell by cell.

    ``edit`` receives the rows as lists of cell texts, header first (so data row ``i``,
    numbered from 1 like ``ImageId``, is ``rows[i]``), and changes them in place.
    """
    path = Path(path)
    text = path.read_text()
    rows = [line.split(",") for line in text.split("\n") if line != ""]
    edit(rows)
    path.write_text("".join(",".join(row) + "\n" for row in rows))


def set_csv_cell(path: str | Path, data_row: int, column: str, text: str) -> None:
    """Replace the text of one cell (``data_row`` 1-based, ``column`` by header name)."""

    def edit(rows: list[list[str]]) -> None:
        rows[data_row][rows[0].index(column)] = text

    rewrite_csv(path, edit)


def drop_csv_column(path: str | Path, column: str) -> None:
    """Remove one column (header and values) from a plain CSV."""

    def edit(rows: list[list[str]]) -> None:
        k = rows[0].index(column)
        for row in rows:
            del row[k]

    rewrite_csv(path, edit)


def append_column(name: str, value: str) -> Callable[[list[list[str]]], None]:
    """An edit for :func:`rewrite_csv`: a last column ``name`` holding ``value`` in every row."""

    def edit(rows: list[list[str]]) -> None:
        rows[0].append(name)
        for row in rows[1:]:
            row.append(value)

    return edit


# Faults for score_and_die: the job SIGKILLs itself before its batch is committed (staging is left) …
KILL_BEFORE_PUBLISHING = """
from mnist_ray.score import output as scoring_output
scoring_output.publish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
"""
# … or after the journal (the first rename) and one part have been renamed into place.
KILL_WHILE_PUBLISHING = """
import types
from mnist_ray.score import output as scoring_output
renames = []
def replace(src, dst):
    if len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    renames.append(dst)
    os.replace(src, dst)
scoring_output.os = types.SimpleNamespace(**{**vars(os), "replace": replace})
"""


def score_and_die(fault: str, args: list[str], *, env: dict[str, str] | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """jobs/score.py's main in a fresh process that SIGKILLs itself at ``fault``."""
    code = f"import os, signal, sys\nsys.path.insert(0, {str(REPO)!r})\n{fault}\n" + (
        "from mnist_ray.cli import score_main\nsys.exit(score_main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def score(*args: str) -> tuple[int, str]:
    """Run the scoring job in this process (on the session's Ray); returns (exit code, stdout)."""
    from mnist_ray.cli import score_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = score_main(list(args))
    return code, out.getvalue()


# What Ray 2.60 prints that no setting of ours silences (docs/ray.md): its driver's core worker
# logs this error line for every Ray Data actor pool (ray-project/ray#53727).
UNSILENCEABLE_RAY_LINES = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object"),
)


def our_lines(text: str) -> list[str]:
    """The non-blank lines of a job's output but those Ray prints whatever we do."""
    return [line for line in text.splitlines()
            if line.strip() and not any(p.search(line) for p in UNSILENCEABLE_RAY_LINES)]
