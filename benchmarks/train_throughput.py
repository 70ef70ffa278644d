"""Training throughput: jobs/train.py with 1 and 2 Ray Train workers against plain tf-keras ``model.fit``.

    python benchmarks/train_throughput.py [--images 20000] [--epochs 3] [--workers 1 2] [--repeats 1]

Same model (the default CNN, augmentation on), same global batch (``--global-batch``,
split evenly over the workers), same images per epoch, same epochs. Each run is a
fresh process. The figure is images/s of the *training* part of an epoch (no
validation, no checkpoint), the median over epochs 2.. of every repeat: epoch 1
includes tracing and warm-up in both. The baseline is plain single-process
``model.fit`` on in-memory NumPy arrays with TensorFlow's default threads.

It also reports the time to 99.0% validation accuracy of the default configuration
from a finished run's history (``--time-to-accuracy RUN_DIR``: training it here would
take most of an hour on 2 cores). Prints a table, writes JSON to
benchmarks/results/train_throughput.json, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from machine import REPO, cpu_ticks, describe, host_steal, machine, write_results

VAL_FRACTION = 0.1  # jobs/train.py's default: --limit N trains on N × (1 - this) images
TARGET_ACCURACY = 0.99

BASELINE = """
import json, sys, time
import numpy as np
import mnist_ray  # selects tf-keras
import tf_keras as keras
from mnist_ray.data import BUNDLED_MNIST
from mnist_ray.model import build_model, compile_model
images, epochs, batch = (int(a) for a in sys.argv[1:4])
with np.load(BUNDLED_MNIST) as npz:
    x, y = npz["x_train"][:images], npz["y_train"][:images]
keras.utils.set_random_seed(0)
model = compile_model(build_model("cnn", dropout=0.25, augment=True), learning_rate=1e-3)
seconds = []
class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        seconds.append(time.perf_counter() - self.start)
model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=[Timer()])
print(json.dumps([images / s for s in seconds]))
"""


def baseline_rates(images: int, epochs: int, global_batch: int) -> list[float]:
    """Images/s of each epoch of plain ``model.fit``."""
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, str(images), str(epochs), str(global_batch)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def mnist_ray_rates(limit: int, epochs: int, workers: int, global_batch: int, work_dir: Path) -> list[float]:
    """Images/s of each epoch of ``jobs/train.py`` (from the run's history.json)."""
    run_dir = work_dir / f"run-{workers}w-{len(list(work_dir.iterdir()))}"
    command = [
        sys.executable, "jobs/train.py", "--limit", str(limit), "--epochs", str(epochs),
        "--num-workers", str(workers), "--batch-size", str(global_batch // workers),
        "--output-dir", str(run_dir),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return [epoch["images_per_s"] for epoch in json.loads((run_dir / "history.json").read_text())]


def record_run(rates: Callable[..., list[float]], *args) -> dict:
    """One run of ``rates(*args)``: its images/s epoch by epoch, and the host's steal while it ran."""
    before = cpu_ticks()
    images_per_s = rates(*args)
    return {"images_per_s": images_per_s, "host_steal": host_steal(before, cpu_ticks())}


def steady(runs: list[dict]) -> float:
    """The median over every run's epochs after the first."""
    return statistics.median(rate for run in runs for rate in run["images_per_s"][1:] or run["images_per_s"])


def time_to_accuracy(run_dir: Path) -> dict:
    """Epochs and training seconds until validation accuracy first reached TARGET_ACCURACY."""
    history = json.loads((run_dir / "history.json").read_text())
    seconds = 0.0
    for epoch in history:
        seconds += epoch["epoch_seconds"]
        if epoch["val_accuracy"] >= TARGET_ACCURACY:
            return {"run_dir": str(run_dir), "epoch": epoch["epoch"], "seconds": round(seconds, 1)}
    return {"run_dir": str(run_dir), "epoch": None, "seconds": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images per run (--limit of the job)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (at least 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--time-to-accuracy", type=Path, default=None, metavar="RUN_DIR",
                        help="a finished default training run whose history gives the time to 99%%")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    info = machine()
    print(describe(info), flush=True)
    train_images = round(args.images * (1 - VAL_FRACTION))
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        # Interleaved (baseline, workers..., baseline, ...): drifting load hits every method alike.
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            runs.setdefault("baseline", []).append(
                record_run(baseline_rates, train_images, args.epochs, args.global_batch))
            for workers in args.workers:
                runs.setdefault(f"{workers}", []).append(record_run(
                    mnist_ray_rates, args.images, args.epochs, workers, args.global_batch, Path(tmp)))
    baselines = runs.pop("baseline")
    base = steady(baselines)
    rows.append({"method": "plain tf-keras model.fit", "workers": 0, "images_per_s": base, "ratio": 1.0,
                 "runs": baselines})
    for workers, measured in runs.items():
        value = steady(measured)
        rows.append({"method": f"mnist_ray, {workers} worker(s)", "workers": int(workers),
                     "images_per_s": value, "ratio": value / base,
                     # Each repeat against the baseline run just before it: how far the load drifted.
                     "ratio_by_repeat": [steady([job]) / steady([plain])
                                         for job, plain in zip(measured, baselines, strict=True)],
                     "runs": measured})
    print(f"\n{train_images:,} images/epoch, {args.epochs} epochs, global batch {args.global_batch}, "
          f"{args.repeats} repeat(s); median images/s of epochs 2..")
    print(f"{'method':<28} {'images/s':>9} {'× baseline':>11}  repeat by repeat (host steal during the run)")
    for row in rows:
        cells = []
        ratios = row.get("ratio_by_repeat") or [None] * len(row["runs"])
        for ratio, run in zip(ratios, row["runs"], strict=True):
            figure = f"{ratio:.2f}" if ratio is not None else f"{steady([run]):,.0f}/s"
            cells.append(f"{figure} ({run['host_steal']:.0%})")
        by_repeat = ", ".join(cells)
        print(f"{row['method']:<28} {row['images_per_s']:>9,.0f} {row['ratio']:>11.2f}  {by_repeat}")
    payload = {"machine": info, "train_images": train_images, "epochs": args.epochs,
               "global_batch": args.global_batch, "repeats": args.repeats, "results": rows}
    if args.time_to_accuracy:
        payload["time_to_99"] = reached = time_to_accuracy(args.time_to_accuracy)
        print(f"time to {TARGET_ACCURACY:.1%} validation accuracy ({reached['run_dir']}): "
              f"epoch {reached['epoch']}, {reached['seconds']} s of training")
    print(f"results: {write_results('train_throughput', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
