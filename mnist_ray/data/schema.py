"""The digit-table contract: columns, dtypes, ranges, and the errors that name bad values.

Every source becomes rows of ``image`` (uint8, 28×28) and, when known, ``label``
(int64, 0–9), plus provenance: ``source`` (file or array name) and ``row``
(1-based data row within that source, the Kaggle ``ImageId`` numbering). Files to
score may also carry an ``image_id``. These names are the columns of the training
datasets, of what the CSV reader returns and of scoring's record stream.
"""

from __future__ import annotations

from mnist_ray.errors import InputError

IMAGE_SIDE = 28
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10
CLASS_NAMES = [str(d) for d in range(NUM_CLASSES)]
PIXEL_MIN, PIXEL_MAX = 0, 255

# Kaggle "Digit Recognizer" CSV: pixelK is the pixel at row K // 28, column K % 28.
PIXEL_COLUMNS = [f"pixel{k}" for k in range(NUM_PIXELS)]
LABEL_COLUMN = "label"
ID_COLUMNS = ("ImageId", "id")

# Columns of the Ray Dataset every source becomes, and of the rows the CSV reader returns.
IMAGE = "image"
LABEL = "label"
SOURCE = "source"
ROW = "row"
IMAGE_ID = "image_id"  # a file's ImageId / id column, when scoring reads it


class DataValidationError(InputError, ValueError):
    """Input that breaks the contract, with where it is and what was found.

    ``str(error)`` is a complete message for a person: file, data row, column,
    value and what was expected.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str,
        row: int | None = None,
        column: str | None = None,
        value: object = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.row = row
        self.column = column
        self.value = value
        where = [source]
        if row is not None:
            where.append(f"data row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        message = ", ".join(where) + f": {problem}"
        if value is not None:
            message += f" (found {_show(value)})"
        super().__init__(message)

    def __reduce__(self):
        # Raised inside Ray tasks: must survive pickling with its fields.
        return (_rebuild_error, (self.problem, self.source, self.row, self.column, self.value))


# A refusal names at most this many problems, in file order, then counts the rest.
PROBLEMS_SHOWN = 20


def refusal(problems: list[DataValidationError]) -> DataValidationError:
    """One error for every problem found in the input, ``problems`` in file order (at least one).

    One problem is itself; several read as a count and the first PROBLEMS_SHOWN, one per
    line, then how many more: every problem of the input at once, not one per run.
    """
    if len(problems) == 1:
        return problems[0]
    first = problems[0]
    error = DataValidationError(first.problem, source=first.source, row=first.row, column=first.column,
                                value=first.value)
    shown = "\n  ".join(str(p) for p in problems[:PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - PROBLEMS_SHOWN:,} more" if len(problems) > PROBLEMS_SHOWN else ""
    error.args = (f"{len(problems):,} problems in the input (the first in file order first):"
                  f"\n  {shown}{more}",)
    return error


def _rebuild_error(problem, source, row, column, value) -> DataValidationError:
    return DataValidationError(problem, source=source, row=row, column=column, value=value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
