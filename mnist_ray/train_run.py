"""One training run end to end: data → Ray Train → test evaluation → run directory.

This is what ``jobs/train.py`` runs. The test set is touched once, at the end,
to report on the model chosen by validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray

from mnist_ray import artifacts
from mnist_ray.cli import EXIT_OK, SMOKE_TEST_LIMIT, model_flag_problem, train_parser
from mnist_ray.config import TrainConfig
from mnist_ray.data import DataSplits, dataset_columns, load_splits
from mnist_ray.evaluation import classification_metrics, metrics_table
from mnist_ray.ray_setup import connect_ray
from mnist_ray.reports import write_report
from mnist_ray.schema import IMAGE, LABEL, ROW, SOURCE
from mnist_ray.training import MODEL_FILE, STATE_FILE, fit_distributed

# Flags that are not part of TrainConfig but are saved with the run so --resume can replay them.
DATA_KEYS = ("data", "test_data", "limit", "val_fraction", "test_fraction")


def main(args: argparse.Namespace) -> int:
    """The training job for parsed flags (``mnist_ray.cli.train_parser``)."""
    if args.smoke_test:
        args.limit = min(args.limit or SMOKE_TEST_LIMIT, SMOKE_TEST_LIMIT)
        args.epochs = 1
        # Seen: ~11 % (one class) after a smoke test's few steps, which alarms a new user.
        print("smoke test: 2,000 images for 1 epoch check the whole path; too few steps for the "
              "accuracy to mean anything (BatchNorm statistics have not settled)", flush=True)
    if problem := model_flag_problem(args):
        train_parser().error(problem)
    connect_ray(args.address)
    run_dir, settings = prepare_run(args)
    try:
        run_training(run_dir, settings)
    except BaseException:
        # A run that failed before training started (bad data) leaves no directory behind.
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    return EXIT_OK


def prepare_run(args: argparse.Namespace) -> tuple[Path, dict]:
    """Create (or, with --resume, reopen) the run directory and fix its settings."""
    if args.resume:
        run_dir = artifacts.resolve_run_dir(args.resume)
        settings = artifacts.read_json(run_dir / artifacts.CONFIG_FILE)
        print(f"resuming {run_dir}", flush=True)
        return run_dir, settings
    if args.output_dir:
        run_dir = Path(args.output_dir).resolve()
        if (run_dir / artifacts.CONFIG_FILE).exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = artifacts.new_run_dir().resolve()
    cpus = args.cpus_per_worker or default_cpus_per_worker(args.num_workers)
    config = TrainConfig.from_dict(vars(args) | {"cpus_per_worker": cpus})
    data = {key: getattr(args, key) for key in DATA_KEYS}
    return run_dir, run_settings(config, data, run_dir=run_dir, storage_path=args.storage_path)


def run_settings(
    config: TrainConfig,
    data: dict,
    *,
    run_dir: Path,
    storage_path: str | None = None,
    fit_on_validation: bool = False,
) -> dict:
    """What a run's config.json holds: the training config, the data flags (``DATA_KEYS``), storage.

    ``fit_on_validation`` (a final model trained for a fixed number of epochs, e.g. the
    best configuration of a search) adds the validation images to the training data and
    keeps the last epoch's model: validation accuracy can no longer choose an epoch.
    """
    return {
        "train": asdict(config),
        **{key: data[key] for key in DATA_KEYS},
        "storage_path": storage_path or str(run_dir / "ray_train"),
        "run_name": run_dir.name,
        "fit_on_validation": fit_on_validation,
    }


def default_cpus_per_worker(num_workers: int) -> int:
    """The cluster's CPUs shared evenly among the workers (at least one each)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)


def load_run_splits(settings: dict) -> DataSplits:
    """The data splits a run's (or a search's) saved ``settings`` describe."""
    return load_splits(
        settings["data"],
        val_fraction=settings["val_fraction"],
        test_fraction=settings["test_fraction"],
        limit=settings["limit"],
        seed=TrainConfig.from_dict(settings["train"]).seed,
        test_data=settings.get("test_data"),
    )


def run_training(run_dir: Path, settings: dict, splits: DataSplits | None = None) -> dict:
    """Train as ``settings`` say, evaluate on the test set, and fill ``run_dir``. Returns test metrics.

    ``splits`` are the data ``settings`` describe, if the caller has loaded them already.
    """
    started = time.time()
    config = TrainConfig.from_dict(settings["train"])
    if splits is None:
        splits = load_run_splits(settings)
    # Written once the data is known to be good: from here on the run can be resumed.
    artifacts.write_json(run_dir / artifacts.CONFIG_FILE, settings)
    rows = splits.description["rows"]
    print(
        f"data: {rows['train']:,} train / {rows['val']:,} validation / {rows['test']:,} test images "
        f"({', '.join(settings['data'])}); {config.num_workers} workers × {config.cpus_per_worker} CPU"
        f"{' + 1 GPU' if config.use_gpu else ''}, global batch {config.global_batch_size}",
        flush=True,
    )
    fit_on_validation = settings.get("fit_on_validation", False)
    train = splits.train.union(splits.val) if fit_on_validation else splits.train
    if fit_on_validation:
        print("validation images are part of the training data: the model is the last epoch's", flush=True)
    result = fit_distributed(
        config, train, splits.val, run_name=settings["run_name"], storage_path=settings["storage_path"]
    )
    if result.error:
        raise result.error
    if fit_on_validation:
        best_checkpoint, best_metrics = result.checkpoint, result.metrics
    else:
        best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    with best_checkpoint.as_directory() as ckpt_dir:
        shutil.copyfile(Path(ckpt_dir) / MODEL_FILE, run_dir / MODEL_FILE)
    with result.checkpoint.as_directory() as ckpt_dir:
        history = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]

    metrics = evaluate_on_test(run_dir, splits)
    artifacts.write_history(run_dir, history)
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, metrics)
    metadata = artifacts.build_metadata(
        config=settings, data=splits.description, metrics=metrics, best_epoch=best_metrics
    )
    metadata["wall_seconds"] = round(time.time() - started, 1)
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    artifacts.update_latest(run_dir)
    selection = "being the last (validation trained on)" if fit_on_validation else "validation accuracy"
    print_summary(run_dir, metrics, best_metrics, len(history), metadata["wall_seconds"], selection)
    write_report(run_dir)
    return metrics


def evaluate_on_test(run_dir: Path, splits: DataSplits) -> dict:
    """Metrics of the saved model (reloaded from disk, as a user would) on the test set.

    Also saves the test predictions and a few digits for the run's report.
    """
    test = dataset_columns(splits.test, [IMAGE, LABEL, SOURCE, ROW])
    model = artifacts.load_model(run_dir)
    proba = model.predict(test[IMAGE], batch_size=1024, verbose=0)
    artifacts.write_test_predictions(run_dir, test[SOURCE], test[ROW], test[LABEL], proba, test[IMAGE])
    return classification_metrics(test[LABEL], np.argmax(proba, axis=1))


def print_summary(
    run_dir: Path, metrics: dict, best: dict, epochs_run: int, seconds: float, selection: str
) -> None:
    print(
        f"\nselected epoch {best['epoch']} of {epochs_run} by {selection} "
        f"({best['val_accuracy']:.4f})\n"
        f"test accuracy {metrics['accuracy']:.4%} ({metrics['count'] - metrics['errors']:,}/"
        f"{metrics['count']:,})  macro F1 {metrics['macro_f1']:.4f}  wall time {seconds:.0f}s\n\n"
        f"{metrics_table(metrics)}\n\nrun directory: {run_dir}",
        flush=True,
    )
