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
* ``jobs/score.py --address`` against a Ray that is already running, as a job submitted to
  a cluster is (``--jobs running``: a ``ray start`` head on 127.0.0.1, started once, with
  the machine's CPUs, token authentication on);
* the baseline: ``pandas.read_csv`` + ``model.predict`` + ``DataFrame.to_parquet``.

Every 0.5 s it sums the proportional set size (PSS: shared pages counted once,
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

from machine import describe, machine, write_results  # noqa: E402

from mnist_ray.csv_format import write_kaggle_csv  # noqa: E402
from mnist_ray.data import BUNDLED_MNIST  # noqa: E402
from tests.ray_cluster import LocalRayCluster  # noqa: E402

# The job's flags in each mode (``running`` adds the running Ray's address), and its name in the tables.
JOB_FLAGS = {
    "auto": [], "ray": ["--executor", "ray"], "local": ["--executor", "local"], "running": ["--address"]
}
JOBS = {mode: " ".join(["jobs/score.py", *flags]) for mode, flags in JOB_FLAGS.items()}
TICKS = os.sysconf("SC_CLK_TCK")
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
) -> tuple[float, float, float, int]:
    """(wall seconds, peak PSS in GB, CPU seconds, exit code) of ``command``.

    The PSS is of its process tree and of the trees of the processes ``also`` (a running
    Ray's nodes). The CPU seconds (user + system) are the command's own, exact (``wait4``),
    plus each other process's of those trees as last sampled (a process that ends between
    two samples loses at most 0.5 s of its count; a running Ray's CPU before the command
    started is subtracted).
    """
    started = time.monotonic()
    at_start = _processes()
    before = {pid: at_start[pid][1] for pid in _trees(also, at_start) if pid in at_start}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    peak, cpu = 0, {}
    while True:
        processes = _processes()
        pids = _trees([process.pid, *also], processes)
        peak = max(peak, sum(_pss_bytes(pid) for pid in pids))
        cpu.update({pid: processes[pid][1] for pid in pids - {process.pid} if pid in processes})
        # Reaps the command when it has ended, with its exact resource usage.
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.5)
    others = sum(seconds - before.get(pid, 0.0) for pid, seconds in cpu.items())
    return (time.monotonic() - started, peak / 1e9, usage.ru_utime + usage.ru_stime + others,
            process.returncode)


def _processes() -> dict[int, tuple[int, float]]:
    """Every process's (parent id, user + system CPU seconds), from /proc/<pid>/stat."""
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces; fields 4 (parent), 14 and 15 (CPU ticks)
            # follow its closing parenthesis.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            processes[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return processes


def _trees(roots: Sequence[int], processes: dict[int, tuple[int, float]]) -> set[int]:
    """``roots`` and all their descendants."""
    tree, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in processes.items() if parent in frontier} - tree
        tree |= frontier
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
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=["auto", "ray", "running"],
                        help="the job's runs to measure: as cron runs it (auto), always on a Ray it starts "
                        "(ray), always in its own process (local), on a Ray already running (running)")
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
        base = by_method[BASELINE_NAME]
        for mode in args.jobs:
            job = by_method[JOBS[mode]]
            print(f"{rows:>10,} rows: {JOBS[mode]} at {job['rows_per_s'] / base['rows_per_s']:.2f}× the "
                  f"baseline's rows/s, {job['peak_gb'] / base['peak_gb']:.2f}× its peak memory, "
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
    commands[BASELINE_NAME] = (
        [sys.executable, "-c", BASELINE, str(csv), args.model,
         str(args.work_dir / f"baseline-{rows}.parquet")],
        None, [], None,
    )
    return commands


def _executor(output: Path | None) -> str | None:
    """Where the job scored (its batch summary says), or None for the baseline."""
    if output is None:
        return None
    summaries = list(output.glob("batches/*/summary.json"))
    return json.loads(summaries[0].read_text()).get("executor") if summaries else "no batch"


if __name__ == "__main__":
    sys.exit(main())
