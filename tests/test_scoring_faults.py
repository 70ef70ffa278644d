"""Scoring under faults: an inference actor SIGKILLed while the job is scoring.

Ray Data restarts the actor and runs its lost batch again; the job must still account
for every input row exactly once — no row twice, none lost — and exit as if nothing
happened. The job runs in this process on the test session's Ray, with a real tiny
model and real CSV files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time

import pandas as pd
import pytest

from mnist_ray.cli import score_main
from mnist_ray.errors import EXIT_OK
from mnist_ray.score.audit import audit
from tests.helpers import write_kaggle_csv

pytestmark = pytest.mark.slow
FILES, ROWS_PER_FILE = 4, 2500
TIMEOUT_S = 600  # a hang, not a slow machine: no timing is asserted


def predictor_actors() -> dict[str, int]:
    """Live inference actors of the session's Ray: actor id → pid."""
    from ray._private import state

    return {
        actor_id: a["Pid"]
        for actor_id, a in state.actors(actor_state_name="ALIVE").items()
        if "Predictor" in a["ActorClassName"] and a["Pid"]
    }


def test_a_killed_inference_actor_loses_no_row_and_scores_none_twice(
    ray_session, tiny_run, mnist_arrays, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(FILES):
        first = k * ROWS_PER_FILE
        write_kaggle_csv(inputs / f"day_{k}.csv", mnist_arrays["x_test"][first:first + ROWS_PER_FILE],
                         mnist_arrays["y_test"][first:first + ROWS_PER_FILE])
    output = tmp_path / "out"
    outcome: dict = {}

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            outcome["code"] = score_main(["--model", str(tiny_run), "--input", str(inputs), "--output",
                                          str(output), "--date", "2026-11-22", "--batch-size", "64",
                                          "--concurrency", "2", "--executor", "ray"])
        outcome["stdout"] = out.getvalue()

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + TIMEOUT_S
    actors: dict[str, int] = {}
    while job.is_alive() and time.monotonic() < deadline and not actors:
        actors = predictor_actors()
        time.sleep(0.1)
    assert actors, f"no inference actor came up ({outcome})"
    time.sleep(1.0)  # let it take a batch: its model is loaded within about a second
    victim_id, victim_pid = next(iter(actors.items()))
    os.kill(victim_pid, signal.SIGKILL)
    killed_while_running = job.is_alive()

    job.join(max(1, deadline - time.monotonic()))
    assert not job.is_alive(), "scoring did not finish after an actor was killed"
    assert killed_while_running, "the job ended before the actor was killed: make the input larger"
    assert outcome.get("code") == EXIT_OK, outcome.get("stdout", "")[-3000:]
    # The killed actor is gone; Ray Data did not count it as live.
    assert predictor_actors().get(victim_id) != victim_pid

    (batch_dir,) = (output / "batches").iterdir()
    total = json.loads((batch_dir / "summary.json").read_text())["total"]
    assert (total["rows_in"], total["scored"], total["rejected"]) == (FILES * ROWS_PER_FILE,) * 2 + (0,)
    frame = pd.read_parquet(output / "predictions", columns=["source", "row", "label", "predicted"])
    assert len(frame) == FILES * ROWS_PER_FILE
    assert not frame.duplicated(["source", "row"]).any()
    for source, rows in frame.groupby("source")["row"]:
        assert sorted(rows) == list(range(1, ROWS_PER_FILE + 1)), source
    # Each row's prediction is the one for its own image: the labels came through in step.
    k = frame["source"].str.extract(r"day_(\d+)\.csv$")[0].astype(int)
    image_index = k * ROWS_PER_FILE + frame["row"] - 1
    assert (frame["label"].to_numpy() == mnist_arrays["y_test"][image_index.to_numpy()]).all()
    assert audit(output) == []
