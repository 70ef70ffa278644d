"""The benchmarks run end to end in a tiny mode and write what they print. No timing is asserted:
these machines are shared and noisy; the benchmarks only measure, they never judge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

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
    assert "machine: " in out and "× the baseline's rows/s (a)" in out and "× its CPU time" in out
    payload = json.loads(results.read_text())
    assert payload["machine"]["cpus"] >= 1 and payload["machine"]["memory_gb"] > 0
    by_method = {row["method"]: row for row in payload["results"]}
    assert set(by_method) == {"jobs/score.py --executor local", "pandas + predict + parquet",
                              "pandas + onnxruntime + parquet", "onnxruntime predict only"}
    job = by_method["jobs/score.py --executor local"]
    assert job["executor"] == "local" and job["exit_codes"] == [0]
    assert by_method["onnxruntime predict only"]["rows_per_s"] > 0
    for name in ("jobs/score.py --executor local", "pandas + predict + parquet",
                 "pandas + onnxruntime + parquet"):
        row = by_method[name]
        assert row["rows"] == 300
        # Each figure is a measurement, not a placeholder: each process imported its runtime.
        assert row["seconds"] > 0 and row["peak_gb"] > 0.05 and row["cpu_seconds"] > 0.2
    # The job really scored the generated CSV: every row is in its Parquet output.
    [output] = (tmp_path / "work").glob("scored-300-*")
    assert len(pq.read_table(output / "predictions")) == 300


@pytest.mark.slow
@pytest.mark.extended
def test_training_benchmark_measures_workers_and_the_baseline(ray_head, tmp_path):
    # RAY_ADDRESS names the session's Ray: the benchmark starts a Ray of its own anyway (its CPU counts).
    results = tmp_path / "train.json"
    out = run_benchmark("train_throughput.py", "--images", "600", "--epochs", "2", "--workers", "1",
                        "--global-batch", "64", "--json", str(results), env=ray_head.env)
    assert "plain tf-keras model.fit" in out and "mnist_ray, 1 worker(s)" in out
    assert "RAY_ADDRESS is ignored" in out
    payload = json.loads(results.read_text())
    rows = {row["workers"]: row for row in payload["results"]}
    assert set(rows) == {0, 1} and rows[0]["ratio"] == 1.0
    assert rows[1]["images_per_s"] > 0
    assert rows[1]["ratio"] == rows[1]["images_per_s"] / rows[0]["images_per_s"]
    # Every run's own epochs (2 here) and how much CPU the host took from the machine meanwhile.
    for row in rows.values():
        (run,) = row["runs"]
        assert len(run["images_per_s"]) == 2 and 0.0 <= run["host_steal"] < 1.0
        # CPU time of the whole process tree over epoch 2: a measurement, not a placeholder.
        assert run["images_per_cpu_second"] > 0 and row["cpu_ratio"] > 0
    assert payload["train_images"] == 540 and payload["machine"]["cpus"] >= 1


@pytest.mark.slow
@pytest.mark.extended
def test_accuracy_benchmark_times_a_run_to_its_thresholds(ray_head, tmp_path):
    results = tmp_path / "accuracy.json"
    out = run_benchmark("accuracy.py", "--json", str(results), "--seed", "3", "--", "--model", "cnn",
                        "--limit", "600", "--epochs", "2", "--num-workers", "1", env=ray_head.env)
    assert "to 99.0%" in out
    (run,) = json.loads(results.read_text())["runs"]
    assert (run["seed"], run["members"], run["epochs"], run["configuration"]) == (3, 1, 2, "custom")
    assert 0 <= run["test_accuracy"] <= 1 and run["wall_seconds"] > 0
    # 600 images for 2 epochs reach none of the thresholds: recorded as never, not as a number.
    assert set(run["seconds_to_val_accuracy"].values()) == {None}


@pytest.mark.slow
def test_serving_benchmark_measures_serve_and_the_plain_server(tiny_onnx_run, tmp_path):
    results = tmp_path / "serve.json"
    out = run_benchmark("serve_load.py", "--model", str(tiny_onnx_run), "--tiny", "--json", str(results))
    assert "first answer" in out and "× the plain server's throughput" in out and "CPU per request" in out
    payload = json.loads(results.read_text())
    phases = {(p["server"], p["clients"]): p for p in payload["phases"]}
    servers = {"plain Starlette + uvicorn", "jobs/serve.py (Ray Serve)"}
    assert set(phases) == {(server, clients) for server in servers for clients in (1, 8, 32)}
    for phase in phases.values():
        assert phase["requests"] == 48 and phase["errors"] == 0 and phase["requests_per_s"] > 0
        assert phase["p50_ms"] <= phase["p99_ms"]
    # Each hop of Serve is found and measured (its processes carry the job's RAY_TMPDIR).
    hops = phases["jobs/serve.py (Ray Serve)", 8]["cpu_ms_per_request"]
    assert {"haproxy", "replica", "controller", "driver", "raylet", "gcs"} <= set(hops)
    assert hops["replica"] > 0  # HAProxy (found above) is the ingress: in C, it may take under a tick
    assert payload["fuzz"]["not_4xx"] == 0 and payload["fuzz"]["still_answers"]
    assert payload["start_to_first_answer_s"] > 0 and payload["exit_code"] == 143
