"""End to end: `ray job submit` of the real job script to a real Ray head on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnist_ray.local_cluster import LocalRayCluster

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
