"""Scoring throughput and peak memory: jobs/score.py against a plain single-process baseline.

    python benchmarks/score_throughput.py --model runs/latest --rows 100000 1000000 [--repeats N]

For each size, writes an unlabelled Kaggle CSV of that many MNIST test images
(the 10,000 repeated), then runs, each in a fresh process, ``--repeats`` times in turn
(the figures are medians):

* ``jobs/score.py`` as a nightly cron run on one machine does (``--jobs auto``): it picks
  where to score (``--executor auto``: in its own process up to 256 MB of input, else a
  Ray it starts); the executor it picked is printed beside the figures;
* ``jobs/score.py --executor ray`` (``--jobs ray``): always through Ray Data, on a Ray it starts;
* ``jobs/score.py --executor local`` (``--jobs local``): always in its own process;
* ``jobs/score.py --int8`` (``--jobs int8``): as cron runs it, with the model's int8 copy
  (``model.int8.onnx``); its own model-bound limit (c8) is then measured too;
* ``jobs/score.py --address`` against a Ray that is already running, as a job submitted to
  a cluster is (``--jobs running``: a ``ray start`` head on 127.0.0.1, started once, with
  the machine's CPUs, token authentication on);
* (a) the baseline, what a user writes today: ``pandas.read_csv`` + tf-keras
  ``model.predict`` + ``DataFrame.to_parquet``;
* (b) the same with onnxruntime (the run's model.onnx, threads left to onnxruntime) instead
  of TensorFlow;
* (c) onnxruntime's predict-only rate on preloaded arrays (the same images, batch 1,024, a
  session as the job's in-process path makes it): the model-bound limit of this machine,
  timed around the predictions alone.

Every 0.5 s (0.1 s in a run's first 2 s) it sums the proportional set size (PSS: shared pages counted once,
from Linux's ``/proc/<pid>/smaps_rollup``) of each run's whole process tree (for
the job: driver, Ray's daemons, read tasks and actors; against a running Ray, the
job's driver and all of that Ray's processes) and reports the peak, and it counts
the CPU time (user + system) of the same processes: on a shared machine, whose
wall times vary ±20 % from run to run, the steadier measure of the work done. Wall
time includes start-up (Ray, TensorFlow imports) for both. It prints a table and
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import describe, machine, processes, trees, write_results  # noqa: E402

from mnist_ray.data.csv_reader import write_kaggle_csv  # noqa: E402
from mnist_ray.data.sources import BUNDLED_MNIST  # noqa: E402
from mnist_ray.local_cluster import LocalRayCluster  # noqa: E402

# The job's flags in each mode (``running`` adds the running Ray's address), and its name in the tables.
JOB_FLAGS = {
    "auto": [], "ray": ["--executor", "ray"], "local": ["--executor", "local"], "int8": ["--int8"],
    "running": ["--address"],
}
JOBS = {mode: " ".join(["jobs/score.py", *flags]) for mode, flags in JOB_FLAGS.items()}
BASELINE_NAME = "pandas + predict + parquet"
ONNX_BASELINE_NAME = "pandas + onnxruntime + parquet"
PREDICT_ONLY_NAME = "onnxruntime predict only"
INT8_PREDICT_ONLY_NAME = "onnxruntime int8 predict only"
BASELINE = """
import sys, numpy as np, pandas as pd
import mnist_ray
from mnist_ray import artifacts
from mnist_ray.data.schema import PIXEL_COLUMNS
csv, run_dir, destination = sys.argv[1:]
frame = pd.read_csv(csv, dtype=np.uint8)
images = frame[PIXEL_COLUMNS].to_numpy().reshape(-1, 28, 28)
del frame
probs = artifacts.load_model(run_dir).predict(images, batch_size=1024, verbose=0)
columns = {"row": np.arange(1, len(images) + 1), "predicted": probs.argmax(axis=1)}
columns.update({"confidence": probs.max(axis=1), **{f"prob_{k}": probs[:, k] for k in range(10)}})
pd.DataFrame(columns).to_parquet(destination)
"""
ONNX_BASELINE = """
import sys, numpy as np, pandas as pd, onnxruntime as ort
csv, run_dir, destination = sys.argv[1:]
session = ort.InferenceSession(f"{run_dir}/model.onnx", providers=["CPUExecutionProvider"])
frame = pd.read_csv(csv, dtype=np.uint8)
images = frame[[f"pixel{k}" for k in range(784)]].to_numpy().reshape(-1, 28, 28)
del frame
probs = np.concatenate([session.run(["probs"], {"pixels": images[i:i + 1024]})[0]
                        for i in range(0, len(images), 1024)])
columns = {"row": np.arange(1, len(images) + 1), "predicted": probs.argmax(axis=1)}
columns.update({"confidence": probs.max(axis=1), **{f"prob_{k}": probs[:, k] for k in range(10)}})
pd.DataFrame(columns).to_parquet(destination)
"""
PREDICT_ONLY = """
import sys, time, numpy as np
from mnist_ray import onnx_model
from mnist_ray.data.sources import BUNDLED_MNIST
run_dir, rows, model_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with np.load(BUNDLED_MNIST) as npz:
    images = np.resize(npz["x_test"], (rows, 28, 28))
with open(f"{run_dir}/{model_file}", "rb") as f:
    session = onnx_model.session(f.read(), threads=None)
onnx_model.predict(session, images[:1024], 1024)  # warm-up
started = time.perf_counter()
onnx_model.predict(session, images, 1024)
print(rows / (time.perf_counter() - started))
"""


def make_input(path: Path, rows: int) -> None:
    """An unlabelled Kaggle CSV of ``rows`` MNIST test images (repeated as needed)."""
    if path.exists():
        return
    with np.load(BUNDLED_MNIST) as npz:
        images = npz["x_test"]
    repeats = -(-rows // len(images))
    write_kaggle_csv(path, np.tile(images, (repeats, 1, 1))[:rows])


def run_measured(
    command: list[str], env: dict[str, str] | None = None, also: Sequence[int] = ()
) -> tuple[float, float, float, int]:
    """(wall seconds, peak PSS in GB, CPU seconds, exit code) of ``command``.

    The PSS is of its process tree and of the trees of the processes ``also`` (a running
    Ray's nodes). The CPU seconds (user + system) are the command's own, exact (``wait4``),
    plus each other process's of those trees as last sampled (a process that ends between
    two samples loses at most 0.5 s of its count; a running Ray's CPU before the command
    started is subtracted).
    """
    started = time.monotonic()
    at_start = processes()
    before = {pid: at_start[pid][1] for pid in trees(also, at_start) if pid in at_start}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    peak, cpu = 0, {}
    while True:
        now = processes()
        pids = trees([process.pid, *also], now)
        peak = max(peak, sum(_pss_bytes(pid) for pid in pids))
        cpu.update({pid: now[pid][1] for pid in pids - {process.pid} if pid in now})
        # Reaps the command when it has ended, with its exact resource usage.
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            break
        # Often at first: a short run (the small baselines end in ~0.5 s) would otherwise be sampled
        # once, before it had imported anything (seen: a peak of 2.5 MB).
        time.sleep(0.1 if time.monotonic() - started < 2 else 0.5)
    others = sum(seconds - before.get(pid, 0.0) for pid, seconds in cpu.items())
    return (time.monotonic() - started, peak / 1e9, usage.ru_utime + usage.ru_stime + others,
            process.returncode)


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass  # the process ended meanwhile
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/latest", help="the run directory to score with")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=["auto", "ray", "running"],
                        help="the job's runs to measure: as cron runs it (auto), always on a Ray it starts "
                        "(ray), always in its own process (local), as cron runs it with the int8 copy "
                        "(int8), on a Ray already running (running)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method per size (medians)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mnist_ray_bench"))
    parser.add_argument("--concurrency", type=int, default=None,
                        help="inference actors of the job (default: the job's own, as many as fit)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(describe(info), flush=True)
    cluster = None
    if "running" in args.jobs:
        cluster = LocalRayCluster(num_cpus=os.cpu_count() or 1)
        cluster.start_head()
    try:
        results = measure(args, cluster)
    finally:
        if cluster is not None:
            cluster.stop()
    print()
    for rows in args.rows:
        by_method = {r["method"]: r for r in results if r["rows"] == rows}
        base, onnx_base = by_method[BASELINE_NAME], by_method[ONNX_BASELINE_NAME]
        limit = by_method[PREDICT_ONLY_NAME]
        for mode in args.jobs:
            job = by_method[JOBS[mode]]
            int8_limit = by_method.get(INT8_PREDICT_ONLY_NAME) if mode == "int8" else None
            own_limit = f", {job['rows_per_s'] / int8_limit['rows_per_s']:.2f}× (c8)" if int8_limit else ""
            print(f"{rows:>10,} rows: {JOBS[mode]} at {job['rows_per_s'] / base['rows_per_s']:.2f}× the "
                  f"baseline's rows/s (a), {job['rows_per_s'] / onnx_base['rows_per_s']:.2f}× (b)'s, "
                  f"{job['rows_per_s'] / limit['rows_per_s']:.2f}× (c), the model-bound limit{own_limit}; "
                  f"{job['peak_gb'] / base['peak_gb']:.2f}× (a)'s peak memory, "
                  f"{job['cpu_seconds'] / base['cpu_seconds']:.2f}× its CPU time")
    for mode in args.jobs:
        peaks = sorted((r["rows"], r["peak_gb"]) for r in results if r["method"] == JOBS[mode])
        # Flat memory: each size's peak against the next smaller size's.
        for (small, small_peak), (large, large_peak) in zip(peaks, peaks[1:], strict=False):
            print(f"{JOBS[mode]}: peak memory at {large:,} rows is {large_peak / small_peak:.2f}× "
                  f"that at {small:,} rows")
    payload = {"machine": info, "concurrency": args.concurrency, "repeats": args.repeats, "results": results}
    print(f"results: {write_results('score_throughput', payload, args.json)}")
    return 0


def measure(args: argparse.Namespace, cluster: LocalRayCluster | None) -> list[dict]:
    """Run every method on every size, the methods in turn ``--repeats`` times; print a row per run;
    return a row per size and method, with the medians."""
    print(f"{'rows':>10}  {'method':<30} {'seconds':>8} {'rows/s':>8} {'peak GB':>8} {'CPU s':>7}  "
          "exit  executor")
    results = []
    for rows in args.rows:
        csv = args.work_dir / f"digits-{rows}.csv"
        make_input(csv, rows)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for name, (command, env, also, output) in _commands(args, cluster, csv, rows).items():
                seconds, peak, cpu, code = run_measured(command, env, also)
                run = {"seconds": seconds, "peak_gb": peak, "cpu_seconds": cpu, "exit_code": code,
                       "executor": _executor(output)}
                runs.setdefault(name, []).append(run)
                print(f"{rows:>10,}  {name:<30} {seconds:>8.1f} {rows / seconds:>8,.0f} {peak:>8.2f} "
                      f"{cpu:>7.1f}  {code:>4}  {run['executor'] or ''}", flush=True)
        limits = {PREDICT_ONLY_NAME: "model.onnx"}
        if "int8" in args.jobs:
            limits[INT8_PREDICT_ONLY_NAME] = "model.int8.onnx"
        for name, model_file in limits.items():
            rates = [predict_only_rate(args.model, rows, model_file) for _ in range(args.repeats)]
            rate = statistics.median(rates)
            print(f"{rows:>10,}  {name:<30} {rows / rate:>8.1f} {rate:>8,.0f}", flush=True)
            results.append({"rows": rows, "method": name, "seconds": rows / rate, "rows_per_s": rate,
                            "runs": [{"rows_per_s": r} for r in rates]})
        for name, repeats in runs.items():
            seconds = statistics.median(r["seconds"] for r in repeats)
            results.append({
                "rows": rows, "method": name, "seconds": seconds, "rows_per_s": rows / seconds,
                "peak_gb": statistics.median(r["peak_gb"] for r in repeats),
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in repeats),
                "exit_codes": sorted({r["exit_code"] for r in repeats}),
                "executor": repeats[0]["executor"], "runs": repeats,
            })
    return results


def _commands(
    args: argparse.Namespace, cluster: LocalRayCluster | None, csv: Path, rows: int
) -> dict[str, tuple[list[str], dict[str, str] | None, list[int], Path | None]]:
    """Each method's (command, environment, other processes whose memory counts, job output directory)."""
    commands = {}
    for mode in args.jobs:
        output = args.work_dir / f"scored-{rows}-{time.time_ns()}"
        job = [sys.executable, "jobs/score.py", "--model", args.model, "--input", str(csv),
               "--output", str(output), *JOB_FLAGS[mode]]
        if args.concurrency:
            job += ["--concurrency", str(args.concurrency)]
        if mode == "running":
            job += [cluster.gcs_address]
            commands[JOBS[mode]] = (job, cluster.env, [p.pid for p in cluster.processes], output)
        else:
            commands[JOBS[mode]] = (job, None, [], output)
    for name, script in ((BASELINE_NAME, BASELINE), (ONNX_BASELINE_NAME, ONNX_BASELINE)):
        destination = args.work_dir / f"baseline-{rows}-{len(commands)}.parquet"
        command = [sys.executable, "-c", script, str(csv), args.model, str(destination)]
        commands[name] = (command, None, [], None)
    return commands


def predict_only_rate(model: str, rows: int, model_file: str = "model.onnx") -> float:
    """(c), or (c8) for the int8 copy: onnxruntime's images/s on preloaded arrays, the predictions
    alone timed."""
    out = subprocess.run([sys.executable, "-c", PREDICT_ONLY, model, str(rows), model_file], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _executor(output: Path | None) -> str | None:
    """Where the job scored (its batch summary says), or None for the baseline."""
    if output is None:
        return None
    summaries = list(output.glob("batches/*/summary.json"))
    return json.loads(summaries[0].read_text()).get("executor") if summaries else "no batch"


if __name__ == "__main__":
    sys.exit(main())
