"""The benchmarks run end to end in a tiny mode and write what they print. No timing is asserted:
these machines are shared and noisy; the benchmarks only measure, they never judge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_scoring_benchmark_measures_the_job_and_the_baseline(tiny_run, tmp_path):
    results = tmp_path / "score.json"
    out = run_benchmark("score_throughput.py", "--model", str(tiny_run), "--rows", "300", "--jobs", "local",
                        "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--json", str(results))
    assert "machine: " in out and "× the baseline's rows/s" in out and "× its CPU time" in out
    payload = json.loads(results.read_text())
    assert payload["machine"]["cpus"] >= 1 and payload["machine"]["memory_gb"] > 0
    by_method = {row["method"]: row for row in payload["results"]}
    assert set(by_method) == {"jobs/score.py --executor local", "pandas + predict + parquet"}
    job = by_method["jobs/score.py --executor local"]
    assert job["executor"] == "local" and job["exit_codes"] == [0]
    for row in by_method.values():
        assert row["rows"] == 300
        # Each figure is a measurement, not a placeholder: both processes imported TensorFlow.
        assert row["seconds"] > 0 and row["peak_gb"] > 0.1 and row["cpu_seconds"] > 1
    # The job really scored the generated CSV: every row is in its Parquet output.
    [output] = (tmp_path / "work").glob("scored-300-*")
    assert len(pq.read_table(output / "predictions")) == 300


def test_training_benchmark_measures_workers_and_the_baseline(ray_head, tmp_path):
    # The job connects to the module's Ray head (RAY_ADDRESS in its environment), not a Ray of its own.
    results = tmp_path / "train.json"
    out = run_benchmark("train_throughput.py", "--images", "600", "--epochs", "2", "--workers", "1",
                        "--global-batch", "64", "--json", str(results), env=ray_head.env)
    assert "plain tf-keras model.fit" in out and "mnist_ray, 1 worker(s)" in out
    payload = json.loads(results.read_text())
    rows = {row["workers"]: row for row in payload["results"]}
    assert set(rows) == {0, 1} and rows[0]["ratio"] == 1.0
    assert rows[1]["images_per_s"] > 0
    assert rows[1]["ratio"] == rows[1]["images_per_s"] / rows[0]["images_per_s"]
    # Every run's own epochs (2 here) and how much CPU the host took from the machine meanwhile.
    for row in rows.values():
        (run,) = row["runs"]
        assert len(run["images_per_s"]) == 2 and 0.0 <= run["host_steal"] < 1.0
    assert payload["train_images"] == 540 and payload["machine"]["cpus"] >= 1
