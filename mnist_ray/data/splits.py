"""The seeded, stratified splits of a training run: train / validation / test.

Validation is carved (stratified, seeded) from the training pool; the test set is the
MNIST test set for arrays, a held-out stratified split for CSVs, or the labelled CSVs of
``--test-data``. Only labels and row keys travel to the driver to compute a split;
pixels stay in Ray's object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray
from sklearn.model_selection import train_test_split

from mnist_ray.data.schema import LABEL, NUM_CLASSES, ROW, SOURCE, DataValidationError
from mnist_ray.data.sources import array_source, class_counts, csv_dataset


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
        pool, test, fingerprint = array_source(data[0])
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


