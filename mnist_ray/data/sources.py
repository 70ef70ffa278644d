"""Data sources → validated Ray Datasets with the columns of the data contract.

Every source becomes one Ray Dataset with the columns of :mod:`mnist_ray.data.schema`:
``image`` uint8 (28, 28), ``label`` int64, ``source`` and ``row``. Sources:

* ``bundled`` — the MNIST copy shipped in this package (the offline default);
* ``keras`` — ``keras.datasets.mnist`` (downloads; needs a network);
* a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``;
* Kaggle training CSVs: files, directories or globs, ``.csv`` / ``.csv.gz``,
  read and validated by Ray Data, one task per file, in parallel.

How they are split into training, validation and test sets: :mod:`mnist_ray.data.splits`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from mnist_ray.config import DataConfig
from mnist_ray.data.csv_files import resolve_csv_paths
from mnist_ray.data.csv_reader import training_rows
from mnist_ray.data.schema import (
    IMAGE,
    IMAGE_SHAPE,
    LABEL,
    NUM_CLASSES,
    ROW,
    SOURCE,
    DataValidationError,
    refusal,
)
from mnist_ray.errors import MissingInput

BUNDLED_MNIST = Path(__file__).parents[1] / "bundled" / "mnist.npz"
BUNDLED_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Rows per block when arrays become a Ray Dataset: ~8 MB of pixels per block.
ARRAY_BLOCK_ROWS = 10_000


def arrays_to_dataset(images: np.ndarray, labels: np.ndarray, source: str) -> ray.data.Dataset:
    """Wrap validated uint8 images (n, 28, 28) and int labels (n,) as a Ray Dataset."""
    tables = []
    for start in range(0, len(images), ARRAY_BLOCK_ROWS):
        stop = min(start + ARRAY_BLOCK_ROWS, len(images))
        tables.append(
            pa.table(
                {
                    IMAGE: ArrowTensorArray.from_numpy(np.ascontiguousarray(images[start:stop])),
                    LABEL: pa.array(labels[start:stop].astype(np.int64)),
                    SOURCE: pa.array([source] * (stop - start), pa.string()),
                    ROW: pa.array(np.arange(start + 1, stop + 1, dtype=np.int64)),
                }
            )
        )
    return ray.data.from_arrow(tables)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load and validate an MNIST-layout ``.npz``; returns its four arrays."""
    source = str(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataValidationError(
                    f"missing array(s) {', '.join(missing)}; expected {', '.join(NPZ_KEYS)}",
                    source=source,
                )
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataValidationError):
            raise
        raise DataValidationError(f"is not a readable .npz file ({exc})", source=source) from exc
    for split in ("train", "test"):
        validate_arrays(arrays[f"x_{split}"], arrays[f"y_{split}"], f"{source}:{split}")
    return arrays


def validate_arrays(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Check images are uint8 (n, 28, 28) and labels integers 0–9 of the same length."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataValidationError(
            f"images have shape {images.shape}, expected (n, 28, 28)", source=source
        )
    if images.dtype != np.uint8:
        raise DataValidationError(
            f"images have dtype {images.dtype}, expected uint8 pixels 0-255", source=source
        )
    if labels.shape != (len(images),):
        raise DataValidationError(
            f"labels have shape {labels.shape}, expected ({len(images)},)", source=source
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataValidationError(
            f"labels have dtype {labels.dtype}, expected integers 0-9", source=source
        )
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        index = int(np.argmax(bad))
        raise DataValidationError(
            "label outside 0..9", source=source, row=index + 1, column=LABEL, value=int(labels[index])
        )
    if len(images) == 0:
        raise DataValidationError("has no images", source=source)


def csv_dataset(specs: list[str]) -> tuple[ray.data.Dataset, str]:
    """Read Kaggle training CSVs, one Ray task per file; returns (dataset, fingerprint).

    Every file is read whole before anything trains: a ``DataValidationError`` names every
    problem of every file (file, row, column, value), the first in file order first
    (:func:`~mnist_ray.data.schema.refusal`). The rows stay in Ray's object store; only
    the problems come to the driver.
    """
    paths = resolve_csv_paths(specs)
    tables, problems = zip(*[_read_training_file.remote(path) for path in paths], strict=True)
    found = [problem for per_file in ray.get(list(problems)) for problem in per_file]
    if found:
        raise refusal(found)
    dataset = ray.data.from_arrow_refs(list(tables))
    if not dataset.count():
        raise DataValidationError("no data rows: every file has a header and nothing else",
                                  source=", ".join(paths))
    return dataset, _fingerprint_files(paths)


# One file's rows go to the object store and its problems to the driver, which reports them all.
@ray.remote(num_returns=2)
def _read_training_file(path: str) -> tuple[pa.Table, list[DataValidationError]]:
    rows, problems = training_rows(path)
    if problems:
        return pa.table({}), problems
    n = len(rows[LABEL])
    table = pa.table({
        IMAGE: ArrowTensorArray.from_numpy(np.ascontiguousarray(rows[IMAGE])),
        LABEL: pa.array(rows[LABEL], pa.int64()),
        SOURCE: pa.array([path] * n, pa.string()),
        ROW: pa.array(rows[ROW], pa.int64()),
    })
    return table, []


def check_sources(data: DataConfig) -> None:
    """What can be checked of ``--data`` and ``--test-data`` before Ray starts: each named file,
    directory or glob exists and matches a CSV, an .npz file exists (else ``MissingInput``)."""
    for specs in (data.data, data.test_data or []):
        if len(specs) == 1 and specs[0] in ("bundled", "keras"):
            continue
        if len(specs) == 1 and specs[0].endswith(".npz"):
            if not Path(specs[0]).is_file():
                raise MissingInput(f"{specs[0]}: no such file")
            continue
        if specs:
            resolve_csv_paths(specs)


def array_source(name: str) -> tuple[ray.data.Dataset, ray.data.Dataset, str]:
    """(training pool, test set, fingerprint) of an array source: bundled, keras or an .npz path."""
    if name == "keras":
        from tf_keras.datasets import mnist

        (x_train, y_train), (x_test, y_test) = mnist.load_data()
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        for split in ("train", "test"):
            validate_arrays(arrays[f"x_{split}"], arrays[f"y_{split}"], f"keras.mnist:{split}")
        label, fingerprint = "keras.mnist", _fingerprint_arrays(arrays)
    else:
        path = BUNDLED_MNIST if name == "bundled" else Path(name)
        if not path.is_file():
            raise MissingInput(f"{path}: no such file")
        arrays = load_npz(path)
        label = "bundled mnist.npz" if name == "bundled" else str(path)
        fingerprint = "sha256:" + _sha256(path)
    train = arrays_to_dataset(arrays["x_train"], arrays["y_train"], f"{label}:train")
    test = arrays_to_dataset(arrays["x_test"], arrays["y_test"], f"{label}:test")
    return train, test, fingerprint


def class_counts(ds: ray.data.Dataset) -> list[int]:
    """Number of images of each class 0–9."""
    labels = np.concatenate(
        [b[LABEL] for b in ds.select_columns([LABEL]).iter_batches(batch_size=None)]
    )
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def dataset_to_arrays(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Pull a (small) dataset into (images uint8 (n, 28, 28), labels int64 (n,))."""
    columns = dataset_columns(ds, [IMAGE, LABEL])
    return columns[IMAGE], columns[LABEL]


def dataset_columns(ds: ray.data.Dataset, names: list[str]) -> dict[str, np.ndarray]:
    """Pull some columns of a (small) dataset to the driver in one pass.

    ``image`` comes as uint8 (n, 28, 28), ``label`` and ``row`` as int64 (n,),
    ``source`` as str objects (n,).
    """
    empty = {IMAGE: np.empty((0, *IMAGE_SHAPE), np.uint8), LABEL: np.empty((0,), np.int64),
             ROW: np.empty((0,), np.int64), SOURCE: np.empty((0,), object)}
    parts = list(ds.select_columns(names).iter_batches(batch_size=None))
    if not parts:
        return {name: empty[name] for name in names}
    return {
        name: np.concatenate([p[name] for p in parts]).astype(empty[name].dtype, copy=False)
        for name in names
    }


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint_files(paths: list[str]) -> str:
    """sha256 over (name, size, content) of local files; (name, size) for URIs."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        if "://" in path:
            continue
        digest.update(str(os.path.getsize(path)).encode())
        digest.update(_sha256(path).encode())
    return "sha256:" + digest.hexdigest()


def _fingerprint_arrays(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in NPZ_KEYS:
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return "sha256:" + digest.hexdigest()
