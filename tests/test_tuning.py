"""Ray Tune search: real trials (Ray Train runs) on a tiny subset, interrupted, resumed, retrained.

One search serves the slow tests, to keep them within a few minutes on 2 cores: it
is interrupted with Ctrl+C (SIGINT) once its second trial has finished, resumed with
``--resume``, and its best configuration retrained with ``--retrain-best``. The
learning-rate range reaches absurd values (up to 1000) so that ASHA, with a grace
period of 2 epochs out of 3, has a trial to stop: with seed 14 the trials sample
~0.008, ~76 (which diverges) and ~0.24. ASHA decides on the second trial before the
interruption, against the first trial's record: Tune does not restore a scheduler's
state on resume.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mnist_ray import artifacts
from mnist_ray.cli import tune_parser
from mnist_ray.config import SearchSpace
from mnist_ray.errors import EXIT_INTERRUPTED
from mnist_ray.local_cluster import LocalRayCluster
from mnist_ray.tune import results as tune_results

REPO = Path(__file__).resolve().parents[1]
EPOCHS, GRACE, TRIALS = 3, 2, 3
# Each trial is a real 2-worker Ray Train run (1 CPU per worker), one trial at a time on 2 CPUs.
SEARCH = ["--limit", "600", "--batch-size", "32", "--epochs", str(EPOCHS), "--grace-period", str(GRACE),
          "--reduction-factor", "2", "--num-samples", str(TRIALS), "--lr-range", "1e-5", "1000",
          "--seed", "14", "--workers-per-trial", "2", "--cpus-per-worker", "1",
          "--max-concurrent-trials", "1", "--max-failures", "1"]
# ~1.5 (from a range up to 3) did not diverge with these settings; ~37 did.
SPACE = SearchSpace(learning_rate=(1e-5, 1000.0))
ABSURD_LEARNING_RATE = 10.0
JOB_TIMEOUT_S = 600


def tune_job(head: LocalRayCluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", str(REPO / "jobs" / "tune.py"), *args],
        cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(job: subprocess.Popen, marker: str | None) -> tuple[list[str], str | None]:
    """The job's output lines up to the first line containing ``marker`` (all of it if None)."""
    watchdog = threading.Timer(JOB_TIMEOUT_S, job.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in job.stdout:
            lines.append(line)
            if marker is not None and marker in line:
                return lines, line
    finally:
        watchdog.cancel()
    return lines, None


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_head) -> dict:
    out = tmp_path_factory.mktemp("tune") / "search"
    first = tune_job(ray_head, *SEARCH, "--output-dir", str(out))
    lines, finished = read_until(first, " finished after ")
    assert finished is not None, "".join(lines)[-5000:]
    more, absurd_finished = read_until(first, " finished after ")
    lines += more
    assert absurd_finished is not None, "".join(lines)[-5000:]
    # Ctrl+C once two trials have finished: the resumed run has the third one left.
    first.send_signal(signal.SIGINT)
    rest, _ = read_until(first, None)
    first_output = "".join(lines + rest)
    first_rc = first.wait(timeout=120)
    results_after_interrupt = (out / tune_results.LEADERBOARD_CSV).exists()

    second = tune_job(ray_head, "--resume", str(out), "--retrain-best")
    second_lines, _ = read_until(second, None)
    second_output = "".join(second_lines)
    assert second.wait(timeout=120) == 0, second_output[-5000:]
    return {
        "out": out,
        "first_output": first_output,
        "first_rc": first_rc,
        "results_after_interrupt": results_after_interrupt,
        "finished_line": finished,
        "second_output": second_output,
        "board": pd.read_csv(out / tune_results.LEADERBOARD_CSV),
    }


@pytest.mark.slow
@pytest.mark.extended
def test_interrupted_search_says_how_to_resume(search):
    assert search["first_rc"] == EXIT_INTERRUPTED, search["first_output"][-3000:]
    assert f"--resume {search['out']}" in search["first_output"]
    assert not search["results_after_interrupt"]  # no leaderboard of a half-done search


@pytest.mark.slow
@pytest.mark.extended
def test_resume_keeps_the_finished_trial(search):
    # "trial <id> finished after 3 epochs: best val_acc 0.7167"
    words = search["finished_line"].split()
    trial_id, val_acc = words[1], float(words[-1])
    assert f"trial {trial_id} started" not in search["second_output"]  # not run again
    row = search["board"].set_index("trial").loc[trial_id]
    assert row["best_val_accuracy"] == pytest.approx(val_acc, abs=1e-4)
    assert row["epochs_run"] == EPOCHS


@pytest.mark.slow
@pytest.mark.extended
def test_leaderboard_has_every_trial(search):
    board = search["board"]
    assert len(board) == TRIALS and board["trial"].is_unique
    assert list(board["rank"]) == [1, 2, 3]
    assert board["best_val_accuracy"].is_monotonic_decreasing
    assert set(board["stopped_early"]) <= {tune_results.RAN_ALL_EPOCHS, tune_results.STOPPED_BY_ASHA,
                                          tune_results.STOPPED_BY_PATIENCE}
    markdown = (search["out"] / tune_results.LEADERBOARD_MD).read_text()
    for trial in board["trial"]:
        assert f"| {trial} |" in markdown
    assert (search["out"] / tune_results.PLOT_FILE).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.extended
def test_best_config_lies_in_the_space_and_tops_the_leaderboard(search):
    best = json.loads((search["out"] / tune_results.BEST_CONFIG_FILE).read_text())
    assert SPACE.contains(best)
    top = search["board"].iloc[0]
    assert best["trial"] == top["trial"]
    assert best["val_accuracy"] == pytest.approx(top["best_val_accuracy"])
    assert 1 <= best["best_epoch"] <= EPOCHS
    assert best["train"]["learning_rate"] == best["learning_rate"]


@pytest.mark.slow
@pytest.mark.extended
def test_asha_stops_the_trial_with_an_absurd_learning_rate(search):
    board = search["board"]
    absurd = board[board["learning_rate"] > ABSURD_LEARNING_RATE]
    assert len(absurd) >= 1, board
    assert (absurd["stopped_early"] == tune_results.STOPPED_BY_ASHA).all(), board
    assert (absurd["epochs_run"] == GRACE).all(), board
    assert "stopped by ASHA" in search["first_output"]


@pytest.mark.slow
@pytest.mark.extended
def test_retrained_best_model_is_a_run_that_scoring_accepts(search, mnist_arrays):
    run_dir = search["out"] / tune_results.BEST_MODEL_DIR
    best = json.loads((search["out"] / tune_results.BEST_CONFIG_FILE).read_text())
    metadata = artifacts.check_scoring_run(run_dir)
    assert metadata["config"]["fit_on_validation"] is True
    assert metadata["config"]["train"]["epochs"] == best["best_epoch"]
    assert metadata["config"]["train"]["learning_rate"] == best["learning_rate"]
    history = json.loads((run_dir / artifacts.HISTORY_JSON).read_text())
    assert [h["epoch"] for h in history] == list(range(1, best["best_epoch"] + 1))
    metrics = json.loads((run_dir / artifacts.METRICS_FILE).read_text())
    assert metrics["count"] == 600 and 0.0 <= metrics["accuracy"] <= 1.0
    proba = artifacts.load_model(run_dir).predict(mnist_arrays["x_test"][:16], verbose=0)
    assert proba.shape == (16, 10) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.extended
def test_the_search_and_its_retrained_model_are_tracked(search):
    """The resumed search logs itself (a child run per trial, from the driver's results) and registers
    its retrained model, into the session's MLflow store (tests/conftest.py)."""
    from mnist_ray.registry.tracking import TUNING_EXPERIMENT, Tracking, client

    output = search["second_output"]
    assert "tracking: search logged as MLflow run " in output and f"with {TRIALS} trial run(s)" in output
    assert "(alias challenger)" in output, output[-3000:]
    mlflow = client(Tracking.from_env())
    experiment = mlflow.get_experiment_by_name(TUNING_EXPERIMENT).experiment_id
    (parent,) = [r for r in mlflow.search_runs([experiment], f"tags.output_dir = '{search['out']}'")]
    children = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(search["board"]["trial"])
    assert all(len(mlflow.get_metric_history(r.info.run_id, "val_accuracy")) >= 1 for r in children)
    retrained = str(search["out"] / tune_results.BEST_MODEL_DIR)
    versions = mlflow.search_model_versions("name = 'mnist-digits'")
    assert [v for v in versions if v.tags["run_dir"] == retrained]


# --- without Ray ---------------------------------------------------------------------------------------


def history(epochs: int, *, done_at_end: bool) -> pd.DataFrame:
    rows = [{"epoch": e, "val_accuracy": 0.5 + 0.1 * e, "done": False, "time_total_s": 10.0 * e}
            for e in range(1, epochs + 1)]
    rows[-1]["done"] = done_at_end
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("epochs", "done_at_end", "failed", "expected"),
    [
        (5, True, False, tune_results.RAN_ALL_EPOCHS),
        (2, True, False, tune_results.STOPPED_BY_ASHA),
        (3, False, False, tune_results.STOPPED_BY_PATIENCE),
        (2, False, True, tune_results.FAILED),
    ],
)
def test_trial_row_says_how_the_trial_ended(epochs, done_at_end, failed, expected):
    row = tune_results.trial_row("t1", {"dropout": 0.2, "learning_rate": 1e-3},
                                 history(epochs, done_at_end=done_at_end), max_epochs=5, failed=failed)
    assert row.stopped_early == expected
    assert row.epochs_run == epochs and row.best_epoch == epochs
    assert row.best_val_accuracy == pytest.approx(0.5 + 0.1 * epochs)


def test_trial_without_results_ranks_last():
    rows = [
        tune_results.trial_row("empty", {"dropout": 0.2, "learning_rate": 1e-3}, None, max_epochs=5,
                               failed=True),
        tune_results.trial_row("ok", {"dropout": 0.3, "learning_rate": 2e-3}, history(5, done_at_end=True),
                               max_epochs=5, failed=False),
    ]
    board = tune_results.leaderboard(rows)
    assert list(board["trial"]) == ["ok", "empty"]
    assert math.isnan(board.loc[1, "best_val_accuracy"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr-range", "1e-2", "1e-4"], "learning-rate range"),
        (["--dropout-range", "0.2", "1.5"], "dropout range"),
        (["--reduction-factor", "1"], "--reduction-factor"),
        (["--xla"], "--xla needs --no-augment"),
    ],
)
def test_bad_search_flags_exit_2_with_a_message(flags, message, capsys):
    from mnist_ray.cli import tune_main

    with pytest.raises(SystemExit) as exc:
        tune_main(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_documented_flag():
    text = tune_parser().format_help()
    for flag in ("--dropout-range", "--lr-range", "--num-samples", "--max-concurrent-trials",
                 "--workers-per-trial", "--use-gpu", "--epochs", "--output-dir", "--storage-path", "--data",
                 "--limit", "--seed",
                 "--grace-period", "--search", "--retrain-best", "--resume", "--address", "--smoke-test",
                 "--xla", "--data-path"):
        assert flag in text, flag
    assert "--learning-rate" not in text and "--dropout " not in text  # sampled, not set
