"""Reports of training runs and scoring batches, from real artifacts: a real tiny model, real scoring
batches on the session's Ray, the run directory's test predictions written by the training job itself."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mnist_ray import artifacts
from mnist_ray.cli import report_main
from mnist_ray.data.sources import arrays_to_dataset
from mnist_ray.data.splits import DataSplits
from mnist_ray.digit_samples import (
    CONFIDENT_MISTAKES,
    LEAST_CONFIDENT,
    PER_SET,
    SAMPLE,
    DigitSampler,
    candidates,
    read_digits,
    set_keys,
)
from mnist_ray.reports import render_report
from mnist_ray.reports.monitoring import class_shift, reason_kind
from tests.helpers import score, set_csv_cell, write_kaggle_csv

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_PICTURES = {"curves", "confusion", "per_class", "confidence", "digits_sample", "digits_mistakes"}
MONITORING_PICTURES = {"classes", "confidence_all", "digits_least_confident"}
EVALUATION_PICTURES = {"confusion", "per_class", "confidence", "digits_sample", "digits_mistakes"}
BATCH_IMAGES = 300


# --- checking what a report consists of ----------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless ``data`` starts like a PNG."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(data: bytes, what: str) -> None:
    width, height = png_size(data)
    assert 400 <= width <= 2000 and 200 <= height <= 1500, (what, width, height)
    assert len(data) > 5_000, what  # a blank canvas compresses to almost nothing


class _Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.sources += [value or "" for name, value in attrs if name in ("src", "href")]


def check_report(directory: Path) -> set[str]:
    """Check report.html, report.md and report/*.png of ``directory``; returns the pictures' names.

    Every picture is a sensible PNG; the HTML embeds them (or names files that exist),
    loads nothing from the network and runs no script; the Markdown's pictures exist.
    """
    html = (directory / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    parser = _Sources()
    parser.feed(html)
    assert parser.sources
    for source in parser.sources:
        if source.startswith("data:image/png;base64,"):
            assert_sensible_png(base64.b64decode(source.split(",", 1)[1]), "embedded picture")
        else:
            assert (directory / source).is_file(), source
    markdown = (directory / "report.md").read_text()
    linked = [line.split("](", 1)[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]
    assert len(linked) == len(parser.sources)
    for relative in linked:
        assert_sensible_png((directory / relative).read_bytes(), relative)
    files = {p.stem for p in (directory / "report").glob("*.png")}
    assert files == {Path(relative).stem for relative in linked}
    return files


# --- the training run's report ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(ray_session, tiny_run, mnist_arrays, tmp_path_factory) -> Path:
    """A finished run directory: the tiny model, a real 2-epoch history, and test predictions and
    metrics written by mnist_ray.train.job.evaluate_on_test from a Ray Dataset of 400 test images."""
    import tf_keras as keras

    from mnist_ray.train.job import evaluate_on_test

    directory = tmp_path_factory.mktemp("report_run") / "run"
    shutil.copytree(tiny_run, directory)
    model = artifacts.load_model(directory)
    keras.utils.set_random_seed(1)
    fit = model.fit(mnist_arrays["x_train"][3000:3600], mnist_arrays["y_train"][3000:3600], epochs=2,
                    validation_split=0.25, batch_size=64, verbose=0)
    learning_rate = float(keras.backend.get_value(model.optimizer.learning_rate))
    history = [{"epoch": e + 1, **{k: float(v[e]) for k, v in fit.history.items()},
                "learning_rate": learning_rate} for e in range(2)]
    artifacts.write_history(directory, history)
    model.save(directory / artifacts.MODEL_FILE)
    x, y = mnist_arrays["x_test"][:400], mnist_arrays["y_test"][:400]
    test = arrays_to_dataset(x, y, "bundled mnist.npz:test")
    metrics, _, _ = evaluate_on_test(directory, DataSplits(train=test, val=test, test=test))
    artifacts.write_json(directory / artifacts.METRICS_FILE, metrics)
    metadata = artifacts.read_json(directory / artifacts.METADATA_FILE)
    metadata["selected_epoch"] = history[-1]
    artifacts.write_json(directory / artifacts.METADATA_FILE, metadata)
    return directory


def test_run_report_has_every_picture_embedded_and_linked(run_dir):
    report, warnings = render_report(run_dir)
    assert report == run_dir / "report.html" and warnings == []
    assert check_report(run_dir) == RUN_PICTURES
    html = report.read_text()
    metrics = artifacts.read_json(run_dir / artifacts.METRICS_FILE)
    assert f"Test accuracy {metrics['accuracy']:.2%}" in html
    assert "| 7 |" in (run_dir / "report.md").read_text()  # the per-class table


def test_test_predictions_are_the_models_and_the_digits_their_images(run_dir, mnist_arrays):
    table = pq.read_table(run_dir / artifacts.TEST_PREDICTIONS_FILE).sort_by("row")
    assert table["row"].to_pylist() == list(range(1, 401))
    assert table["label"].to_pylist() == mnist_arrays["y_test"][:400].tolist()
    probs = artifacts.load_model(run_dir).predict(mnist_arrays["x_test"][:400], verbose=0)
    assert table["predicted"].to_pylist() == probs.argmax(axis=1).tolist()
    digits = read_digits(run_dir / artifacts.TEST_DIGITS_FILE)
    assert len(digits[SAMPLE]["row"]) == PER_SET
    wrong = int((probs.argmax(axis=1) != mnist_arrays["y_test"][:400]).sum())
    assert len(digits[CONFIDENT_MISTAKES]["row"]) == min(PER_SET, wrong) > 0
    assert (np.diff(digits[CONFIDENT_MISTAKES]["confidence"]) <= 0).all()
    assert (np.diff(digits[LEAST_CONFIDENT]["confidence"]) >= 0).all()
    for subset in digits.values():
        for image, row in zip(subset["image"], subset["row"], strict=True):
            assert np.array_equal(image, mnist_arrays["x_test"][row - 1])


# --- scoring batches ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_batch(ray_session, tiny_run, mnist_arrays, tmp_path_factory) -> dict:
    """A batch of 300 labelled MNIST test images in their natural class mix, two rows of them bad."""
    root = tmp_path_factory.mktemp("labelled")
    path = write_kaggle_csv(root / "night.csv", mnist_arrays["x_test"][:BATCH_IMAGES],
                            mnist_arrays["y_test"][:BATCH_IMAGES])
    set_csv_cell(path, 5, "pixel300", "256")
    set_csv_cell(path, 9, "pixel12", "-4")
    code, stdout = score("--model", str(tiny_run), "--input", str(path), "--output", str(root / "out"))
    (batch_dir,) = (root / "out" / "batches").iterdir()
    return {"code": code, "stdout": stdout, "batch_dir": batch_dir, "output": root / "out", "csv": path}


@pytest.fixture(scope="module")
def skewed_batch(ray_session, tiny_run, mnist_arrays, tmp_path_factory) -> dict:
    """An unlabelled batch of MNIST test images of the digits 0 and 1 only."""
    root = tmp_path_factory.mktemp("skewed")
    zeros_and_ones = np.flatnonzero(mnist_arrays["y_test"] <= 1)[:BATCH_IMAGES]
    path = write_kaggle_csv(root / "night.csv", mnist_arrays["x_test"][zeros_and_ones])
    code, stdout = score("--model", str(tiny_run), "--input", str(path), "--output", str(root / "out"))
    (batch_dir,) = (root / "out" / "batches").iterdir()
    return {"code": code, "stdout": stdout, "batch_dir": batch_dir, "images": zeros_and_ones}


def test_labelled_batch_report_has_evaluation_monitoring_and_rejects(labelled_batch):
    assert labelled_batch["code"] == 3, labelled_batch["stdout"]
    batch_dir = labelled_batch["batch_dir"]
    assert f"report: {batch_dir / 'report.html'}" in labelled_batch["stdout"]
    assert check_report(batch_dir) == EVALUATION_PICTURES | MONITORING_PICTURES
    markdown = (batch_dir / "report.md").read_text()
    assert "evaluation and monitoring" in markdown
    assert "no shift (total variation distance" in markdown  # the natural class mix is not flagged
    assert "| pixelN is N, outside N..N | 2 |" in markdown  # both bad rows, grouped by kind of reason
    assert "SHIFT" not in labelled_batch["stdout"]


def test_batch_digits_are_the_scored_rows_images(labelled_batch, mnist_arrays):
    import pandas as pd

    digits = read_digits(labelled_batch["batch_dir"] / "digits.parquet")
    predictions = pd.read_parquet(labelled_batch["output"] / "predictions").set_index("row")
    assert len(digits[SAMPLE]["row"]) == len(digits[LEAST_CONFIDENT]["row"]) == PER_SET
    for subset in digits.values():
        for k, row in enumerate(subset["row"]):
            assert np.array_equal(subset["image"][k], mnist_arrays["x_test"][row - 1])
            assert subset["label"][k] == mnist_arrays["y_test"][row - 1]
            assert subset["predicted"][k] == predictions.loc[row, "predicted"]
            assert subset["confidence"][k] == pytest.approx(predictions.loc[row, "confidence"])
    # The least confident of the batch, in order: the actors' per-block candidates lost none.
    lowest = predictions["confidence"].sort_values().index[:PER_SET].tolist()
    assert digits[LEAST_CONFIDENT]["row"].tolist() == lowest


def test_skewed_batch_is_flagged_in_report_and_log(skewed_batch):
    assert skewed_batch["code"] == 0, skewed_batch["stdout"]
    batch_dir = skewed_batch["batch_dir"]
    assert check_report(batch_dir) == MONITORING_PICTURES
    markdown = (batch_dir / "report.md").read_text()
    assert "— monitoring" in markdown and "Evaluation" not in markdown
    assert "**⚠ SHIFT: the batch's class mix differs from the training data" in markdown
    assert 'class="flag">SHIFT' in (batch_dir / "report.html").read_text()
    assert f"warning: batch {batch_dir.name}: SHIFT" in skewed_batch["stdout"]


def test_report_job_rerenders_from_saved_artifacts(skewed_batch):
    batch_dir = skewed_batch["batch_dir"]
    before = (batch_dir / "report.md").read_text()
    (batch_dir / "report.html").unlink()
    shutil.rmtree(batch_dir / "report")
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), str(batch_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"report: {batch_dir / 'report.html'}" in result.stdout and "warning: batch" in result.stdout
    assert check_report(batch_dir) == MONITORING_PICTURES
    assert (batch_dir / "report.md").read_text() == before


def test_report_job_refuses_what_is_not_a_run_or_batch(skewed_batch, tiny_run, tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "neither a training run directory" in capsys.readouterr().err
    output = skewed_batch["batch_dir"].parent.parent
    assert report_main([str(output)]) == 2
    newest = skewed_batch["batch_dir"]
    assert f"pass one of its batches/<batch_id> (the newest: {newest})" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / artifacts.CONFIG_FILE, unfinished)
    assert report_main([str(unfinished)]) == 2
    assert "has not finished" in capsys.readouterr().err


# --- the pieces, without Ray -----------------------------------------------------------------------


def test_digit_samples_merged_block_by_block_equal_one_selection_of_everything():
    rng = np.random.default_rng(0)
    n = 5000
    columns = {
        "groups": rng.integers(0, 3, n), "sources": np.array([f"f{g}.csv" for g in rng.integers(0, 3, n)]),
        "rows": np.arange(1, n + 1), "labelled": rng.random(n) < 0.7, "labels": rng.integers(0, 10, n),
        "predicted": rng.integers(0, 10, n), "confidence": rng.random(n).astype(np.float32),
        "images": rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
    }
    columns["sources"] = np.array([f"f{g}.csv" for g in columns["groups"]])
    whole = DigitSampler()
    whole.add(**columns)
    merged = DigitSampler()
    bounds = np.sort(rng.choice(np.arange(1, n), 12, replace=False))
    for block in np.split(np.arange(n), bounds):
        part = {name: values[block] for name, values in columns.items()}
        # As an inference actor does: forward only the block's own candidates.
        keys = set_keys(part["groups"], part["rows"], part["labelled"], part["predicted"], part["labels"],
                        part["confidence"])
        keep = candidates(keys)
        merged.add(**{name: values[keep] for name, values in part.items()})
    assert whole.table().equals(merged.table())
    assert whole.table().num_rows == 3 * PER_SET


def test_class_shift_needs_a_large_and_significant_difference():
    reference = np.array([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    assert not class_shift(reference // 10, reference).flagged
    skewed = np.array([150, 150, 0, 0, 0, 0, 0, 0, 0, 0])
    shift = class_shift(skewed, reference)
    assert shift.flagged and shift.tvd > 0.7 and shift.p_value < 1e-6
    # 20 images: a TVD above 0.1 is ordinary chance, and not significant.
    small = np.array([4, 2, 2, 2, 2, 2, 2, 2, 1, 1])
    assert class_shift(small, reference).tvd >= 0.1 and not class_shift(small, reference).flagged
    # A million images: a 2 % shift is significant, and too small to matter.
    large = (reference / reference.sum() * 1e6).astype(int)
    large[0] += 20_000
    large[1] -= 20_000
    shift = class_shift(large, reference)
    assert shift.p_value < 1e-6 and not shift.flagged


def test_class_shift_p_value_is_scipy_stats_chisquare():
    from scipy.stats import chisquare

    reference = np.array([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    share = (reference + 0.5) / (reference + 0.5).sum()
    for counts in ([100, 120, 90, 80, 110, 95, 105, 100, 98, 102], [40, 2, 2, 2, 2, 2, 2, 2, 1, 1]):
        counts = np.array(counts)
        expected = chisquare(counts, f_exp=share * counts.sum()).pvalue
        assert class_shift(counts, reference).p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_reject_reasons_group_by_kind():
    assert reason_kind("pixel37 is 300, outside 0..255") == "pixelN is N, outside N..N"
    assert reason_kind("pixel5 is '7.5', not an integer") == "pixelN is '…', not an integer"
    assert reason_kind("has 500 values, expected 785 (one per header column; line 9 of the file)") == (
        "has N values, expected N (one per header column; line N of the file)"
    )
