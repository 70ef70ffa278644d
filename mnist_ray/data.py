"""Data sources → validated Ray Datasets, and the seeded stratified splits.

Every source becomes one Ray Dataset with the columns of the data contract
(:mod:`mnist_ray.schema`): ``image`` uint8 (28, 28), ``label`` int64, ``source``
and ``row``. Sources:

* ``bundled`` — the MNIST copy shipped in this package (the offline default);
* ``keras`` — ``keras.datasets.mnist`` (downloads; needs a network);
* a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``;
* Kaggle training CSVs: files, directories or globs, ``.csv`` / ``.csv.gz``,
  read and validated by Ray Data, one task per file, in parallel.

Splits: validation is carved (stratified, seeded) from the training pool; the
test set is the MNIST test set for arrays, a held-out stratified split for CSVs.
Only labels and row keys travel to the driver to compute the split; pixels stay
in Ray's object store.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray
from sklearn.model_selection import train_test_split

from mnist_ray.csv_format import read_training_csv, resolve_csv_paths
from mnist_ray.schema import (
    IMAGE,
    IMAGE_SHAPE,
    LABEL,
    NUM_CLASSES,
    ROW,
    SOURCE,
    DataValidationError,
)

BUNDLED_MNIST = Path(__file__).parent / "bundled" / "mnist.npz"
BUNDLED_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Rows per block when arrays become a Ray Dataset: ~8 MB of pixels per block.
ARRAY_BLOCK_ROWS = 10_000


@dataclass
class DataSplits:
    """The three datasets of a training run, with what a report needs to say about them."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    description: dict = field(default_factory=dict)


def load_splits(
    data: list[str],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    limit: int | None = None,
    seed: int = 0,
    test_data: list[str] | None = None,
) -> DataSplits:
    """Load ``data`` (see module doc) and split it into train / validation / test.

    ``test_data`` (labelled Kaggle CSVs) replaces the default test set: the MNIST
    test set for arrays, a held-out stratified ``test_fraction`` for CSVs.
    ``limit`` keeps a stratified subset of that many training-pool images (the
    validation split is carved from them) and at most that many test images.
    Raises ``DataValidationError`` for input that breaks the contract.
    """
    if len(data) == 1 and (data[0] in ("bundled", "keras") or data[0].endswith(".npz")):
        pool, test, fingerprint = _array_source(data[0])
        test_origin = "MNIST test set"
    elif test_data:
        pool, fingerprint = csv_dataset(data)
    else:
        full, fingerprint = csv_dataset(data)
        pool, test = _stratified_split(full, test_fraction, seed, "test")
        test_origin = f"held-out stratified {test_fraction:.0%} of the CSV rows"
    if test_data:
        test, test_fingerprint = csv_dataset(test_data)
        test_origin = f"{', '.join(test_data)} ({test_fingerprint})"
    if limit is not None:
        pool = _stratified_subset(pool, limit, seed)
        test = _stratified_subset(test, limit, seed)
    train, val = _stratified_split(pool, val_fraction, seed + 1, "validation")
    train, val, test = train.materialize(), val.materialize(), test.materialize()
    description = {
        "data": list(data),
        "test_data": list(test_data) if test_data else None,
        "fingerprint": fingerprint,
        "rows": {"train": train.count(), "val": val.count(), "test": test.count()},
        "test_set": test_origin,
        "val_fraction": val_fraction,
        "limit": limit,
        "seed": seed,
        "train_class_counts": class_counts(train),
    }
    return DataSplits(train=train, val=val, test=test, description=description)


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
    """Read Kaggle training CSVs with Ray Data, one task per file; returns (dataset, fingerprint).

    The dataset is materialized so that a validation error surfaces here, as a
    ``DataValidationError`` naming the file, row, column and value.
    """
    paths = resolve_csv_paths(specs)
    context = ray.data.DataContext.get_current()
    wrapped = context.raise_original_map_exception
    # Without this, Ray Data wraps a task's DataValidationError in its own error
    # type and the original is lost. A dataset copies the context when created.
    context.raise_original_map_exception = True
    # Ray Data logs a failed task's traceback at ERROR before raising; for a
    # validation error that is noise around the one line the user needs.
    ray_data_logger = logging.getLogger("ray.data")
    log_level = ray_data_logger.level
    ray_data_logger.setLevel(logging.CRITICAL)
    try:
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        ds = ds.map_batches(_read_csv_batch, batch_size=1, batch_format="numpy").materialize()
    except DataValidationError as exc:
        # Still a RayTaskError subclass whose text carries the remote traceback:
        # re-raise the plain error, whose text is the message for a person.
        error = getattr(exc, "cause", exc)
        raise DataValidationError(
            error.problem, source=error.source, row=error.row, column=error.column, value=error.value
        ) from None
    finally:
        context.raise_original_map_exception = wrapped
        ray_data_logger.setLevel(log_level)
    return ds, _fingerprint_files(paths)


def _read_csv_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = read_training_csv(str(batch["path"][0]))
    n = len(out["label"])
    return {
        IMAGE: out["image"],
        LABEL: out["label"],
        SOURCE: np.array([str(batch["path"][0])] * n, dtype=object),
        ROW: out["row"],
    }


def _array_source(name: str) -> tuple[ray.data.Dataset, ray.data.Dataset, str]:
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
            raise FileNotFoundError(f"{path}: no such file")
        arrays = load_npz(path)
        label = "bundled mnist.npz" if name == "bundled" else str(path)
        fingerprint = "sha256:" + _sha256(path)
    train = arrays_to_dataset(arrays["x_train"], arrays["y_train"], f"{label}:train")
    test = arrays_to_dataset(arrays["x_test"], arrays["y_test"], f"{label}:test")
    return train, test, fingerprint


def _keys_and_labels(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, row, label) of every row, in no particular order: small, fits the driver."""
    parts = list(ds.select_columns([SOURCE, ROW, LABEL]).iter_batches(batch_size=None))
    sources = np.concatenate([p[SOURCE] for p in parts]).astype(str)
    rows = np.concatenate([p[ROW] for p in parts])
    labels = np.concatenate([p[LABEL] for p in parts])
    # Sort by key so the split depends on the data and the seed, not on block order.
    order = np.lexsort((rows, sources))
    return sources[order], rows[order], labels[order]


def _stratified_split(
    ds: ray.data.Dataset, fraction: float, seed: int, what: str
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Split ``ds`` into (rest, held_out) with ``fraction`` of each class held out."""
    sources, rows, labels = _keys_and_labels(ds)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if len(labels) < 2 * NUM_CLASSES or counts[counts > 0].min() < 2:
        raise DataValidationError(
            f"too few images to carve a stratified {what} split: {len(labels)} images, "
            f"class counts {counts.tolist()} (need at least 2 of each class present)",
            source=", ".join(sorted(set(sources))[:3]),
        )
    held_n = max(int(round(fraction * len(labels))), int((counts > 0).sum()))
    keep_idx, held_idx = train_test_split(
        np.arange(len(labels)), test_size=held_n, stratify=labels, random_state=seed
    )
    held = np.zeros(len(labels), dtype=bool)
    held[held_idx] = True
    return _filter_by_keys(ds, sources, rows, ~held), _filter_by_keys(ds, sources, rows, held)


def _stratified_subset(ds: ray.data.Dataset, limit: int, seed: int) -> ray.data.Dataset:
    sources, rows, labels = _keys_and_labels(ds)
    if limit >= len(labels):
        return ds
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if limit < (counts > 0).sum():
        raise ValueError(f"--limit {limit} is smaller than the number of classes")
    keep_idx, _ = train_test_split(
        np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed
    )
    keep = np.zeros(len(labels), dtype=bool)
    keep[keep_idx] = True
    return _filter_by_keys(ds, sources, rows, keep)


def _filter_by_keys(
    ds: ray.data.Dataset, sources: np.ndarray, rows: np.ndarray, keep: np.ndarray
) -> ray.data.Dataset:
    """Keep the rows whose (source, row) key is marked in ``keep`` (vectorised lookup)."""
    wanted: dict[str, np.ndarray] = {}
    for name in np.unique(sources):
        mine = sources == name
        table = np.zeros(int(rows[mine].max()) + 1, dtype=bool)
        table[rows[mine][keep[mine]]] = True
        wanted[str(name)] = table
    wanted_ref = ray.put(wanted)

    def select(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lookup = ray.get(wanted_ref)
        mask = np.zeros(len(batch[ROW]), dtype=bool)
        batch_sources = batch[SOURCE].astype(str)
        for name in np.unique(batch_sources):
            mine = batch_sources == name
            mask[mine] = lookup[name][batch[ROW][mine]]
        return {k: v[mask] for k, v in batch.items()}

    return ds.map_batches(select, batch_format="numpy", batch_size=None)


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
