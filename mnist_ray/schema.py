"""The digit-table contract: columns, dtypes, ranges, and the errors that name bad values.

Every source becomes rows of ``image`` (uint8, 28×28) and, when known, ``label``
(int64, 0–9), plus provenance: ``source`` (file or array name) and ``row``
(1-based data row within that source, the Kaggle ``ImageId`` numbering).
"""

from __future__ import annotations

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

# Columns of the Ray Dataset every source becomes.
IMAGE = "image"
LABEL = "label"
SOURCE = "source"
ROW = "row"


class DataValidationError(ValueError):
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


def _rebuild_error(problem, source, row, column, value) -> DataValidationError:
    return DataValidationError(problem, source=source, row=row, column=column, value=value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
