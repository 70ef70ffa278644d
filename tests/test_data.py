"""Data sources and the seeded stratified splits (mnist_ray.data), on a real local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_ray.data import sources as data_module
from mnist_ray.data.schema import DataValidationError
from mnist_ray.data.sources import arrays_to_dataset, class_counts, dataset_to_arrays, load_npz
from mnist_ray.data.splits import load_splits
from tests.helpers import set_csv_cell, write_kaggle_csv


def split_frame(ds) -> dict[str, np.ndarray]:
    """All columns of a (small) dataset, rows in (source, row) order."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {key: np.concatenate([p[key] for p in parts]) for key in ("image", "label", "source", "row")}
    out["source"] = out["source"].astype(str)
    order = np.lexsort((out["row"], out["source"]))
    return {key: value[order] for key, value in out.items()}


def keys_of(frame: dict[str, np.ndarray]) -> set[tuple[str, int]]:
    keys = list(zip(frame["source"].tolist(), frame["row"].tolist(), strict=True))
    assert len(keys) == len(set(keys)), "a (source, row) key appears twice in one split"
    return set(keys)


def assert_stratified(labels: np.ndarray, reference: np.ndarray, size: int, tolerance: float) -> None:
    """Each class count of ``labels`` is within ``tolerance`` of its share of ``reference``."""
    counts = np.bincount(labels, minlength=10)
    expected = size * np.bincount(reference, minlength=10) / len(reference)
    assert (counts > 0).all(), counts
    assert np.abs(counts - expected).max() <= tolerance, (counts.tolist(), expected.round(1).tolist())


# --- load_npz (no Ray) --------------------------------------------------------------------------


@pytest.fixture
def small_arrays(mnist_arrays) -> dict[str, np.ndarray]:
    return {
        "x_train": mnist_arrays["x_train"][:50].copy(),
        "y_train": mnist_arrays["y_train"][:50].copy(),
        "x_test": mnist_arrays["x_test"][:20].copy(),
        "y_test": mnist_arrays["y_test"][:20].copy(),
    }


def test_load_npz_good(tmp_path, small_arrays):
    path = tmp_path / "digits.npz"
    np.savez_compressed(path, **small_arrays)
    loaded = load_npz(path)
    assert set(loaded) == set(small_arrays)
    for key, array in small_arrays.items():
        np.testing.assert_array_equal(loaded[key], array)
        assert loaded[key].dtype == array.dtype


def load_npz_error(path) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        load_npz(path)
    assert str(path) in str(info.value)
    return info.value


def test_load_npz_missing_key(tmp_path, small_arrays):
    del small_arrays["y_test"]
    path = tmp_path / "digits.npz"
    np.savez(path, **small_arrays)
    message = str(load_npz_error(path))
    assert "missing" in message and "y_test" in message


def test_load_npz_float_images(tmp_path, small_arrays):
    small_arrays["x_train"] = small_arrays["x_train"].astype(np.float32) / 255
    path = tmp_path / "digits.npz"
    np.savez(path, **small_arrays)
    err = load_npz_error(path)
    assert err.source == f"{path}:train"
    assert "float32" in str(err) and "uint8" in str(err)


@pytest.mark.parametrize("shape", [(20, 784), (20, 28, 27), (20, 28, 28, 1)])
def test_load_npz_wrong_image_shape(tmp_path, small_arrays, shape):
    small_arrays["x_test"] = np.zeros(shape, np.uint8)
    path = tmp_path / "digits.npz"
    np.savez(path, **small_arrays)
    err = load_npz_error(path)
    assert err.source == f"{path}:test"
    assert str(shape) in str(err)


def test_load_npz_label_count_mismatch(tmp_path, small_arrays):
    small_arrays["y_train"] = small_arrays["y_train"][:49]
    path = tmp_path / "digits.npz"
    np.savez(path, **small_arrays)
    assert "(49,)" in str(load_npz_error(path))


@pytest.mark.parametrize(("split", "value"), [("train", 10), ("test", -1)])
def test_load_npz_label_out_of_range(tmp_path, small_arrays, split, value):
    labels = small_arrays[f"y_{split}"].astype(np.int64)
    labels[4] = value
    small_arrays[f"y_{split}"] = labels
    path = tmp_path / "digits.npz"
    np.savez(path, **small_arrays)
    err = load_npz_error(path)
    assert (err.source, err.row, err.column, err.value) == (f"{path}:{split}", 5, "label", value)
    assert "data row 5" in str(err)
    assert f"(found {value})" in str(err)


def test_load_npz_not_an_npz(tmp_path):
    path = tmp_path / "digits.npz"
    path.write_text("label,pixel0\n1,0\n")
    assert "not a readable .npz" in str(load_npz_error(path))


# --- load_splits on the bundled MNIST -----------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_seed0(ray_session):
    splits = load_splits(["bundled"], limit=1000, seed=0)
    return splits, {name: split_frame(getattr(splits, name)) for name in ("train", "val", "test")}


def test_bundled_split_sizes(bundled_seed0):
    splits, frames = bundled_seed0
    n_train, n_val, n_test = (len(frames[name]["label"]) for name in ("train", "val", "test"))
    assert n_train + n_val == 1000
    assert abs(n_val - 100) <= 1
    assert n_test == 1000
    assert splits.description["rows"] == {"train": n_train, "val": n_val, "test": n_test}
    assert splits.description["train_class_counts"] == np.bincount(frames["train"]["label"]).tolist()
    assert splits.description["fingerprint"] == "sha256:" + data_module.BUNDLED_SHA256


def test_bundled_splits_are_stratified(bundled_seed0, mnist_arrays):
    _, frames = bundled_seed0
    y_train, y_test = mnist_arrays["y_train"], mnist_arrays["y_test"]
    assert_stratified(frames["train"]["label"], y_train, len(frames["train"]["label"]), 2)
    assert_stratified(frames["val"]["label"], y_train, len(frames["val"]["label"]), 1.5)
    assert_stratified(frames["test"]["label"], y_test, 1000, 1)


def test_bundled_splits_are_disjoint_and_from_the_right_arrays(bundled_seed0, mnist_arrays):
    _, frames = bundled_seed0
    train, val, test = (keys_of(frames[name]) for name in ("train", "val", "test"))
    assert not train & val
    assert {s for s, _ in train | val} == {"bundled mnist.npz:train"}
    assert {s for s, _ in test} == {"bundled mnist.npz:test"}
    for name, split in (("train", "train"), ("val", "train"), ("test", "test")):
        frame = frames[name]
        index = frame["row"] - 1
        np.testing.assert_array_equal(frame["image"], mnist_arrays[f"x_{split}"][index])
        np.testing.assert_array_equal(frame["label"], mnist_arrays[f"y_{split}"][index])


def test_bundled_splits_depend_only_on_the_seed(bundled_seed0, ray_session):
    _, frames = bundled_seed0
    again = load_splits(["bundled"], limit=1000, seed=0)
    for name in ("train", "val", "test"):
        assert keys_of(split_frame(getattr(again, name))) == keys_of(frames[name])
    other = load_splits(["bundled"], limit=1000, seed=1)
    other_val = keys_of(split_frame(other.val))
    assert other_val != keys_of(frames["val"])
    assert len(other_val) == len(frames["val"]["label"])


# --- load_splits on Kaggle CSV files ------------------------------------------------------------

CSV_ROWS = 600


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory, mnist_arrays):
    """600 real images in three CSV files of different shapes; returns (dir, {path: (images, labels)})."""
    root = tmp_path_factory.mktemp("kaggle")
    (root / "more").mkdir()
    images, labels = mnist_arrays["x_train"][:CSV_ROWS], mnist_arrays["y_train"][:CSV_ROWS]
    files = {
        root / "part1.csv": ({}, slice(0, 250)),
        root / "part2.csv.gz": ({"gz": True}, slice(250, 400)),
        root / "more" / "part3.csv": ({"shuffle_columns": True, "id_column": "ImageId"}, slice(400, 600)),
    }
    written = {}
    for path, (options, rows) in files.items():
        write_kaggle_csv(path, images[rows], labels[rows], **options)
        written[str(path)] = (images[rows], labels[rows])
    (root / "README.txt").write_text("not data\n")
    return root, written


@pytest.fixture(scope="module")
def csv_splits(csv_source, ray_session):
    root, _ = csv_source
    splits = load_splits([str(root)], seed=0)
    return splits, {name: split_frame(getattr(splits, name)) for name in ("train", "val", "test")}


def test_csv_splits_cover_every_row_exactly_once(csv_source, csv_splits):
    _, written = csv_source
    splits, frames = csv_splits
    keys = {name: keys_of(frames[name]) for name in frames}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    everything = {(path, row) for path, (_, labels) in written.items() for row in range(1, len(labels) + 1)}
    assert keys["train"] | keys["val"] | keys["test"] == everything
    assert sum(splits.description["rows"].values()) == CSV_ROWS
    assert abs(len(keys["test"]) - 60) <= 1
    assert abs(len(keys["val"]) - 54) <= 1


def test_csv_splits_carry_the_written_pixels(csv_source, csv_splits):
    _, written = csv_source
    _, frames = csv_splits
    for frame in frames.values():
        for source, row, image, label in zip(
            frame["source"], frame["row"], frame["image"], frame["label"], strict=True
        ):
            images, labels = written[source]
            np.testing.assert_array_equal(image, images[row - 1])
            assert label == labels[row - 1]


def test_csv_splits_are_stratified(csv_source, csv_splits):
    _, written = csv_source
    _, frames = csv_splits
    all_labels = np.concatenate([labels for _, labels in written.values()])
    assert_stratified(frames["test"]["label"], all_labels, len(frames["test"]["label"]), 1)
    assert_stratified(frames["val"]["label"], all_labels, len(frames["val"]["label"]), 1.5)
    assert_stratified(frames["train"]["label"], all_labels, len(frames["train"]["label"]), 2)


@pytest.fixture
def csv_dir_with_bad_value(tmp_path, mnist_arrays) -> tuple[str, str]:
    """Three small CSV files; part1.csv has 'abc' at data row 7, column pixel17."""
    images, labels = mnist_arrays["x_train"][:90], mnist_arrays["y_train"][:90]
    for k in range(3):
        rows = slice(30 * k, 30 * (k + 1))
        write_kaggle_csv(tmp_path / f"part{k}.csv", images[rows], labels[rows])
    bad = tmp_path / "part1.csv"
    set_csv_cell(bad, 7, "pixel17", "abc")
    return str(tmp_path), str(bad)


def test_csv_bad_value_stops_load_splits_naming_the_place(csv_dir_with_bad_value, ray_session):
    root, bad = csv_dir_with_bad_value
    with pytest.raises(Exception) as info:  # noqa: B017 -- the next test wants the exact type
        load_splits([root], seed=0)
    assert f"{bad}, data row 7, column 'pixel17': not an integer (found 'abc')" in str(info.value)


def test_csv_bad_value_surfaces_from_ray_as_a_clean_error(csv_dir_with_bad_value, ray_session):
    root, bad = csv_dir_with_bad_value
    with pytest.raises(DataValidationError) as info:
        load_splits([root], seed=0)
    err = info.value
    assert type(err) is DataValidationError
    assert (err.source, err.row, err.column, err.value) == (bad, 7, "pixel17", "abc")
    assert str(err) == f"{bad}, data row 7, column 'pixel17': not an integer (found 'abc')"


def test_every_bad_row_of_every_file_is_named_at_once_in_file_order(csv_dir_with_bad_value, ray_session):
    root, bad = csv_dir_with_bad_value
    first, last = str(Path(root) / "part0.csv"), str(Path(root) / "part2.csv")
    set_csv_cell(last, 3, "label", "12")
    set_csv_cell(first, 29, "pixel0", "-1")
    set_csv_cell(first, 4, "pixel5", "7.0")
    with pytest.raises(DataValidationError) as info:
        load_splits([root], seed=0)
    assert str(info.value).splitlines() == [
        "4 problems in the input (the first in file order first):",
        f"  {first}, data row 4, column 'pixel5': not an integer (found '7.0')",
        f"  {first}, data row 29, column 'pixel0': outside 0..255 (found -1)",
        f"  {bad}, data row 7, column 'pixel17': not an integer (found 'abc')",
        f"  {last}, data row 3, column 'label': outside 0..9 (found 12)",
    ]


# --- class_counts, arrays_to_dataset, dataset_to_arrays -----------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    # Several blocks from a few rows, so block boundaries are exercised.
    monkeypatch.setattr(data_module, "ARRAY_BLOCK_ROWS", 16)


def test_class_counts(ray_session, mnist_arrays, small_blocks):
    labels = mnist_arrays["y_train"][:60].copy()
    labels[labels >= 7] = 0  # classes 7, 8, 9 absent: their counts must still be there, as 0
    ds = arrays_to_dataset(mnist_arrays["x_train"][:60], labels, "t")
    assert ds.num_blocks() == 4
    counts = class_counts(ds)
    assert counts == np.bincount(labels, minlength=10).tolist()
    assert len(counts) == 10 and counts[7:] == [0, 0, 0]
    assert all(type(c) is int for c in counts)


def test_arrays_to_dataset_and_back(ray_session, mnist_arrays, small_blocks):
    images, labels = mnist_arrays["x_test"][:50], mnist_arrays["y_test"][:50]
    ds = arrays_to_dataset(images, labels, "mine")
    frame = split_frame(ds)
    np.testing.assert_array_equal(frame["row"], np.arange(1, 51))
    assert set(frame["source"].tolist()) == {"mine"}
    np.testing.assert_array_equal(frame["image"], images)
    np.testing.assert_array_equal(frame["label"], labels)

    out_images, out_labels = dataset_to_arrays(ds)
    assert out_images.dtype == np.uint8 and out_images.shape == (50, 28, 28)
    assert out_labels.dtype == np.int64 and out_labels.shape == (50,)
    # Order is not promised: compare the (image, label) pairs as multisets.
    got = sorted((img.tobytes(), int(lab)) for img, lab in zip(out_images, out_labels, strict=True))
    want = sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels, strict=True))
    assert got == want


def test_dataset_to_arrays_of_empty_dataset(ray_session, mnist_arrays):
    ds = arrays_to_dataset(mnist_arrays["x_test"][:5], mnist_arrays["y_test"][:5], "t").limit(0)
    images, labels = dataset_to_arrays(ds)
    assert images.shape == (0, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (0,) and labels.dtype == np.int64
