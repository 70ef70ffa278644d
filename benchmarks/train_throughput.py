"""Training throughput: jobs/train.py with 1 and 2 Ray Train workers against plain tf-keras ``model.fit``.

    python benchmarks/train_throughput.py [--images 20000] [--epochs 3] [--workers 1 2] [--repeats 1]

Same model (the default, augmentation on), same global batch (``--global-batch``, split
evenly over the workers), same images per epoch, same epochs, a validation pass every epoch
in both. Each run is a fresh process. Two figures, each the median over epochs 2.. of every
repeat (epoch 1 includes tracing and warm-up in both):

* images/s of the *training* part of an epoch (no validation, no checkpoint);
* images per CPU-second: the CPU time (user + system) of the run's whole process tree over
  epochs 2..N — for the job, its driver and every process of the Ray it starts (GCS, raylet,
  dashboard and agents, Train's controller and workers, Ray Data's actors) — sampled from
  /proc every half second. On a shared machine CPU time is steadier than wall time: another
  tenant's load slows a run without making it spend more CPU.

The baseline is plain single-process ``model.fit`` on in-memory NumPy arrays with
TensorFlow's default threads.

Prints a table, writes JSON to benchmarks/results/train_throughput.json, asserts nothing.
The time to accuracy of the default configuration is benchmarks/accuracy.py's.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import REPO, cpu_ticks, describe, host_steal, machine, processes, trees, write_results

VAL_FRACTION = 0.1  # jobs/train.py's default: --limit N trains on N × (1 - this) images

BASELINE = """
import json, sys, time
import numpy as np
import mnist_ray  # selects tf-keras
import tf_keras as keras
from mnist_ray.config import TrainConfig
from mnist_ray.data.sources import BUNDLED_MNIST
from mnist_ray.model import build_model, compile_model
images, val_images, epochs, batch = (int(a) for a in sys.argv[1:5])
with np.load(BUNDLED_MNIST) as npz:
    x, y = npz["x_train"][:images], npz["y_train"][:images]
    x_val, y_val = npz["x_train"][-val_images:], npz["y_train"][-val_images:]
keras.utils.set_random_seed(0)
default = TrainConfig()
model = compile_model(build_model(default.model, dropout=default.dropout, augment=True), learning_rate=1e-3)
epochs_out = []
class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.train_seconds = time.perf_counter(), None
    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.start
    def on_epoch_end(self, epoch, logs=None):
        epochs_out.append({"images_per_s": images / self.train_seconds, "wall_time": time.time()})
model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=[Timer()],
          validation_data=(x_val, y_val), validation_batch_size=batch)
print(json.dumps(epochs_out))
"""


def baseline_epochs(images: int, epochs: int, global_batch: int) -> tuple[list[str], Callable[[], list]]:
    """The command of plain ``model.fit`` and how to read its epochs (images/s, end time) when it ended."""
    val_images = round(images * VAL_FRACTION / (1 - VAL_FRACTION))  # as many as the job validates on
    command = [sys.executable, "-c", BASELINE, str(images), str(val_images), str(epochs), str(global_batch)]
    return command, lambda stdout: json.loads(stdout.strip().splitlines()[-1])


def mnist_ray_epochs(limit: int, epochs: int, workers: int, global_batch: int, work_dir: Path
                     ) -> tuple[list[str], Callable[[], list]]:
    """The command of ``jobs/train.py`` and how to read its epochs (from the run's history.json)."""
    run_dir = work_dir / f"run-{workers}w-{len(list(work_dir.iterdir()))}"
    command = [
        sys.executable, "jobs/train.py", "--limit", str(limit), "--epochs", str(epochs),
        "--num-workers", str(workers), "--batch-size", str(global_batch // workers),
        "--output-dir", str(run_dir),
    ]
    return command, lambda stdout: json.loads((run_dir / "history.json").read_text())


def record_run(command: list[str], read_epochs: Callable[[str], list[dict]], images: int) -> dict:
    """One run: images/s epoch by epoch, images per CPU-second of its process tree over epochs
    2..N, and the host's steal while it ran.

    The run never joins a Ray named by $RAY_ADDRESS: the Ray it starts is part of its process
    tree, so its daemons' and workers' CPU time is part of the measurement."""
    before = cpu_ticks()
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    samples = []  # (time, CPU seconds of the process tree so far)
    while process.poll() is None:
        found = processes()
        tree = trees([process.pid], found)
        samples.append((time.time(), sum(found[pid][1] for pid in tree if pid in found)))
        time.sleep(0.5)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} exited {process.returncode}:\n{stderr[-3000:]}")
    epochs = read_epochs(stdout)
    ends = [epoch["wall_time"] for epoch in epochs]
    cpu = _cpu_at(samples, ends[-1]) - _cpu_at(samples, ends[0])
    return {"images_per_s": [epoch["images_per_s"] for epoch in epochs],
            "images_per_cpu_second": images * (len(epochs) - 1) / cpu if cpu > 0 else None,
            "host_steal": host_steal(before, cpu_ticks())}


def _cpu_at(samples: list[tuple[float, float]], moment: float) -> float:
    """The process tree's CPU seconds at ``moment``, interpolated between the samples around it."""
    times = [t for t, _ in samples]
    k = max(1, min(len(samples) - 1, bisect.bisect_left(times, moment)))
    (t0, c0), (t1, c1) = samples[k - 1], samples[k]
    return c0 + (c1 - c0) * (moment - t0) / (t1 - t0) if t1 > t0 else c1


def steady(runs: list[dict]) -> float:
    """The median over every run's epochs after the first."""
    return statistics.median(rate for run in runs for rate in run["images_per_s"][1:] or run["images_per_s"])


def cpu_efficiency(runs: list[dict]) -> float | None:
    values = [run["images_per_cpu_second"] for run in runs if run["images_per_cpu_second"]]
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images per run (--limit of the job)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (at least 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    info = machine()
    print(describe(info), flush=True)
    if os.environ.get("RAY_ADDRESS"):
        print("RAY_ADDRESS is ignored: each run starts a Ray of its own, whose processes' CPU time it counts",
              flush=True)
    train_images = round(args.images * (1 - VAL_FRACTION))
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        # Interleaved (baseline, workers..., baseline, ...): drifting load hits every method alike.
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            runs.setdefault("baseline", []).append(
                record_run(*baseline_epochs(train_images, args.epochs, args.global_batch), train_images))
            for workers in args.workers:
                runs.setdefault(f"{workers}", []).append(record_run(
                    *mnist_ray_epochs(args.images, args.epochs, workers, args.global_batch, Path(tmp)),
                    train_images))
    baselines = runs.pop("baseline")
    base, base_cpu = steady(baselines), cpu_efficiency(baselines)
    rows.append({"method": "plain tf-keras model.fit", "workers": 0, "images_per_s": base, "ratio": 1.0,
                 "images_per_cpu_second": base_cpu, "cpu_ratio": 1.0, "runs": baselines})
    for workers, measured in runs.items():
        value, cpu = steady(measured), cpu_efficiency(measured)
        rows.append({"method": f"mnist_ray, {workers} worker(s)", "workers": int(workers),
                     "images_per_s": value, "ratio": value / base,
                     "images_per_cpu_second": cpu,
                     "cpu_ratio": cpu / base_cpu if cpu and base_cpu else None,
                     # Each repeat against the baseline run just before it: how far the load drifted.
                     "ratio_by_repeat": [steady([job]) / steady([plain])
                                         for job, plain in zip(measured, baselines, strict=True)],
                     "runs": measured})
    print(f"\n{train_images:,} images/epoch, {args.epochs} epochs, global batch {args.global_batch}, "
          f"{args.repeats} repeat(s); median images/s of epochs 2..")
    print(f"{'method':<28} {'images/s':>9} {'× baseline':>11} {'img/CPU-s':>10} {'× baseline':>11}  "
          "repeat by repeat (host steal during the run)")
    for row in rows:
        cells = []
        ratios = row.get("ratio_by_repeat") or [None] * len(row["runs"])
        for ratio, run in zip(ratios, row["runs"], strict=True):
            figure = f"{ratio:.2f}" if ratio is not None else f"{steady([run]):,.0f}/s"
            cells.append(f"{figure} ({run['host_steal']:.0%})")
        by_repeat = ", ".join(cells)
        cpu = (f"{row['images_per_cpu_second']:>10,.0f} {row['cpu_ratio']:>11.2f}" if row["cpu_ratio"]
               else " " * 22)
        print(f"{row['method']:<28} {row['images_per_s']:>9,.0f} {row['ratio']:>11.2f} {cpu}  {by_repeat}")
    payload = {"machine": info, "train_images": train_images, "epochs": args.epochs,
               "global_batch": args.global_batch, "repeats": args.repeats, "results": rows}
    print(f"results: {write_results('train_throughput', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
