"""Training survives faults: a SIGKILLed Ray Train worker is replaced and the run goes on from its
latest checkpoint; a SIGKILLed driver is continued with ``--resume`` from its latest checkpoint.
Both finish with a valid model, and neither starts over from epoch 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mnist_ray import artifacts
from mnist_ray.cli import train_main

pytestmark = [pytest.mark.slow, pytest.mark.extended]
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
KILL_AFTER_EPOCH = 2
# Two failures allowed: the one injected here, and the spurious loss at shutdown that
# tests/test_training.py describes on an overloaded 2-core machine.
ARGS = ["--limit", "2000", "--model", "mlp", "--batch-size", "32", "--num-workers", "2",
        "--cpus-per-worker", "1", "--epochs", str(EPOCHS), "--max-failures", "2"]
TIMEOUT_S = 600  # a hang, not a slow machine: no timing is asserted


def latest_checkpoint_state(run_dir: Path) -> dict | None:
    """The state.json (epoch, history) of the newest checkpoint Ray Train has registered, if any.

    Registered, not merely written: rank 0 writes a checkpoint to storage before the controller
    has every worker's report of that epoch, and a restart resumes only from what the controller
    registered (its checkpoint manager's snapshot names it). Seen on a loaded machine: a node
    killed the moment epoch 2's state.json appeared, and the run started again from epoch 1.
    """
    states = []
    for snapshot in run_dir.rglob("checkpoint_manager_snapshot.json"):
        try:
            name = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
            states.append(json.loads((snapshot.parent / name / "state.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):  # being written, rotated away, none yet
            continue
    return max(states, key=lambda s: s["epoch"], default=None)


def wait_for_checkpoint(run_dir: Path, running: Callable[[], bool], deadline: float) -> dict | None:
    """The state of the first checkpoint of epoch KILL_AFTER_EPOCH or later, while the run is
    ``running`` and before ``deadline`` (time.monotonic()); None if none appeared."""
    while running() and time.monotonic() < deadline:
        state = latest_checkpoint_state(run_dir)
        if state and state["epoch"] >= KILL_AFTER_EPOCH:
            return state
        time.sleep(0.2)
    return None


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of this test's Ray (the session's, no other)."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return [a["Pid"] for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.setdefault("code", train_main([*ARGS, "--output-dir",
                                                                                 str(run_dir)])))
    job.start()
    deadline = time.monotonic() + TIMEOUT_S
    before_kill = wait_for_checkpoint(run_dir, job.is_alive, deadline)
    assert before_kill is not None, f"no checkpoint of epoch {KILL_AFTER_EPOCH} appeared ({outcome})"
    assert before_kill["epoch"] < EPOCHS, "the run finished before a worker could be killed"
    pids = train_worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    print(f"killed Ray Train worker pid {pids[-1]} after the checkpoint of epoch {before_kill['epoch']}")

    job.join(max(1, deadline - time.monotonic()))
    assert not job.is_alive(), "training did not finish after the worker was killed"
    assert outcome.get("code") == 0
    assert pids[-1] not in train_worker_pids()  # the dead worker is gone, not somehow still counted
    history = json.loads((run_dir / artifacts.HISTORY_JSON).read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    # Resumed, not restarted: the epochs before the checkpoint are the very records saved before
    # the kill (a restart from zero would have retrained them, with other losses and timings).
    # Not the checkpoint's own epoch: its files are on disk a moment before Ray Train registers
    # it, and a kill in that moment resumes from the one before (seen: "resuming from ... epoch 1").
    # Timings are left out: the restored record and the one read before the kill may come from
    # different workers' copies of the state.
    kept = before_kill["epoch"] - 1
    assert kept >= 1 and [_learning(h) for h in history[:kept]] == [
        _learning(h) for h in before_kill["history"][:kept]]
    model = artifacts.load_model(run_dir)
    probs = model.predict(np.zeros((2, 28, 28), np.uint8), verbose=0)
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    metrics = json.loads((run_dir / artifacts.METRICS_FILE).read_text())
    assert metrics["accuracy"] > 0.5


def _learning(record: dict) -> dict:
    """An epoch's record without its timings (images_per_s, epoch_seconds, wall_time)."""
    return {k: v for k, v in record.items() if k not in ("images_per_s", "epoch_seconds", "wall_time")}


def test_a_killed_driver_is_resumed_from_its_last_checkpoint(ray_head, tmp_path):
    """``kill -9`` of the job itself (its Ray Train run dies with it); the same command with
    ``--resume`` continues from the last checkpoint on the same cluster and finishes."""
    run_dir = tmp_path / "run"
    train = [sys.executable, "-u", str(REPO / "jobs" / "train.py")]
    with open(tmp_path / "first.log", "w") as log:
        job = subprocess.Popen([*train, *ARGS, "--output-dir", str(run_dir)], cwd=REPO, env=ray_head.env,
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    before_kill = wait_for_checkpoint(run_dir, lambda: job.poll() is None, deadline)
    job.kill()
    job.wait(timeout=60)
    first_log = (tmp_path / "first.log").read_text()
    assert before_kill is not None, f"no checkpoint of epoch {KILL_AFTER_EPOCH} appeared: {first_log[-3000:]}"
    assert before_kill["epoch"] < EPOCHS, "the run finished before its driver could be killed"
    assert not (run_dir / artifacts.METADATA_FILE).exists()  # an unfinished run, as a user finds it

    resumed = subprocess.run([*train, "--resume", str(run_dir)], cwd=REPO, env=ray_head.env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resuming {run_dir}" in resumed.stdout
    history = json.loads((run_dir / artifacts.HISTORY_JSON).read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    # The epochs before the kill are the records saved then, not retrained ones (see above
    # for why the checkpoint's own epoch and the timings are left out).
    kept = before_kill["epoch"] - 1
    assert kept >= 1 and [_learning(h) for h in history[:kept]] == [
        _learning(h) for h in before_kill["history"][:kept]]
    assert artifacts.check_scoring_run(run_dir)["config"]["train"]["epochs"] == EPOCHS
