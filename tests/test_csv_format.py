"""Reading and validating Kaggle training CSVs (pure pyarrow, no Ray)."""

from __future__ import annotations

import gzip
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import cloudpickle

from mnist_ray.data.csv_files import resolve_csv_paths
from mnist_ray.data.csv_reader import read_training_csv
from mnist_ray.data.schema import DataValidationError
from mnist_ray.data.sources import BUNDLED_MNIST
from tests.helpers import append_column, drop_csv_column, rewrite_csv, set_csv_cell, write_kaggle_csv

N_ROWS = 30


@pytest.fixture(scope="module")
def sample(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    """30 real training images (all ten digits among them) and their labels."""
    images, labels = mnist_arrays["x_train"][:N_ROWS], mnist_arrays["y_train"][:N_ROWS]
    assert set(labels.tolist()) == set(range(10))
    return images, labels


@pytest.fixture
def good_csv(tmp_path, sample) -> Path:
    return write_kaggle_csv(tmp_path / "train.csv", *sample)


def read_error(path: Path) -> DataValidationError:
    """Read ``path`` expecting a DataValidationError whose message names the file."""
    with pytest.raises(DataValidationError) as info:
        read_training_csv(str(path))
    err = info.value
    assert str(path) in str(err)
    assert err.source == str(path)
    return err


# --- the helper writes what Kaggle writes -------------------------------------------------------


def test_write_kaggle_csv_layout(tmp_path, sample):
    images, labels = sample
    path = write_kaggle_csv(tmp_path / "t.csv", images, labels, id_column="ImageId")
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["ImageId", "label"] + [f"pixel{k}" for k in range(784)]
    assert frame["ImageId"].tolist() == list(range(1, N_ROWS + 1))
    assert frame["label"].tolist() == labels.tolist()
    # pixelK is image row K // 28, column K % 28: check an off-diagonal pixel by hand.
    r, c = np.argwhere(images[0] > 0)[0]
    assert r != c
    assert frame.loc[0, f"pixel{28 * r + c}"] == images[0, r, c] > 0
    pixels = frame[[f"pixel{k}" for k in range(784)]].to_numpy()
    np.testing.assert_array_equal(pixels.reshape(-1, 28, 28), images)


def test_write_kaggle_csv_options(tmp_path, sample):
    images, labels = sample
    path = write_kaggle_csv(tmp_path / "t.csv.gz", images, None, gz=True, shuffle_columns=True)
    with gzip.open(path, "rt") as f:
        frame = pd.read_csv(f)
    assert "label" not in frame.columns
    assert list(frame.columns) != [f"pixel{k}" for k in range(784)]
    assert sorted(frame.columns) == sorted(f"pixel{k}" for k in range(784))
    np.testing.assert_array_equal(
        frame[[f"pixel{k}" for k in range(784)]].to_numpy().reshape(-1, 28, 28), images
    )


# --- valid files --------------------------------------------------------------------------------


def _crlf(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))


def _bom(path: Path) -> None:
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


@pytest.mark.parametrize(
    ("name", "options", "post"),
    [
        ("plain.csv", {}, None),
        ("compressed.csv.gz", {"gz": True}, None),
        ("shuffled.csv", {"shuffle_columns": True}, None),
        ("imageid.csv", {"id_column": "ImageId"}, None),
        ("id-shuffled.csv", {"id_column": "id", "shuffle_columns": True}, None),
        ("crlf.csv", {}, _crlf),
        ("bom.csv", {}, _bom),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_valid_file_round_trips(tmp_path, sample, name, options, post):
    images, labels = sample
    path = write_kaggle_csv(tmp_path / name, images, labels, **options)
    if post is not None:
        post(path)
    out = read_training_csv(str(path))
    assert set(out) == {"image", "label", "row"}
    assert out["image"].dtype == np.uint8 and out["image"].shape == (N_ROWS, 28, 28)
    np.testing.assert_array_equal(out["image"], images)
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_array_equal(out["row"], np.arange(1, N_ROWS + 1))


def test_crlf_file_really_has_crlf(tmp_path, sample):
    # Guards the CRLF case above against a no-op transformation.
    path = write_kaggle_csv(tmp_path / "crlf.csv", *sample)
    _crlf(path)
    data = path.read_bytes()
    assert data.count(b"\r\n") == N_ROWS + 1 and data.count(b"\n") == N_ROWS + 1


def test_extreme_pixel_values_are_kept(tmp_path, sample):
    images = sample[0].copy()
    images[1, 0, 0], images[1, 27, 27] = 255, 0
    images[2, 13, 5] = 1
    path = write_kaggle_csv(tmp_path / "t.csv", images, sample[1])
    np.testing.assert_array_equal(read_training_csv(str(path))["image"], images)


def test_row_numbers_across_parser_blocks(tmp_path, mnist_arrays):
    # ~3.5 MB: pyarrow parses it in several blocks; rows must still be numbered from 1.
    n = 2000
    images, labels = mnist_arrays["x_train"][:n], mnist_arrays["y_train"][:n]
    path = write_kaggle_csv(tmp_path / "big.csv", images, labels)
    assert path.stat().st_size > 2 * (1 << 20)
    out = read_training_csv(str(path))
    np.testing.assert_array_equal(out["image"], images)
    np.testing.assert_array_equal(out["row"], np.arange(1, n + 1))
    set_csv_cell(path, 1717, "pixel300", "x")
    err = read_error(path)
    assert (err.row, err.column, err.value) == (1717, "pixel300", "x")
    assert "data row 1717" in str(err)


# --- one test per kind of bad value in a cell ---------------------------------------------------


@pytest.mark.parametrize(
    ("column", "text", "problem", "value"),
    [
        pytest.param("pixel17", "abc", "not an integer", "abc", id="non-integer"),
        pytest.param("pixel17", "7.5", "not an integer", "7.5", id="float-7.5"),
        pytest.param("pixel17", "7.0", "not an integer", "7.0", id="float-7.0"),
        pytest.param("pixel17", "", "empty value", "", id="empty-pixel"),
        pytest.param("pixel17", "256", "outside 0..255", 256, id="pixel-256"),
        pytest.param("pixel17", "-1", "outside 0..255", -1, id="pixel-minus-1"),
        pytest.param("label", "10", "outside 0..9", 10, id="label-10"),
        pytest.param("label", "-1", "outside 0..9", -1, id="label-minus-1"),
        pytest.param("label", "", "empty value", "", id="empty-label"),
        pytest.param("label", "3.0", "not an integer", "3.0", id="label-float"),
    ],
)
def test_bad_cell_is_named(good_csv, column, text, problem, value):
    set_csv_cell(good_csv, 3, column, text)
    err = read_error(good_csv)
    message = str(err)
    assert "data row 3" in message
    assert f"column {column!r}" in message
    assert problem in message
    assert f"(found {value!r})" in message
    assert (err.row, err.column, err.value) == (3, column, value)
    assert type(err.value) is type(value)


def test_every_bad_row_is_reported_at_once_in_file_order(good_csv):
    set_csv_cell(good_csv, 9, "pixel700", "300")
    set_csv_cell(good_csv, 5, "pixel700", "400")
    set_csv_cell(good_csv, 7, "pixel3", "x")
    err = read_error(good_csv)
    assert (err.row, err.column, err.value) == (5, "pixel700", 400)  # the first in the file
    assert str(err).splitlines() == [
        "3 problems in the input (the first in file order first):",
        f"  {good_csv}, data row 5, column 'pixel700': outside 0..255 (found 400)",
        f"  {good_csv}, data row 7, column 'pixel3': not an integer (found 'x')",
        f"  {good_csv}, data row 9, column 'pixel700': outside 0..255 (found 300)",
    ]
    set_csv_cell(good_csv, 7, "pixel3", "0")
    set_csv_cell(good_csv, 9, "pixel700", "0")
    err = read_error(good_csv)  # one problem: its own line, as ever
    assert str(err) == f"{good_csv}, data row 5, column 'pixel700': outside 0..255 (found 400)"


def test_many_bad_rows_show_the_first_twenty_and_a_count(tmp_path, sample):
    images = np.repeat(sample[0][:1], 30, axis=0)
    path = write_kaggle_csv(tmp_path / "many.csv", images, np.zeros(30, np.int64))
    for row in range(1, 26):
        set_csv_cell(path, row, "pixel0", "-1")
    lines = str(read_error(path)).splitlines()
    assert lines[0] == "25 problems in the input (the first in file order first):"
    assert [line.split(", ")[1] for line in lines[1:21]] == [f"data row {row}" for row in range(1, 21)]
    assert lines[21:] == ["  ... and 5 more"]


def test_integer_too_large_for_int64_is_named(good_csv):
    set_csv_cell(good_csv, 3, "pixel17", "99999999999999999999999")
    err = read_error(good_csv)
    assert (err.row, err.column) == (3, "pixel17")


# --- one test per kind of bad structure ---------------------------------------------------------


def test_missing_pixel_column(good_csv):
    drop_csv_column(good_csv, "pixel17")
    message = str(read_error(good_csv))
    assert "missing column" in message
    assert re.search(r"\bpixel17\b", message)


def test_missing_label_column(good_csv):
    drop_csv_column(good_csv, "label")
    message = str(read_error(good_csv))
    assert "missing column" in message
    assert re.search(r"\blabel\b", message)


def test_extra_unknown_column(good_csv):
    rewrite_csv(good_csv, append_column("colour", "1"))
    message = str(read_error(good_csv))
    assert "unexpected column" in message
    assert "'colour'" in message


def test_duplicated_header_column(good_csv):
    rewrite_csv(good_csv, append_column("pixel17", "0"))
    err = read_error(good_csv)
    assert "duplicated column" in str(err)
    assert "'pixel17'" in str(err)
    assert err.column == "pixel17"


def _truncate_row_3(rows: list[list[str]]) -> None:
    del rows[3][700:]


def _lengthen_row_3(rows: list[list[str]]) -> None:
    rows[3].append("0")


def test_row_with_too_few_values(good_csv):
    rewrite_csv(good_csv, _truncate_row_3)
    message = str(read_error(good_csv))
    assert "700 values, expected 785" in message


def test_row_with_too_many_values(good_csv):
    rewrite_csv(good_csv, _lengthen_row_3)
    message = str(read_error(good_csv))
    assert "786 values, expected 785" in message


@pytest.mark.parametrize("edit", [_truncate_row_3, _lengthen_row_3], ids=["too-few", "too-many"])
def test_row_with_wrong_value_count_names_the_row(good_csv, edit):
    rewrite_csv(good_csv, edit)
    err = read_error(good_csv)
    assert err.row == 3
    assert "data row 3" in str(err)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert "empty" in str(read_error(path))


def test_header_only_file_is_valid_and_empty(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "header.csv", sample[0][:0], sample[1][:0])
    assert path.read_text().count("\n") == 1 and path.read_text().startswith("label,pixel0,")
    rows = read_training_csv(str(path))
    assert (rows["image"].shape, rows["label"].shape, rows["row"].shape) == ((0, 28, 28), (0,), (0,))


def test_binary_file(tmp_path):
    path = tmp_path / "digits.csv"
    with open(BUNDLED_MNIST, "rb") as f:
        path.write_bytes(f.read(4096))
    assert "not a text CSV" in str(read_error(path))


# --- resolve_csv_paths --------------------------------------------------------------------------


@pytest.fixture
def csv_tree(tmp_path) -> Path:
    """data/{a.csv, notes.txt, old.csv.bak, sub/b.csv.gz, sub/deeper/c.csv, sub/model.npz}."""
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    for name in ["a.csv", "notes.txt", "old.csv.bak", "sub/b.csv.gz", "sub/deeper/c.csv", "sub/model.npz"]:
        (root / name).write_text("label\n")
    return root


def test_resolve_single_file_relative_becomes_absolute(csv_tree, monkeypatch):
    monkeypatch.chdir(csv_tree)
    assert resolve_csv_paths(["a.csv"]) == [str(csv_tree / "a.csv")]
    assert resolve_csv_paths([os.path.join("sub", "b.csv.gz")]) == [str(csv_tree / "sub" / "b.csv.gz")]


def test_resolve_directory_is_recursive_and_picks_only_csv(csv_tree):
    assert resolve_csv_paths([str(csv_tree)]) == [
        str(csv_tree / "a.csv"),
        str(csv_tree / "sub" / "b.csv.gz"),
        str(csv_tree / "sub" / "deeper" / "c.csv"),
    ]


def test_resolve_glob(csv_tree, monkeypatch):
    assert resolve_csv_paths([str(csv_tree / "*.csv")]) == [str(csv_tree / "a.csv")]
    assert resolve_csv_paths([str(csv_tree / "**" / "*.csv")]) == [
        str(csv_tree / "a.csv"),
        str(csv_tree / "sub" / "deeper" / "c.csv"),
    ]
    monkeypatch.chdir(csv_tree)
    assert resolve_csv_paths(["sub/*.csv.gz"]) == [str(csv_tree / "sub" / "b.csv.gz")]


def test_resolve_sorted_absolute_and_deduplicated(csv_tree, monkeypatch):
    monkeypatch.chdir(csv_tree)
    result = resolve_csv_paths(["sub/deeper/c.csv", str(csv_tree), "a.csv", str(csv_tree / "a.csv"), "*.csv"])
    assert result == sorted(result)
    assert len(result) == len(set(result)) == 3
    assert all(os.path.isabs(p) for p in result)


def test_resolve_nonexistent_path(tmp_path):
    missing = str(tmp_path / "nope" / "train.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        resolve_csv_paths([missing])


def test_resolve_glob_matching_nothing(csv_tree):
    spec = str(csv_tree / "*.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(spec)):
        resolve_csv_paths([spec])


def test_resolve_directory_without_csv(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    (empty / "readme.txt").write_text("no data\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        resolve_csv_paths([str(empty)])


def test_resolve_fails_on_any_bad_spec(csv_tree, tmp_path):
    missing = str(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        resolve_csv_paths([str(csv_tree), missing])


# --- DataValidationError crosses process boundaries ---------------------------------------------


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"source": "/data/train.csv", "row": 3, "column": "pixel17", "value": "7.0"},
        {"source": "/data/train.csv", "row": 12, "column": "label", "value": 10},
        {"source": "/data/empty.csv"},
    ],
    ids=["string-value", "int-value", "file-only"],
)
def test_data_validation_error_pickles(dumps, kwargs):
    err = DataValidationError("some problem", **kwargs)
    copy = pickle.loads(dumps(err))
    assert type(copy) is DataValidationError
    assert str(copy) == str(err)
    assert copy.args == err.args
    for field in ("problem", "source", "row", "column", "value"):
        assert getattr(copy, field) == getattr(err, field)
        assert type(getattr(copy, field)) is type(getattr(err, field))


def test_data_validation_error_message():
    err = DataValidationError("outside 0..255", source="/d/t.csv", row=3, column="pixel17", value=256)
    assert str(err) == "/d/t.csv, data row 3, column 'pixel17': outside 0..255 (found 256)"
    assert isinstance(err, ValueError)
    assert str(DataValidationError("file is empty", source="/d/e.csv")) == "/d/e.csv: file is empty"
