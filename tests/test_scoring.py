"""Nightly batch scoring (jobs/score.py) on the local test Ray, with a real tiny model.

One batch over a directory of every kind of input is scored once per module and
inspected by most tests; the stateful scenarios (rerun, --force, killed runs)
work on copies of its output or on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mnist_ray import artifacts
from mnist_ray.cli import score_main
from mnist_ray.evaluation import classification_metrics
from mnist_ray.score import inputs as score_inputs
from mnist_ray.score import output as scoring_output
from mnist_ray.score.audit import audit
from tests.helpers import (
    KILL_BEFORE_PUBLISHING,
    KILL_WHILE_PUBLISHING,
    append_column,
    drop_csv_column,
    rewrite_csv,
    score,
    score_and_die,
    set_csv_cell,
    write_kaggle_csv,
)

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-11-20"
PROBS = [f"prob_{k}" for k in range(10)]

# The schemas docs/scoring.md documents, written out independently of the code's constants.
PREDICTION_COLUMNS = [
    ("source", pa.string(), False), ("row", pa.int64(), False), ("image_id", pa.string(), True),
    ("predicted", pa.int64(), False), ("confidence", pa.float32(), False),
    *[(name, pa.float32(), False) for name in PROBS],
    ("label", pa.int64(), True), ("correct", pa.bool_(), True), ("model_id", pa.string(), False),
    ("model_version", pa.string(), True), ("scored_at", pa.timestamp("us", tz="UTC"), False),
]
REJECT_COLUMNS = [
    ("source", pa.string(), False), ("row", pa.int64(), True), ("reason", pa.string(), False),
    ("raw", pa.string(), False), ("model_id", pa.string(), False),
    ("scored_at", pa.timestamp("us", tz="UTC"), False),
]
# Where each good file's images come from in the MNIST test set: (first, count, labelled).
GOOD_FILES = {
    "a_labels.csv": (0, 40, True),
    "b_ids_shuffled.csv": (40, 30, False),
    "c_compressed.csv.gz": (70, 25, True),
    "d_crlf_bom_id.csv": (95, 20, True),
}
BAD_ROWS_FILE = "e_bad_rows.csv"  # images 115..128, labelled
# Files rejected whole: (the reason, the data lines they hold, counted as rejected).
UNREADABLE = {
    "f_empty.csv": ("file is empty", 0),
    "h_binary.csv": ("not a text CSV file (binary content)", 0),
    "i_no_pixels.csv": ("missing column(s) pixel0", 1),
    "j_duplicated.csv": ("duplicated column in the header", 3),
    "k_unknown.csv": ("unexpected column(s) 'colour'", 3),
}
EMPTY_FILE = "g_header_only.csv"  # a header and no rows: valid, nothing to score
EXPECTED_REJECTS = {
    1: "pixel37 is 300, outside 0..255",
    3: "pixel5 is '7.5', not an integer",
    4: "pixel9 is -1, outside 0..255",
    6: "label is 10, outside 0..9",
    7: "pixel100 is empty",
    8: "has 500 values, expected 785 (one per header column; line 9 of the file)",
    10: "blank line (no values)",
    12: "pixel3 is 'abc', not an integer",
}


# --- fixtures ------------------------------------------------------------------------------------


def images_of(mnist_arrays, name: str) -> tuple[np.ndarray, np.ndarray]:
    first, count, _ = GOOD_FILES.get(name, (115, 14, True))
    return mnist_arrays["x_test"][first : first + count], mnist_arrays["y_test"][first : first + count]


def _crlf_bom(path: Path) -> None:
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, mnist_arrays) -> Path:
    """A night's drop: good files of every layout, one with bad rows, six unreadable files."""
    root = tmp_path_factory.mktemp("nightly")
    x, y = images_of(mnist_arrays, "a_labels.csv")
    write_kaggle_csv(root / "a_labels.csv", x, y)
    x, _ = images_of(mnist_arrays, "b_ids_shuffled.csv")
    write_kaggle_csv(root / "b_ids_shuffled.csv", x, None, id_column="ImageId", shuffle_columns=True)
    x, y = images_of(mnist_arrays, "c_compressed.csv.gz")
    write_kaggle_csv(root / "c_compressed.csv.gz", x, y, gz=True, shuffle_columns=True, seed=3)
    x, y = images_of(mnist_arrays, "d_crlf_bom_id.csv")
    _crlf_bom(write_kaggle_csv(root / "d_crlf_bom_id.csv", x, y, id_column="id"))
    write_bad_rows(root / BAD_ROWS_FILE, *images_of(mnist_arrays, BAD_ROWS_FILE))
    write_unreadable(root, mnist_arrays)
    return root


def write_bad_rows(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """14 labelled rows, EXPECTED_REJECTS among them; the others are good."""
    write_kaggle_csv(path, images, labels)
    set_csv_cell(path, 1, "pixel37", "300")
    set_csv_cell(path, 3, "pixel5", "7.5")
    set_csv_cell(path, 4, "pixel9", "-1")
    set_csv_cell(path, 6, "label", "10")
    set_csv_cell(path, 7, "pixel100", "")
    set_csv_cell(path, 12, "pixel3", "abc")

    def structure(rows: list[list[str]]) -> None:
        del rows[8][500:]
        rows[10] = [""]

    rewrite_csv(path, structure)


def write_unreadable(root: Path, mnist_arrays) -> None:
    x, y = mnist_arrays["x_test"][:3], mnist_arrays["y_test"][:3]
    (root / "f_empty.csv").write_bytes(b"")
    write_kaggle_csv(root / "g_header_only.csv", x[:0], y[:0])
    (root / "h_binary.csv").write_bytes(np.arange(4096, dtype=np.int32).tobytes())
    (root / "i_no_pixels.csv").write_text("label,colour\n3,red\n")
    rewrite_csv(write_kaggle_csv(root / "j_duplicated.csv", x, y), append_column("pixel4", "0"))
    rewrite_csv(write_kaggle_csv(root / "k_unknown.csv", x, y), append_column("colour", "1"))


def score_batch_of(inputs: Path, tiny_run: Path, output: Path, executor: str) -> dict:
    code, stdout = score("--model", str(tiny_run), "--input", str(inputs), "--output", str(output),
                         "--date", DATE, "--batch-size", "16", "--executor", executor)
    (batch_dir,) = (output / "batches").iterdir()
    return {"code": code, "stdout": stdout, "output": output, "batch_dir": batch_dir,
            "summary": json.loads((batch_dir / "summary.json").read_text())}


@pytest.fixture(scope="module")
def first_batch(ray_session, tiny_run, inputs, tmp_path_factory) -> dict:
    """The batch through Ray Data (read tasks, an actor pool), on the session's Ray."""
    return score_batch_of(inputs, tiny_run, tmp_path_factory.mktemp("scored") / "out", "ray")


@pytest.fixture(scope="module")
def local_batch(tiny_run, inputs, tmp_path_factory) -> dict:
    """The same batch scored in this process (``--executor local``)."""
    return score_batch_of(inputs, tiny_run, tmp_path_factory.mktemp("scored_locally") / "out", "local")


def predictions(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "predictions").sort_values(["source", "row"]).reset_index(drop=True)


def rejects(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "rejects")


def per_file(summary: dict) -> dict[str, dict]:
    return {Path(f["path"]).name: f for f in summary["inputs"]}


# --- one batch over every kind of input ------------------------------------------------------------


def test_counts_add_up_per_file_and_in_total(first_batch):
    assert first_batch["code"] == 3, first_batch["stdout"]
    files = per_file(first_batch["summary"])
    assert len(files) == len(GOOD_FILES) + 1 + len(UNREADABLE) + 1
    for name, (_, count, _) in GOOD_FILES.items():
        assert (files[name]["rows_in"], files[name]["scored"], files[name]["rejected"]) == (count, count, 0)
        assert files[name]["status"] == "scored"
    bad = files[BAD_ROWS_FILE]
    rejected = len(EXPECTED_REJECTS)
    assert (bad["rows_in"], bad["scored"], bad["rejected"]) == (14, 14 - rejected, rejected)
    for name, (reason, lines) in UNREADABLE.items():
        assert files[name]["status"] == "rejected" and reason in files[name]["file_error"], name
        assert (files[name]["rows_in"], files[name]["scored"], files[name]["rejected"]) == (lines, 0, lines)
    empty = files[EMPTY_FILE]
    assert (empty["status"], empty["rows_in"], empty["file_error"]) == ("empty", 0, None)
    total = first_batch["summary"]["total"]
    assert total["rows_in"] == sum(f["rows_in"] for f in files.values())
    assert total["rows_in"] == total["scored"] + total["rejected"]
    assert total["files_rejected"] == len(UNREADABLE) and total["files_empty"] == 1
    stdout = first_batch["stdout"]
    assert f"{total['rows_in']:>12,} {total['scored']:>12,} {total['rejected']:>10,}  total" in stdout
    assert stdout.count("] ") >= len(files)  # a progress line per finished file


def test_bad_rows_are_quarantined_with_row_reason_and_text(first_batch, inputs):
    frame = rejects(first_batch["output"])
    mine = frame[frame["source"] == str(inputs / BAD_ROWS_FILE)].sort_values("row")
    assert dict(zip(mine["row"].astype(int), mine["reason"], strict=True)) == EXPECTED_REJECTS
    lines = (inputs / BAD_ROWS_FILE).read_text().split("\n")
    for row, raw in zip(mine["row"].astype(int), mine["raw"], strict=True):
        assert raw == lines[row]  # the line itself: data row r is line r + 1
    scored = predictions(first_batch["output"])
    scored_rows = scored.loc[scored["source"] == str(inputs / BAD_ROWS_FILE), "row"].tolist()
    assert scored_rows == sorted(set(range(1, 15)) - set(EXPECTED_REJECTS))


def test_unreadable_files_are_rejected_whole(first_batch, inputs):
    frame = rejects(first_batch["output"])
    for name, (reason, lines) in UNREADABLE.items():
        mine = frame[frame["source"] == str(inputs / name)]
        assert len(mine) == 1, name
        assert pd.isna(mine["row"].iloc[0]), name
        assert reason in mine["reason"].iloc[0], (name, mine["reason"].iloc[0])
        assert (f"({lines:,} data lines not read)" in mine["reason"].iloc[0]) == bool(lines), name
    assert not (frame["source"] == str(inputs / EMPTY_FILE)).any()


def test_what_every_csv_reader_accepts_is_accepted(tiny_run, tmp_path, mnist_arrays):
    """Spaces around values, blank lines ending a file, ids that are text: a clean batch (exit 0)."""
    path = write_kaggle_csv(tmp_path / "lenient.csv", mnist_arrays["x_test"][:5], mnist_arrays["y_test"][:5],
                            id_column="ImageId")
    set_csv_cell(path, 2, "pixel300", " 12 ")
    set_csv_cell(path, 3, "ImageId", "img-0003")
    path.write_text(path.read_text() + "\n\n")
    code, stdout = score("--model", str(tiny_run), "--input", str(path), "--output", str(tmp_path / "out"),
                         "--executor", "local")
    assert code == 0, stdout
    frame = predictions(tmp_path / "out")
    assert frame["row"].tolist() == [1, 2, 3, 4, 5]
    assert frame["image_id"].tolist()[1:4] == ["2", "img-0003", "4"]
    summary = json.loads(next((tmp_path / "out" / "batches").glob("*/summary.json")).read_text())
    assert (summary["total"]["rows_in"], summary["total"]["rejected"]) == (5, 0)
    assert set(summary["seconds"]) == {"start_up", "scoring", "wall"}
    assert summary["seconds"]["wall"] >= summary["seconds"]["start_up"] + summary["seconds"]["scoring"] - 0.2


def _expected_schema(columns) -> pa.Schema:
    return pa.schema([pa.field(name, kind, nullable=nullable) for name, kind, nullable in columns])


def test_parquet_schema_is_exactly_the_documented_one(first_batch):
    output = first_batch["output"]
    for kind, columns in (("predictions", PREDICTION_COLUMNS), ("rejects", REJECT_COLUMNS)):
        parts = sorted((output / kind / f"date={DATE}").glob("part-*.parquet"))
        assert parts, kind
        for part in parts:
            schema = pq.read_schema(part).remove_metadata()
            assert schema.equals(_expected_schema(columns), check_metadata=False), (part, schema)
            assert part.name.startswith(f"part-{first_batch['batch_dir'].name}-")


def test_predictions_equal_model_predict(first_batch, tiny_run, inputs, mnist_arrays):
    model = artifacts.load_model(tiny_run)
    frame = predictions(first_batch["output"])
    for name in GOOD_FILES:
        images, _ = images_of(mnist_arrays, name)
        mine = frame[frame["source"] == str(inputs / name)]
        assert mine["row"].tolist() == list(range(1, len(images) + 1)), name
        expected = model.predict(images, verbose=0)
        np.testing.assert_allclose(mine[PROBS].to_numpy(), expected, atol=1e-5, err_msg=name)
        assert (mine["predicted"].to_numpy() == expected.argmax(axis=1)).all(), name
        np.testing.assert_allclose(mine["confidence"].to_numpy(), expected.max(axis=1), atol=1e-5)
        assert (mine["model_id"] == artifacts.model_id(tiny_run)).all()
        assert (mine["model_version"] == str(tiny_run)).all()  # a run directory names itself


def test_scoring_in_process_writes_what_ray_writes(first_batch, local_batch):
    assert (first_batch["summary"]["executor"], local_batch["summary"]["executor"]) == ("ray", "local")
    assert "inference: in this process (no Ray)" in local_batch["stdout"]
    assert local_batch["code"] == first_batch["code"] == 3
    keys = ["source", "row"]
    ray_rows, local_rows = predictions(first_batch["output"]), predictions(local_batch["output"])
    assert ray_rows[keys].equals(local_rows[keys])
    for column in ("image_id", "predicted", "label", "correct"):
        assert ray_rows[column].equals(local_rows[column]), column
    np.testing.assert_allclose(local_rows[PROBS].to_numpy(), ray_rows[PROBS].to_numpy(), atol=1e-6)
    ray_rejects, local_rejects = (
        rejects(b["output"]).sort_values(keys, na_position="first").reset_index(drop=True)
        for b in (first_batch, local_batch)
    )
    assert ray_rejects[[*keys, "reason", "raw"]].equals(local_rejects[[*keys, "reason", "raw"]])
    for key in ("total", "inputs"):
        ray_part, local_part = first_batch["summary"][key], local_batch["summary"][key]
        assert _without_batch_ids(local_part) == _without_batch_ids(ray_part), key


def test_actor_pool_flags_say_they_do_not_apply_in_process(local_batch, tiny_run, mnist_arrays, tmp_path):
    assert "note: --concurrency" not in local_batch["stdout"]
    digits = write_kaggle_csv(tmp_path / "digits.csv", mnist_arrays["x_test"][:5])
    code, stdout = score("--model", str(tiny_run), "--input", str(digits), "--output", str(tmp_path / "out"),
                         "--executor", "local", "--concurrency", "2")
    assert code == 0
    assert "note: --concurrency and --cpus-per-actor size Ray's actor pool" in stdout


def _without_batch_ids(value):
    """A summary's part with the file names that hold the batch id (parts) taken out."""
    if isinstance(value, list):
        return [_without_batch_ids(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_batch_ids(v) for k, v in value.items() if k not in ("predictions", "rejects")}
    return value


@pytest.mark.parametrize(
    ("flags", "env_address", "size", "expected"),
    [
        ([], None, 10 << 20, "local"),
        ([], None, (256 << 20) + 1, "ray"),  # big enough to pay for starting Ray
        ([], "127.0.0.1:6379", 10 << 20, "ray"),  # a cluster is named: the job runs there
        (["--address", "127.0.0.1:6379"], None, 10 << 20, "ray"),
        (["--use-gpu"], None, 10 << 20, "ray"),  # GPUs are requested by actors
        (["--executor", "ray"], None, 10 << 20, "ray"),
        (["--executor", "local"], None, 1 << 40, "local"),
    ],
)
def test_the_executor_auto_picks(flags, env_address, size, expected, monkeypatch):
    from mnist_ray.cli import score_parser
    from mnist_ray.score.inference import choose_executor

    if env_address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    args = score_parser().parse_args(["--input", "x.csv", "--output", "out", *flags])
    picked = choose_executor(args.executor, address=args.address, use_gpu=args.use_gpu, input_bytes=size)
    assert picked == expected


def test_an_input_of_unknown_size_is_scored_with_ray():
    from mnist_ray.score.inference import choose_executor

    assert choose_executor("auto", address=None, use_gpu=False, input_bytes=None) == "ray"
    assert score_inputs.input_size(["/no/such/file.csv"]) is None


def test_ids_labels_and_correctness(first_batch, inputs, mnist_arrays):
    frame = pd.read_parquet(first_batch["output"] / "predictions", dtype_backend="numpy_nullable")
    frame = frame.sort_values(["source", "row"])
    for name, (_, count, labelled) in GOOD_FILES.items():
        mine = frame[frame["source"] == str(inputs / name)]
        if "id" in name:
            assert mine["image_id"].tolist() == [str(k) for k in range(1, count + 1)], name  # as text
        else:
            assert mine["image_id"].isna().all(), name
        if labelled:
            labels = images_of(mnist_arrays, name)[1]
            assert mine["label"].tolist() == labels.tolist(), name
            assert mine["correct"].tolist() == (mine["predicted"] == mine["label"]).tolist()
        else:
            assert mine["label"].isna().all() and mine["correct"].isna().all(), name


def test_metrics_are_trainings_metrics_over_the_labelled_rows(first_batch):
    frame = predictions(first_batch["output"])
    labelled = frame[frame["label"].notna()]
    assert len(labelled) == 40 + 25 + 20 + 14 - len(EXPECTED_REJECTS)
    expected = classification_metrics(labelled["label"].astype(int), labelled["predicted"])
    assert json.loads((first_batch["batch_dir"] / "metrics.json").read_text()) == expected
    printed = f"accuracy {expected['accuracy']:.4%} on {expected['count']:,} labelled rows"
    assert printed in first_batch["stdout"]


def test_output_reads_as_a_dataset_with_pandas_and_pyarrow(first_batch):
    output = first_batch["output"]
    frame = pd.read_parquet(output / "predictions")
    assert len(frame) == first_batch["summary"]["total"]["scored"]
    assert set(frame["date"].astype(str)) == {DATE}  # the partition becomes a column
    table = pads.dataset(output / "rejects", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(EXPECTED_REJECTS) + len(UNREADABLE)
    batch = scoring_output.read_batch(first_batch["batch_dir"])
    assert batch["predictions"].count_rows() == len(frame) and batch["metrics"]["count"] > 0
    assert batch["rejects"].to_table().num_rows == table.num_rows


def test_output_reads_with_duckdb(first_batch):
    duckdb = pytest.importorskip("duckdb")
    glob = str(first_batch["output"] / "predictions" / "**" / "*.parquet")
    ((count, dates),) = duckdb.sql(
        f"select count(*), count(distinct date) from read_parquet('{glob}', hive_partitioning=true)"
    ).fetchall()
    assert (count, dates) == (first_batch["summary"]["total"]["scored"], 1)


def test_manifest_records_every_input_and_the_batch_is_marked_done(first_batch, inputs):
    output = first_batch["output"]
    manifest = scoring_output.read_manifest(output)
    assert sorted(Path(e["path"]).name for e in manifest) == sorted(p.name for p in inputs.iterdir())
    for entry in manifest:
        data = Path(entry["path"]).read_bytes()
        assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert entry["batch_id"] == first_batch["batch_dir"].name and entry["date"] == DATE
        assert entry["rows_in"] == entry["scored"] + entry["rejected"]
    assert (first_batch["batch_dir"] / "_SUCCESS").is_file()
    assert not any((output / "_staging").iterdir())
    assert audit(output) == []


# --- nightly reruns -------------------------------------------------------------------------------


def copy_output(first_batch, tmp_path: Path) -> Path:
    output = tmp_path / "out"
    shutil.copytree(first_batch["output"], output)
    return output


def test_a_rerun_skips_what_was_scored(first_batch, tiny_run, inputs, tmp_path):
    output = copy_output(first_batch, tmp_path)
    manifest = (output / "_manifest.jsonl").read_text()
    code, stdout = score("--model", str(tiny_run), "--input", str(inputs), "--output", str(output),
                         "--date", DATE)
    assert code == 0
    assert stdout.count("skipping ") == len(list(inputs.iterdir())) and "nothing to score" in stdout
    assert (output / "_manifest.jsonl").read_text() == manifest
    assert len(list((output / "batches").iterdir())) == 1


def test_an_input_is_its_content_not_its_name(first_batch, tiny_run, inputs, tmp_path, mnist_arrays):
    """A scored file re-delivered under a new name is skipped, naming the earlier path; two
    copies of one new file in one run are scored once."""
    output = copy_output(first_batch, tmp_path)
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(inputs / "a_labels.csv", drop / "renamed.csv")
    write_kaggle_csv(drop / "new.csv", mnist_arrays["x_test"][-12:], mnist_arrays["y_test"][-12:])
    shutil.copy(drop / "new.csv", drop / "new-again.csv")
    code, stdout = score("--model", str(tiny_run), "--input", str(drop), "--output", str(output),
                         "--date", "2026-11-02", "--executor", "local")
    assert code == 0, stdout
    assert (f"skipping {drop / 'renamed.csv'}: same content as {inputs / 'a_labels.csv'}, already scored by "
            f"model {artifacts.model_id(tiny_run)} in batch {first_batch['batch_dir'].name}") in stdout
    twin = f"skipping {drop / 'new.csv'}: same content as {drop / 'new-again.csv'}, which this run scores"
    assert twin in stdout
    entry = scoring_output.read_manifest(output)[-1]
    assert entry["path"] == str(drop / "new-again.csv") and entry["scored"] == 12
    assert (predictions(output)["date"].astype(str) == "2026-11-02").sum() == 12
    summary = json.loads((output / "batches" / entry["batch_id"] / "summary.json").read_text())
    assert {Path(s["path"]).name: Path(s["same_as"]).name for s in summary["skipped"]} == {
        "renamed.csv": "a_labels.csv", "new.csv": "new-again.csv"}
    assert audit(output) == []


def test_force_rescores_and_replaces_without_duplicates(first_batch, tiny_run, inputs, tmp_path):
    output = copy_output(first_batch, tmp_path)
    target = inputs / "b_ids_shuffled.csv"
    manifest = scoring_output.read_manifest(output)
    (old_parts,) = [e["predictions"] for e in manifest if e["path"] == str(target)]
    submission = tmp_path / "submission.csv"
    code, stdout = score("--model", str(tiny_run), "--input", str(target), "--output", str(output),
                         "--date", DATE, "--force", "--submission", str(submission))
    assert code == 0, stdout
    frame = predictions(output)
    mine = frame[frame["source"] == str(target)]
    assert mine["row"].tolist() == list(range(1, 31))  # once each, not twice
    assert len(frame) == first_batch["summary"]["total"]["scored"]
    assert not any((output / p).exists() for p in old_parts)
    assert audit(output) == []
    entry = scoring_output.read_manifest(output)[-1]
    assert entry["path"] == str(target) and entry["replaces"] == [first_batch["batch_dir"].name]
    sub = pd.read_csv(submission)
    assert list(sub.columns) == ["ImageId", "Label"]
    assert sub["ImageId"].tolist() == mine["image_id"].astype(int).tolist() == list(range(1, 31))
    assert sub["Label"].tolist() == mine["predicted"].tolist()


def test_a_file_that_changes_while_scored_is_not_published(
    ray_session, tiny_run, inputs, tmp_path, monkeypatch
):
    output = tmp_path / "out"
    moving = str(inputs / "a_labels.csv")
    real_digest = score_inputs.file_digest
    monkeypatch.setattr(score_inputs, "file_digest",
                        lambda path: (0, "0" * 64) if path == moving else real_digest(path))
    code = score_main(["--model", str(tiny_run), "--input", moving, str(inputs / "c_compressed.csv.gz"),
                       "--output", str(output), "--date", DATE])
    assert code == 1
    assert [Path(e["path"]).name for e in scoring_output.read_manifest(output)] == ["c_compressed.csv.gz"]
    assert set(predictions(output)["source"]) == {str(inputs / "c_compressed.csv.gz")}
    assert audit(output) == []


# --- killed runs ------------------------------------------------------------------------------------

def test_killed_runs_leave_nothing_partial_and_the_next_run_completes(
    ray_session, tiny_run, inputs, tmp_path
):
    output = tmp_path / "out"
    names = ["a_labels.csv", "b_ids_shuffled.csv", BAD_ROWS_FILE]
    args = ["--model", str(tiny_run), "--input", *[str(inputs / n) for n in names], "--output", str(output),
            "--date", DATE, "--address", ray_session.get_runtime_context().gcs_address]

    killed = score_and_die(KILL_BEFORE_PUBLISHING, args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (staged,) = (output / "_staging").iterdir()
    assert list(staged.rglob("part-*.parquet"))  # the batch was written, then the job died
    assert not (output / "predictions").exists() and not (output / "_manifest.jsonl").exists()
    (line,) = audit(output)
    assert line.startswith(f"_staging/{staged.name}: an unpublished batch") and "removes it" in line, line

    killed = score_and_die(KILL_WHILE_PUBLISHING, args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"removed the unpublished batch {staged.name}" in killed.stdout
    (half,) = (output / "_staging").iterdir()
    assert (half / "_PUBLISH.json").is_file()
    assert len(list((output / "predictions").rglob("*.parquet"))) == 1  # one of three parts got through
    (line,) = audit(output)  # what recovery mends is said once, not as missing and stray parts
    assert line.startswith(f"_staging/{half.name}: a batch committed") and "finishes publishing" in line, line

    code, stdout = score(*args[:-2])  # in this process: it finishes publishing, then finds nothing to score
    assert code == 3
    assert f"finished publishing batch {half.name}" in stdout and "nothing to score" in stdout
    frame = predictions(output)
    assert len(frame) == len(frame.drop_duplicates(["source", "row"])) == 40 + 30 + 14 - len(EXPECTED_REJECTS)
    assert [Path(e["path"]).name for e in scoring_output.read_manifest(output)] == sorted(names)
    assert (output / "batches" / half.name / "_SUCCESS").is_file()
    assert not any((output / "_staging").iterdir())
    assert audit(output) == []


# --- exit codes and refusals ------------------------------------------------------------------------


def test_a_clean_batch_exits_0(ray_session, tiny_run, inputs, tmp_path):
    code, stdout = score("--model", str(tiny_run), "--input", str(inputs / "a_labels.csv"),
                         "--output", str(tmp_path / "out"))
    assert code == 0, stdout
    (partition,) = (tmp_path / "out" / "predictions").iterdir()
    assert partition.name.startswith("date=20")  # today, UTC


def _broken_runs(tiny_run: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    shutil.copy(tiny_run / "config.json", no_model)
    other_contract = tmp_path / "other_contract"
    shutil.copytree(tiny_run, other_contract)
    meta = json.loads((other_contract / "metadata.json").read_text())
    meta["input_contract"]["input"]["range"] = [0, 1]
    (other_contract / "metadata.json").write_text(json.dumps(meta))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt)
    (corrupt / "model.onnx").write_bytes(b"not a model")
    return {
        "missing": (tmp_path / "nowhere", "not a run directory"),
        "no-model": (no_model, "no model.onnx"),
        "other-contract": (other_contract, "input contract"),
        "corrupt": (corrupt, "not an ONNX model"),
    }


def test_unusable_models_and_inputs_exit_2(tiny_run, inputs, tmp_path, capsys):
    for case, (run_dir, message) in _broken_runs(tiny_run, tmp_path).items():
        code = score_main(["--model", str(run_dir), "--input", str(inputs / "a_labels.csv"),
                           "--output", str(tmp_path / "out")])
        assert code == 2, case
        assert message in capsys.readouterr().err, case
    code = score_main(["--model", str(tiny_run), "--input", str(tmp_path / "missing.csv"),
                       "--output", str(tmp_path / "out")])
    assert code == 2 and "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for bad_flags in (["--date", "22/11/2026"], ["--submission", "s.csv"], ["--concurrency", "0"],
                      ["--tracking-uri", "mlruns"]):
        with pytest.raises(SystemExit) as info:
            score_main(["--model", str(tiny_run), "--input", str(inputs), "--output", str(tmp_path / "out"),
                        *bad_flags])
        assert info.value.code == 2, bad_flags


def test_use_gpu_without_onnxruntimes_cuda_provider_exits_2(tiny_run, inputs, tmp_path, capsys):
    from mnist_ray.onnx_model import GPU_RUNTIME_MISSING

    code = score_main(["--model", str(tiny_run), "--input", str(inputs / "a_labels.csv"), "--output",
                       str(tmp_path / "out"), "--use-gpu", "--executor", "local"])
    assert code == 2
    assert GPU_RUNTIME_MISSING in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("predictions/*/*.parquet"))
    assert not list((tmp_path / "out" / "_staging").glob("*"))


def test_a_second_job_on_the_same_output_exits_1(tiny_run, inputs, tmp_path, capsys):
    output = tmp_path / "out"
    with scoring_output.locked(output):
        code = score_main(["--model", str(tiny_run), "--input", str(inputs / "a_labels.csv"),
                           "--output", str(output)])
    assert code == 1
    assert "another scoring job" in capsys.readouterr().err


def test_help_documents_flags_and_exit_codes():
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "score.py"), "--help"],
                            capture_output=True, text=True, check=True, env={**os.environ, "RAY_ADDRESS": ""})
    for flag in ("--model", "--input", "--output", "--date", "--force", "--submission", "--address",
                 "--use-gpu", "--batch-size", "--concurrency", "--cpus-per-actor", "--executor"):
        assert flag in result.stdout, flag
    codes = result.stdout.split("exit codes:")[1]
    listed = [line.split()[0] for line in codes.splitlines() if line[:3].strip().isdigit()]
    assert listed == ["0", "3", "1", "2"]


# --- the reader's records (no Ray) -------------------------------------------------------------------


def test_file_records_end_with_the_row_count_and_digest(tmp_path, mnist_arrays):
    from mnist_ray.score.records import END_OF_FILE, IMAGE_ROW, REJECTED_FILE, REJECTED_ROW, file_records

    path = write_kaggle_csv(tmp_path / "t.csv", mnist_arrays["x_test"][:5], mnist_arrays["y_test"][:5])
    set_csv_cell(path, 2, "pixel0", "x")
    blocks = list(file_records(str(path), 7))
    records = {k: np.concatenate([b[k] for b in blocks]) for k in ("kind", "file", "row", "raw")}
    assert (records["file"] == 7).all()
    assert records["kind"].tolist() == [IMAGE_ROW] * 4 + [REJECTED_ROW, END_OF_FILE]
    assert records["row"].tolist() == [1, 3, 4, 5, 2, 5]  # the end record carries the data-row count
    end = json.loads(records["raw"][-1])
    assert end == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size,
                   "whole_file": True}
    drop_csv_column(path, "pixel300")
    (reason,) = [r for b in file_records(str(path), 0) for r in b["reason"][b["kind"] == REJECTED_FILE]]
    assert reason.startswith("missing column(s) pixel300")


def test_the_chunk_reader_passes_records_and_errors_on_and_stops_when_abandoned(tmp_path, mnist_arrays):
    import threading

    from mnist_ray.score import records as scoring
    from mnist_ray.score.records import ChunkReader

    small = [str(write_kaggle_csv(tmp_path / f"{k}.csv", mnist_arrays["x_test"][:5])) for k in range(2)]
    with ChunkReader([*small, str(tmp_path / "gone.csv")]) as reader:
        got = []
        with pytest.raises(OSError, match="gone.csv"):
            for records in reader:
                got.append((int(records["file"][0]), int(records["kind"][0])))
    # Everything read before the error comes first: each file's images, then its end.
    images, end = scoring.IMAGE_ROW, scoring.END_OF_FILE
    assert got == [(0, images), (0, end), (1, images), (1, end)]

    big = write_kaggle_csv(tmp_path / "big.csv", np.tile(mnist_arrays["x_test"][:1000], (20, 1, 1)))
    reader = ChunkReader([str(big)], depth=2)
    stream = iter(reader)
    assert next(stream)["kind"][0] == scoring.IMAGE_ROW
    stream.close()  # the consumer stops early (an error downstream): the reading thread must end too
    assert not [t for t in threading.enumerate() if t.name == "csv-read-ahead"]
