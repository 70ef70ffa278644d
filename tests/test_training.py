"""Integration: real Ray Train workers on the local test Ray, on small subsets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_ray.cli import train_main
from mnist_ray.train import loop as training
from tests.helpers import set_csv_cell, write_kaggle_csv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# --max-failures 1: on an overloaded 2-core machine Ray Train has been seen to lose a
# worker group at shutdown (health check after the placement group was removed);
# a restart resumes from the last checkpoint, as in production, and the assertions
# on history and metrics still hold.
TINY = ["--limit", "600", "--batch-size", "32", "--num-workers", "2", "--cpus-per-worker", "1",
        "--max-failures", "1"]


@pytest.fixture(scope="module")
def trained_run(ray_session, tmp_path_factory) -> Path:
    """One 2-worker, 1-epoch run on 600 bundled images, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_main([*TINY, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    return run_dir


def test_run_directory_has_every_artifact(trained_run: Path):
    expected = ("config.json", "model.keras", "metadata.json", "history.json", "history.csv", "metrics.json",
                "test_predictions.parquet", "test_digits.parquet", "report.html", "report.md",
                "report/curves.png", "report/digits_mistakes.png")
    for name in expected:
        assert (trained_run / name).is_file(), name
    assert not (trained_run.parent / "latest").exists()  # --output-dir: no link beside it


def test_metadata_describes_data_config_contract_and_versions(trained_run: Path):
    meta = json.loads((trained_run / "metadata.json").read_text())
    assert meta["data"]["fingerprint"].startswith("sha256:")
    assert meta["data"]["rows"]["train"] + meta["data"]["rows"]["val"] == 600
    assert meta["data"]["test_set"] == "MNIST test set"
    assert meta["config"]["train"]["num_workers"] == 2
    assert meta["input_contract"]["input"]["dtype"] == "uint8"
    assert meta["class_labels"] == [str(d) for d in range(10)]
    assert meta["versions"]["ray"].startswith("2.")
    assert meta["versions"]["tf-keras"].startswith("2.")
    assert 0.0 <= meta["test_metrics"]["accuracy"] <= 1.0


def test_history_has_one_record_per_epoch_with_throughput(trained_run: Path):
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    record = history[0]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_s"):
        assert np.isfinite(record[key]), key
    assert record["images_per_s"] > 0
    assert (trained_run / "history.csv").read_text().splitlines()[0].startswith("epoch,loss,accuracy")


def test_test_metrics_match_the_saved_model(trained_run: Path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["count"] == 600
    assert np.array(metrics["confusion_matrix"]).sum() == 600
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}


def test_saved_model_loads_in_a_fresh_process_without_this_package(trained_run: Path, mnist_arrays):
    """The model file alone is the contract: plain tf_keras loads it and takes raw pixels."""
    images = mnist_arrays["x_test"][:64]
    np.save(trained_run / "probe.npy", images)
    code = (
        "import sys, numpy as np, tf_keras as keras\n"
        "assert 'mnist_ray' not in sys.modules\n"
        f"m = keras.models.load_model({str(trained_run / 'model.keras')!r}, safe_mode=True)\n"
        f"p = m.predict(np.load({str(trained_run / 'probe.npy')!r}), verbose=0)\n"
        "print(p.shape, float(p.sum(axis=1).min()), float(p.sum(axis=1).max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True
    ).stdout
    shape, low, high = out.rsplit("(", 1)[1].split(")")[0], *map(float, out.split(")")[1].split())
    assert shape == "64, 10"
    assert abs(low - 1) < 1e-4 and abs(high - 1) < 1e-4


def test_streams_shards_from_ray_data(ray_session, tmp_path: Path):
    """The path for shards too big for memory (``--data-path stream``), on 2 workers in step:
    2 epochs (the second pass re-reads the stream), then the model is evaluated like any run's."""
    run_dir = tmp_path / "streamed"
    assert train_main([*TINY, "--epochs", "2", "--data-path", "stream", "--output-dir", str(run_dir)]) == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    settings = json.loads((run_dir / "config.json").read_text())
    assert settings["train"]["data_path"] == "stream"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["count"] == 600


def test_the_model_compiles_with_xla(mnist_arrays):
    """--xla's training step (jit_compile) on this CPU, without augmentation: no op lacks an XLA kernel."""
    import tf_keras as keras

    from mnist_ray.model import build_model, compile_model

    keras.utils.set_random_seed(0)
    model = compile_model(build_model("cnn", dropout=0.25, augment=False), learning_rate=1e-3)
    model.jit_compile = True
    history = model.fit(mnist_arrays["x_train"][:256], mnist_arrays["y_train"][:256], batch_size=64,
                        epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--xla"], "--xla needs --no-augment"),
        (["--xla", "--no-augment", "--num-workers", "2"], "--xla on CPUs needs a single worker"),
        (["--mixed-precision"], "--mixed-precision needs --use-gpu"),
    ],
)
def test_flag_combinations_that_cannot_work_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data_path", "images", "workers_on_node", "expected"),
    [
        ("memory", 10**12, 1, True),  # forced, whatever the size
        ("stream", 10, 1, False),
        ("auto", 60_000, 2, True),  # MNIST: ~48 MB
        ("auto", 10**12, 1, False),  # ~800 TB: no machine has a quarter of that free
    ],
)
def test_data_path_choice(data_path, images, workers_on_node, expected):
    assert training.feeds_from_memory(data_path, images, workers_on_node) is expected


def test_trains_from_kaggle_csv_files(ray_session, tmp_path: Path, mnist_arrays):
    data = tmp_path / "csv"
    data.mkdir()
    x, y = mnist_arrays["x_train"][:800], mnist_arrays["y_train"][:800]
    write_kaggle_csv(data / "a.csv", x[:400], y[:400])
    write_kaggle_csv(data / "b.csv.gz", x[400:], y[400:], gz=True, shuffle_columns=True)
    run_dir = tmp_path / "from_csv"
    args = ["--data", str(data), "--batch-size", "32", "--epochs", "1", "--output-dir", str(run_dir)]
    assert train_main(args) == 0
    meta = json.loads((run_dir / "metadata.json").read_text())
    rows = meta["data"]["rows"]
    assert rows["train"] + rows["val"] + rows["test"] == 800
    assert meta["data"]["test_set"].startswith("held-out stratified")


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )


def test_bad_csv_is_refused_with_a_message_not_a_traceback(tmp_path: Path, mnist_arrays):
    bad = write_kaggle_csv(tmp_path / "train.csv", mnist_arrays["x_train"][:50], mnist_arrays["y_train"][:50])
    set_csv_cell(bad, 7, "pixel300", "12.5")
    result = run_job("--data", str(bad), "--epochs", "1", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error, result.stderr[-2000:]
    for part in (str(bad), "data row 7", "'pixel300'", "12.5"):
        assert part in error[0], (part, error[0])


def test_help_lists_every_documented_flag():
    out = run_job("--help").stdout
    for flag in ("--data", "--limit", "--epochs", "--batch-size", "--learning-rate", "--dropout", "--model",
                 "--augment", "--num-workers", "--use-gpu", "--output-dir", "--storage-path", "--resume",
                 "--seed", "--address", "--smoke-test", "--mixed-precision", "--xla", "--data-path"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "/no/such/train.csv"], "/no/such/train.csv: no such file or directory"),
        (["--data", "{empty}"], "matched no .csv or .csv.gz file"),
        (["--data", "bundled", "--test-data", "/no/such/test.csv"], "/no/such/test.csv"),
        (["--data", "/no/such/mnist.npz"], "/no/such/mnist.npz: no such file"),
    ],
)
def test_a_missing_input_is_refused_before_ray_starts(tmp_path: Path, flags, message):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    (tmp_path / "empty").mkdir()
    flags = [flag.format(empty=tmp_path / "empty") for flag in flags]
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), *flags, "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert list(ray_tmp.iterdir()) == []  # no Ray session was started for it
    assert not (tmp_path / "run").exists()


def test_latest_points_at_the_newest_run_of_the_runs_directory_only(tmp_path: Path):
    from mnist_ray import artifacts

    runs = tmp_path / "runs"
    first, second = artifacts.new_run_dir(runs), artifacts.new_run_dir(runs)
    for run in (first, second):
        artifacts.update_latest(run, runs)
    assert (runs / "latest").resolve() == second.resolve()
    elsewhere = tmp_path / "elsewhere" / "run"
    elsewhere.mkdir(parents=True)
    artifacts.update_latest(elsewhere, runs)
    assert not (elsewhere.parent / "latest").exists() and (runs / "latest").resolve() == second.resolve()


def test_a_tiny_ensemble_trains_its_members_and_averages_them(ray_session, tmp_path: Path, mnist_arrays,
                                                              capsys):
    run_dir = tmp_path / "ensemble"
    assert train_main(["--members", "2", "--model", "cnn", "--limit", "600", "--epochs", "1",
                       "--batch-size", "32", "--num-workers", "1", "--output-dir", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "member 1 (seed 1): selected epoch 1 of 1 by validation accuracy" in printed, printed
    assert "the ensemble averages the 2 members' probabilities" in printed
    meta = json.loads((run_dir / "metadata.json").read_text())
    members = meta["ensemble"]
    assert [(m["member"], m["seed"]) for m in members] == [(0, 0), (1, 1)]
    assert all(0 <= m["test_accuracy"] <= 1 for m in members)
    assert {h["member"] for h in json.loads((run_dir / "history.json").read_text())} == {0, 1}
    assert "Ensemble" in (run_dir / "report.html").read_text()
    # The saved model alone, without this package: its output is the mean of its members'.
    np.save(tmp_path / "probe.npy", mnist_arrays["x_test"][:32])
    code = (
        "import sys, numpy as np, tf_keras as keras\n"
        f"m = keras.models.load_model({str(run_dir / 'model.keras')!r}, safe_mode=True)\n"
        "assert 'mnist_ray' not in sys.modules\n"
        f"x = np.load({str(tmp_path / 'probe.npy')!r})\n"
        "mean = np.mean([m.get_layer(f'member_{k}').predict(x, verbose=0) for k in range(2)], axis=0)\n"
        "print(float(np.abs(m.predict(x, verbose=0) - mean).max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                         check=True).stdout
    assert float(out.split()[-1]) < 1e-6
    assert meta["onnx"]["argmax_agreement"] == 1.0  # the ONNX export of the ensemble, verified
    # and its int8 copy, measured on the same test images
    assert meta["onnx_int8"]["evaluated_on"] == meta["onnx"]["verified_on"]
    assert meta["onnx_int8"]["accuracy_float"] == pytest.approx(meta["test_metrics"]["accuracy"])
    assert "model.int8.onnx: test accuracy" in printed
