"""End to end: `ray job submit` of the real job script to a real Ray head on 127.0.0.1, and a
job given the address of a cluster that is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_ray.local_cluster import LocalRayCluster, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# ray_head: a Ray head of this module's own (tests/conftest.py).


def test_ray_job_submit_trains_and_writes_the_run_directory(ray_head: LocalRayCluster, tmp_path: Path):
    run_dir = tmp_path / "submitted"
    result = ray_head.submit(
        "python", "jobs/train.py", "--smoke-test", "--output-dir", str(run_dir), working_dir=REPO
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout
    assert "test accuracy" in result.stdout  # the job's summary reaches the submitter
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["count"] == 2000
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["config"]["train"]["num_workers"] == 2
    assert (run_dir / "model.keras").is_file()


def test_a_failing_job_is_reported_as_failed(ray_head: LocalRayCluster, tmp_path: Path):
    result = ray_head.submit(
        "python", "jobs/train.py", "--data", str(tmp_path / "missing.csv"), working_dir=REPO, timeout=300
    )
    assert result.returncode != 0
    assert "missing.csv" in result.stdout + result.stderr


def test_an_address_where_nothing_listens_is_one_line_at_once(tmp_path: Path):
    address = f"127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    # Without the check Ray retries such an address silently for more than ten minutes.
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--smoke-test", "--address", address,
         "--output-dir", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: could not reach the Ray cluster at {address}: "
        f"nothing listens at {address} (connection refused)"
    ]
    assert not (tmp_path / "run").exists()
