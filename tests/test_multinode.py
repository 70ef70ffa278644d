"""A real two-node Ray cluster on this machine: train with workers spread over both nodes, then score.

The head (2 CPUs) and a second node (1 CPU) are separate ``ray start`` processes on
127.0.0.1, each with its own ports and temp dir, with token authentication on. The head
alone could hold both 1-CPU training workers (PACK would put them there): only the SPREAD
placement puts them on two nodes, so the test sees the flag work, not just a lack of room. Both
jobs go in through ``ray job submit``, as on a real cluster (cluster/README.md).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mnist_ray.local_cluster import RAY, LocalRayCluster
from tests.helpers import write_kaggle_csv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCORE_DATE = "2026-11-22"
SCORED_ROWS = 300


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalRayCluster(num_cpus=2)
    try:
        cluster.start_head()
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.extended
def test_two_workers_train_on_two_nodes_and_the_model_scores(
    two_nodes: LocalRayCluster, tmp_path: Path, mnist_arrays
):
    # Every node sees this machine's /tmp: here it stands in for the shared storage
    # (NFS, a mounted bucket) that cluster/README.md requires for run and output directories.
    run_dir = tmp_path / "runs" / "multinode"
    train = two_nodes.submit(
        "python", "jobs/train.py", "--limit", "2000", "--epochs", "1", "--num-workers", "2",
        "--cpus-per-worker", "1", "--placement-strategy", "SPREAD", "--output-dir", str(run_dir),
        working_dir=REPO, timeout=600,
    )
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-4000:]
    assert "succeeded" in train.stdout

    # Where Ray says the Ray Train workers ran (the actors are dead by now, but still listed).
    worker_nodes = [a["node_id"] for a in two_nodes.list_state("actors", "class_name=RayTrainWorker")]
    assert len(worker_nodes) == 2, worker_nodes  # one worker group, no restarts
    assert len(set(worker_nodes)) == 2, f"both workers ran on node {worker_nodes[0]}"
    assert set(worker_nodes) == {n["node_id"] for n in two_nodes.list_state("nodes", "state=ALIVE")}
    # The job log names the same nodes: what a user reads to see where the workers ran.
    printed = dict(re.findall(r"worker (\d) of 2 on node ([0-9a-f]+)", log))
    assert set(printed.values()) == set(worker_nodes), printed

    for name in ("model.keras", "metadata.json", "metrics.json", "history.json", "config.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["train"]["placement_strategy"] == "SPREAD"

    (tmp_path / "incoming").mkdir()
    digits = write_kaggle_csv(tmp_path / "incoming" / "digits.csv",
                              mnist_arrays["x_test"][:SCORED_ROWS], mnist_arrays["y_test"][:SCORED_ROWS])
    scored = tmp_path / "scored"
    score = two_nodes.submit(
        "python", "jobs/score.py", "--model", str(run_dir), "--input", str(digits), "--output", str(scored),
        "--date", SCORE_DATE, working_dir=REPO, timeout=600,
    )
    assert score.returncode == 0, (score.stdout + score.stderr)[-4000:]

    parts = sorted((scored / "predictions" / f"date={SCORE_DATE}").glob("part-*.parquet"))
    assert parts, sorted(p.relative_to(scored) for p in scored.rglob("*"))
    assert sum(pq.read_metadata(p).num_rows for p in parts) == SCORED_ROWS
    (batch_dir,) = (scored / "batches").iterdir()
    assert (batch_dir / "_SUCCESS").is_file()
    summary = json.loads((batch_dir / "summary.json").read_text())
    assert summary["total"]["scored"] == SCORED_ROWS
    # A small input, but a submitted job has $RAY_ADDRESS: it scores on the cluster, not in its driver.
    assert summary["executor"] == "ray"
    assert len((scored / "_manifest.jsonl").read_text().splitlines()) == 1


def test_the_job_api_refuses_a_client_without_the_token(two_nodes: LocalRayCluster):
    """Token authentication is really on: the same request without the token is refused."""
    assert two_nodes.cli("job", "list").returncode == 0
    anonymous = two_nodes.client_env | {"RAY_AUTH_MODE": "disabled"}
    del anonymous["RAY_AUTH_TOKEN"]
    refused = subprocess.run([RAY, "job", "list"], env=anonymous, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "nauthorized" in refused.stdout + refused.stderr, (
        refused.stdout + refused.stderr)[-2000:]
