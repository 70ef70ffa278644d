"""Scoring throughput and peak memory: jobs/score.py against a plain single-process baseline.

    python benchmarks/score_throughput.py --model runs/latest --rows 100000 1000000 [--work-dir DIR]

For each size, writes an unlabelled Kaggle CSV of that many MNIST test images
(the 10,000 repeated), then runs, each in a fresh process:

* ``jobs/score.py`` as a nightly cron run on one machine does: it starts its own local Ray
  (``--ray local``);
* ``jobs/score.py --address`` against a Ray that is already running, as a job submitted to
  a cluster is (``--ray running``: a ``ray start`` head on 127.0.0.1, started once, with
  the machine's CPUs, token authentication on);
* the baseline: ``pandas.read_csv`` + ``model.predict`` + ``DataFrame.to_parquet``.

Every 0.5 s it sums the proportional set size (PSS: shared pages counted once,
from Linux's ``/proc/<pid>/smaps_rollup``) of each run's whole process tree (for
the job: driver, Ray's daemons, read tasks and actors; against a running Ray, the
job's driver and all of that Ray's processes) and reports the peak. Wall time
includes start-up (Ray, TensorFlow imports) for both. It prints a table and
asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import describe, machine, write_results  # noqa: E402

from mnist_ray.csv_format import write_kaggle_csv  # noqa: E402
from mnist_ray.data import BUNDLED_MNIST  # noqa: E402
from tests.ray_cluster import LocalRayCluster  # noqa: E402

JOBS = {"local": "jobs/score.py", "running": "jobs/score.py --address"}
BASELINE_NAME = "pandas + predict + parquet"
BASELINE = """
import sys, numpy as np, pandas as pd
import mnist_ray
from mnist_ray import artifacts
from mnist_ray.schema import PIXEL_COLUMNS
csv, run_dir, destination = sys.argv[1:]
frame = pd.read_csv(csv, dtype=np.uint8)
images = frame[PIXEL_COLUMNS].to_numpy().reshape(-1, 28, 28)
del frame
probs = artifacts.load_model(run_dir).predict(images, batch_size=1024, verbose=0)
columns = {"row": np.arange(1, len(images) + 1), "predicted": probs.argmax(axis=1)}
columns.update({"confidence": probs.max(axis=1), **{f"prob_{k}": probs[:, k] for k in range(10)}})
pd.DataFrame(columns).to_parquet(destination)
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
) -> tuple[float, float, int]:
    """(wall seconds, peak PSS in GB, exit code) of ``command``; the PSS is of its process tree
    and of the trees of the processes ``also`` (a running Ray's nodes)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        pids = {pid for root in (process.pid, *also) for pid in _tree(root)}
        peak = max(peak, sum(_pss_bytes(pid) for pid in pids))
        time.sleep(0.5)
    return time.monotonic() - started, peak / 1e9, process.returncode


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces; the parent id follows its closing parenthesis.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


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
    parser.add_argument("--ray", nargs="+", choices=list(JOBS), default=list(JOBS),
                        help="how the job meets Ray: starting its own (local) or joining one (running)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mnist_ray_bench"))
    parser.add_argument("--concurrency", type=int, default=None,
                        help="inference actors of the job (default: the job's own, as many as fit)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(describe(info), flush=True)
    cluster = None
    if "running" in args.ray:
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
        base = by_method[BASELINE_NAME]
        for mode in args.ray:
            job = by_method[JOBS[mode]]
            print(f"{rows:>10,} rows: {JOBS[mode]} at {job['rows_per_s'] / base['rows_per_s']:.2f}× the "
                  f"baseline's rows/s, {job['peak_gb'] / base['peak_gb']:.2f}× its peak memory")
    for mode in args.ray:
        peaks = sorted((r["rows"], r["peak_gb"]) for r in results if r["method"] == JOBS[mode])
        # Flat memory: each size's peak against the next smaller size's.
        for (small, small_peak), (large, large_peak) in zip(peaks, peaks[1:], strict=False):
            print(f"{JOBS[mode]}: peak memory at {large:,} rows is {large_peak / small_peak:.2f}× "
                  f"that at {small:,} rows")
    payload = {"machine": info, "concurrency": args.concurrency, "results": results}
    print(f"results: {write_results('score_throughput', payload, args.json)}")
    return 0


def measure(args: argparse.Namespace, cluster: LocalRayCluster | None) -> list[dict]:
    """Run every method on every size; print a row per run; return the rows."""
    print(f"{'rows':>10}  {'method':<26} {'seconds':>8} {'rows/s':>8} {'peak GB':>8}  exit")
    results = []
    for rows in args.rows:
        csv = args.work_dir / f"digits-{rows}.csv"
        make_input(csv, rows)
        runs = {}
        for mode in args.ray:
            output = args.work_dir / f"scored-{rows}-{time.time_ns()}"
            job = [sys.executable, "jobs/score.py", "--model", args.model, "--input", str(csv),
                   "--output", str(output)]
            if args.concurrency:
                job += ["--concurrency", str(args.concurrency)]
            if mode == "running":
                job += ["--address", cluster.gcs_address]
                runs[JOBS[mode]] = (job, cluster.env, [p.pid for p in cluster.processes])
            else:
                runs[JOBS[mode]] = (job, None, [])
        runs[BASELINE_NAME] = (
            [sys.executable, "-c", BASELINE, str(csv), args.model,
             str(args.work_dir / f"baseline-{rows}.parquet")],
            None, [],
        )
        for name, (command, env, also) in runs.items():
            seconds, peak, code = run_measured(command, env, also)
            results.append({"rows": rows, "method": name, "seconds": seconds, "rows_per_s": rows / seconds,
                            "peak_gb": peak, "exit_code": code})
            print(f"{rows:>10,}  {name:<26} {seconds:>8.1f} {rows / seconds:>8,.0f} {peak:>8.2f}  {code}",
                  flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
