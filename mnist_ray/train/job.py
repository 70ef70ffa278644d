"""One training run end to end: data → Ray Train → test evaluation → run directory.

This is what ``jobs/train.py`` runs. The test set is touched once, at the end,
to report on the model chosen by validation accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import ray

from mnist_ray import artifacts
from mnist_ray.config import DataConfig, RunSettings, TrainConfig
from mnist_ray.data.schema import IMAGE, LABEL, ROW, SOURCE
from mnist_ray.data.sources import check_sources, dataset_columns
from mnist_ray.data.splits import DataSplits, load_splits
from mnist_ray.errors import EXIT_OK, InputError, as_interrupted
from mnist_ray.evaluation import classification_metrics, metrics_table
from mnist_ray.registry.tracking import Tracking
from mnist_ray.registry.versions import register_training_run
from mnist_ray.reports import write_report
from mnist_ray.runtime import connect_ray
from mnist_ray.train import ensemble
from mnist_ray.train.export import export_onnx
from mnist_ray.train.loop import MODEL_FILE, STATE_FILE, fit_distributed
from mnist_ray.train.quantize import write_int8_copy


def main(
    config: TrainConfig,
    data: DataConfig,
    *,
    members: int = 1,
    address: str | None = None,
    output_dir: str | None = None,
    storage_path: str | None = None,
    resume: str | None = None,
    tracking: Tracking | None = None,
) -> int:
    """The training job: train ``config`` on ``data`` into ``output_dir`` (default: a new
    ``runs/<timestamp>``), or continue the run directory ``resume``; the finished run is logged to
    ``tracking``'s store and registered (None: not tracked)."""
    run_dir, settings = reopen_run(resume) if resume else (None, None)
    check_sources(settings.data if settings else data)  # before Ray starts: a typo must not wait for it
    connect_ray(address)
    if settings is None:
        run_dir = create_run_dir(output_dir)
        config = dataclasses.replace(
            config, cpus_per_worker=config.cpus_per_worker or default_cpus_per_worker(config.num_workers)
        )
        settings = RunSettings(
            train=config, data=data, storage_path=storage_path or str(run_dir / "ray_train"),
            run_name=run_dir.name, members=members,
        )
    try:
        run_training(run_dir, settings)
    except BaseException as exc:
        interrupted = as_interrupted(exc)
        if interrupted is None:
            raise
        if (run_dir / artifacts.CONFIG_FILE).is_file():
            interrupted.next_run = f"continue the run with: python jobs/train.py --resume {run_dir}"
        raise interrupted from None
    finally:
        # A run that stopped before training started (bad data) leaves no directory behind.
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
    # The run directory is complete: what follows is best effort (a store that is down costs a warning).
    register_training_run(run_dir, tracking)
    return EXIT_OK


def reopen_run(path: str) -> tuple[Path, RunSettings]:
    """The run directory ``path`` and the settings it was started with (``--resume``)."""
    run_dir = artifacts.resolve_run_dir(path)
    settings = artifacts.read_settings(run_dir / artifacts.CONFIG_FILE, RunSettings)
    print(f"resuming {run_dir}", flush=True)
    return run_dir, settings


def create_run_dir(output_dir: str | None) -> Path:
    """``output_dir`` (created; refused if it already holds a run) or a new ``runs/<timestamp>``."""
    if output_dir is None:
        return artifacts.new_run_dir().resolve()
    run_dir = Path(output_dir).resolve()
    if (run_dir / artifacts.CONFIG_FILE).exists():
        raise InputError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def default_cpus_per_worker(num_workers: int) -> int:
    """The cluster's CPUs shared evenly among the workers (at least one each)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)


def load_run_splits(data: DataConfig, seed: int) -> DataSplits:
    """The data splits a run's (or a search's) ``data`` settings describe."""
    return load_splits(
        data.data, val_fraction=data.val_fraction, test_fraction=data.test_fraction, limit=data.limit,
        seed=seed, test_data=data.test_data,
    )


def run_training(run_dir: Path, settings: RunSettings, splits: DataSplits | None = None) -> dict:
    """Train as ``settings`` say, evaluate on the test set, and fill ``run_dir``. Returns test metrics.

    ``splits`` are the data ``settings`` describe, if the caller has loaded them already.
    """
    started = time.time()
    config = settings.train
    if splits is None:
        splits = load_run_splits(settings.data, config.seed)
    # Written once the data is known to be good: from here on the run can be resumed.
    artifacts.write_settings(run_dir / artifacts.CONFIG_FILE, settings)
    rows = splits.description["rows"]
    print(
        f"data: {rows['train']:,} train / {rows['val']:,} validation / {rows['test']:,} test images "
        f"({', '.join(settings.data.data)}); {config.num_workers} workers × {config.cpus_per_worker} CPU"
        f"{' + 1 GPU' if config.use_gpu else ''}, global batch {config.global_batch_size}",
        flush=True,
    )
    train = splits.train.union(splits.val) if settings.fit_on_validation else splits.train
    if settings.fit_on_validation:
        print("validation images are part of the training data: the model is the last epoch's", flush=True)
    members = []
    if settings.members > 1:
        members = ensemble.train_members(config, settings.members, train, splits.val,
                                         storage_path=settings.storage_path)
        ensemble.average_model(members).save(run_dir / MODEL_FILE)
        best_metrics = members[0].best  # the report's curves: member 0's
        history = [record | {"member": m.index} for m in members for record in m.history]
    else:
        best_metrics, history = fit_single(run_dir, settings, train, splits.val)

    metrics, onnx, int8 = evaluate_on_test(run_dir, splits)
    artifacts.write_history(run_dir, history)
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, metrics)
    metadata = artifacts.build_metadata(
        config=settings, data=splits.description, metrics=metrics, best_epoch=best_metrics
    )
    metadata["onnx"] = onnx
    if int8:
        metadata["onnx_int8"] = int8
    if members:
        metadata["ensemble"] = ensemble.member_records(members, member_test_accuracy(members, splits))
    metadata["wall_seconds"] = round(time.time() - started, 1)
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    artifacts.update_latest(run_dir)
    selection = (
        "being the last (validation trained on)" if settings.fit_on_validation else "validation accuracy"
    )
    if members:
        selected = "\n".join(
            f"member {m['member']} (seed {m['seed']}): selected epoch {m['selected_epoch']} of "
            f"{m['epochs_run']} by {selection} ({m['val_accuracy']:.4f}), "
            f"test accuracy {m['test_accuracy']:.2%}"
            for m in metadata["ensemble"]
        ) + f"\nthe ensemble averages the {len(members)} members' probabilities"
    else:
        selected = (f"selected epoch {best_metrics['epoch']} of {len(history)} by {selection} "
                    f"({best_metrics['val_accuracy']:.4f})")
    print_summary(run_dir, metrics, selected, metadata["wall_seconds"])
    write_report(run_dir)
    return metrics


def fit_single(run_dir: Path, settings: RunSettings, train, val) -> tuple[dict, list[dict]]:
    """One Ray Train run; its selected model into ``run_dir``: (that epoch's metrics, the history).

    The model is the epoch of the best validation accuracy, or the last one when the validation
    images were trained on (``fit_on_validation``).
    """
    result = fit_distributed(
        settings.train, train, val, run_name=settings.run_name, storage_path=settings.storage_path
    )
    if result.error:
        raise result.error
    if settings.fit_on_validation:
        best_checkpoint, best_metrics = result.checkpoint, result.metrics
    else:
        best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    with best_checkpoint.as_directory() as ckpt_dir:
        shutil.copyfile(Path(ckpt_dir) / MODEL_FILE, run_dir / MODEL_FILE)
    with result.checkpoint.as_directory() as ckpt_dir:
        history = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]
    return best_metrics, history


def member_test_accuracy(members: list[ensemble.Member], splits: DataSplits) -> list[float]:
    """Each member's own accuracy on the test set, for the report beside the ensemble's."""
    import tf_keras as keras

    test = dataset_columns(splits.test, [IMAGE, LABEL])
    accuracy = []
    for member in members:
        with member.checkpoint.as_directory() as directory:
            model = keras.models.load_model(Path(directory) / MODEL_FILE, safe_mode=True)
        predicted = model.predict(test[IMAGE], batch_size=1024, verbose=0).argmax(axis=1)
        accuracy.append(float((predicted == test[LABEL]).mean()))
    return accuracy


def evaluate_on_test(run_dir: Path, splits: DataSplits) -> tuple[dict, dict, dict | None]:
    """Metrics of the saved model (reloaded from disk, as a user would) on the test set, its ONNX
    export (``model.onnx``), verified on the same images, and the export's int8 copy, measured on
    them: (metrics, what metadata records of each; None for an int8 copy that could not be made).

    Also saves the test predictions and a few digits for the run's report.
    """
    test = dataset_columns(splits.test, [IMAGE, LABEL, SOURCE, ROW])
    model = artifacts.load_model(run_dir)
    proba = model.predict(test[IMAGE], batch_size=1024, verbose=0)
    artifacts.write_test_predictions(run_dir, test[SOURCE], test[ROW], test[LABEL], proba, test[IMAGE])
    onnx = export_onnx(model, run_dir / artifacts.ONNX_FILE, test[IMAGE], expected=proba)
    int8 = write_int8_copy(run_dir, test[IMAGE], test[LABEL], proba)
    return classification_metrics(test[LABEL], np.argmax(proba, axis=1)), onnx, int8


def print_summary(run_dir: Path, metrics: dict, selected: str, seconds: float) -> None:
    """The run's last lines: which epoch(s) were kept, the test accuracy and the per-class table."""
    print(
        f"\n{selected}\n"
        f"test accuracy {metrics['accuracy']:.4%} ({metrics['count'] - metrics['errors']:,}/"
        f"{metrics['count']:,})  macro F1 {metrics['macro_f1']:.4f}  wall time {seconds:.0f}s\n\n"
        f"{metrics_table(metrics)}\n\nrun directory: {run_dir}",
        flush=True,
    )
