"""One hyperparameter search end to end: data → Ray Tune (each trial a Ray Train run) → results.

This is what ``jobs/tune.py`` runs. The data is loaded and split once; every trial
reads the same Ray datasets. The search sees only training and validation data;
with ``--retrain-best`` the final model is trained as a normal run
(:mod:`mnist_ray.train.job`), which alone reports test metrics.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd

from mnist_ray import artifacts
from mnist_ray.config import RunSettings, SearchOrigin, SearchSettings, TrainConfig, from_json
from mnist_ray.data.sources import check_sources
from mnist_ray.data.splits import DataSplits
from mnist_ray.errors import EXIT_INTERRUPTED, EXIT_OK, InputError, MissingInput, as_interrupted
from mnist_ray.registry.tracking import Tracking, Trial, log_search
from mnist_ray.registry.versions import register_training_run
from mnist_ray.runtime import connect_ray
from mnist_ray.train.job import default_cpus_per_worker, load_run_splits, run_training
from mnist_ray.tune import results, search


def main(
    settings: SearchSettings | None,
    *,
    address: str | None = None,
    output_dir: str | None = None,
    resume: str | None = None,
    retrain_best: bool = False,
    tracking: Tracking | None = None,
) -> int:
    """The search job: run ``settings`` into ``output_dir`` (default: a new ``searches/<timestamp>``),
    or continue the search in ``resume`` with the settings it was started with. The finished search
    and the retrained model are logged to ``tracking``'s store (None: not tracked)."""
    out_dir, settings = read_settings(resume) if resume else (None, settings)
    search.check_search_algorithm(settings.search)
    check_sources(settings.data)  # before Ray starts: a typo must not wait for it
    connect_ray(address)
    if out_dir is None:
        out_dir = create_output_dir(output_dir)
        settings = resolve_resources(settings, out_dir)
    started = time.time()
    # Loaded once, for the search and the retraining alike: nothing is read or split twice.
    splits = load_run_splits(settings.data, settings.train.seed)
    # Written once the data is known to be good: from here on the search can be resumed.
    artifacts.write_settings(out_dir / results.SETTINGS_FILE, settings)
    try:
        outcome = run_search(out_dir, settings, splits, resume=resume is not None, tracking=tracking)
        if outcome is None:  # Tune stops by itself on Ctrl+C, with the trials' state saved
            print(f"search interrupted; continue it with: jobs/tune.py --resume {out_dir}", file=sys.stderr)
            return EXIT_INTERRUPTED
        frame, best = outcome
        print(
            f"\n{results.leaderboard_markdown(frame)}\nsearch wall time {time.time() - started:.0f}s; "
            f"best: trial {best['trial']}, {search.describe(best)}, val_acc {best['val_accuracy']:.4f} "
            f"at epoch {best['best_epoch']}\nresults: {out_dir}",
            flush=True,
        )
        if retrain_best:
            retrain(out_dir, settings, best, splits)
            register_training_run(out_dir / results.BEST_MODEL_DIR, tracking)  # a run like any other
    except BaseException as exc:
        interrupted = as_interrupted(exc)
        if interrupted is None:
            raise
        interrupted.next_run = f"continue the search with: python jobs/tune.py --resume {out_dir}"
        raise interrupted from None
    return EXIT_OK


def read_settings(output_dir: str) -> tuple[Path, SearchSettings]:
    out_dir = Path(output_dir).resolve()
    path = out_dir / results.SETTINGS_FILE
    if not path.is_file():
        raise MissingInput(f"{output_dir}: not a search's output directory (no {path.name})")
    print(f"resuming {out_dir}", flush=True)
    return out_dir, artifacts.read_settings(path, SearchSettings)


def create_output_dir(output_dir: str | None) -> Path:
    if output_dir is None:
        return artifacts.new_run_dir("searches").resolve()
    out_dir = Path(output_dir).resolve()
    if (out_dir / results.SETTINGS_FILE).exists():
        raise InputError(f"{out_dir} already holds a search; use --resume {out_dir} to continue it")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def resolve_resources(settings: SearchSettings, out_dir: Path) -> SearchSettings:
    """Fix concurrency, CPUs per worker and storage for this cluster, so a resumed search keeps them."""
    base = settings.train
    concurrent = settings.max_concurrent_trials or search.default_concurrent_trials(
        workers_per_trial=base.num_workers, cpus_per_worker=base.cpus_per_worker, use_gpu=base.use_gpu
    )
    cpus = base.cpus_per_worker or search.cpus_per_worker(
        workers_per_trial=base.num_workers, concurrent_trials=concurrent
    )
    storage = settings.storage_path or str(out_dir / "ray_tune")
    if "://" not in storage:
        storage = str(Path(storage).resolve())  # Tune needs an absolute local path
    return dataclasses.replace(
        settings, train=dataclasses.replace(base, cpus_per_worker=cpus), max_concurrent_trials=concurrent,
        storage_path=storage,
    )


def run_search(
    out_dir: Path, settings: SearchSettings, splits: DataSplits, *, resume: bool,
    tracking: Tracking | None = None,
) -> tuple[pd.DataFrame, dict] | None:
    """Run (or resume) the search on ``splits`` and write its results: the leaderboard and the best config;
    log it, and each trial, to ``tracking``'s store.

    Returns None, and writes no results, if the search was interrupted (Ctrl+C) before every trial ended.
    """
    base = settings.train
    rows = splits.description["rows"]
    print(
        f"data: {rows['train']:,} train / {rows['val']:,} validation images "
        f"({', '.join(settings.data.data)}); "
        f"{settings.num_samples} trials of up to {base.epochs} epochs, {settings.search} search, "
        f"ASHA grace period {settings.grace_period}; {settings.max_concurrent_trials} at a time, "
        f"each {base.num_workers} workers × {base.cpus_per_worker} CPU{' + 1 GPU' if base.use_gpu else ''}",
        flush=True,
    )
    trainable = search.trainable(
        splits.train, splits.val, base=base, train_storage_path=f"{settings.storage_path}/train_runs"
    )
    if resume:
        tuner = search.restore_tuner(settings.storage_path, trainable)
    else:
        tuner = search.build_tuner(
            trainable,
            space=settings.space,
            search=settings.search,
            seed=base.seed,
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials,
            max_epochs=base.epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
            storage_path=settings.storage_path,
            callbacks=[search.ProgressLines(max_epochs=base.epochs, num_samples=settings.num_samples)],
        )
    grid = tuner.fit()
    if not search.search_finished(grid, settings.num_samples):
        return None
    trial_rows = [
        results.trial_row(
            result.metrics.get("trial_id") or Path(result.path).name,
            result.config,
            result.metrics_dataframe,
            max_epochs=base.epochs,
            failed=result.error is not None,
        )
        for result in grid
    ]
    frame = results.leaderboard(trial_rows)
    best = results.best_config(frame, base)
    results.write_results(out_dir, frame, best)
    trials = [Trial(row.trial, result.config, result.metrics_dataframe, row.stopped_early,
                    failed=result.error is not None) for row, result in zip(trial_rows, grid, strict=True)]
    log_search(out_dir, settings, best, trials, tracking)
    return frame, best


def retrain(out_dir: Path, settings: SearchSettings, best: dict, splits: DataSplits) -> dict:
    """Train the best configuration on training + validation images into ``out_dir/best_model``.

    It trains for the epochs the best trial needed to reach its best validation
    accuracy, then reports test metrics like any run. Rerun after an interruption, it
    continues from the run's last checkpoint; a finished retraining is not repeated.
    """
    run_dir = out_dir / results.BEST_MODEL_DIR
    if (run_dir / artifacts.METADATA_FILE).is_file():
        print(f"the best configuration was already retrained: {run_dir}", flush=True)
        return artifacts.read_json(run_dir / artifacts.METRICS_FILE)
    if (run_dir / artifacts.CONFIG_FILE).is_file():
        interrupted = artifacts.read_settings(run_dir / artifacts.CONFIG_FILE, RunSettings)
        return run_training(run_dir, interrupted, splits)
    run_dir.mkdir(parents=True, exist_ok=True)
    trial = from_json(TrainConfig, best["train"], f"{results.BEST_CONFIG_FILE}: train")
    epochs = best["best_epoch"]
    config = dataclasses.replace(
        trial,
        epochs=epochs,
        # A fixed number of epochs: validation loss (of images now trained on) must not end it sooner.
        early_stopping_patience=epochs,
        # The search shared the CPUs among the trials that ran at once; this run has them all.
        cpus_per_worker=max(trial.cpus_per_worker, default_cpus_per_worker(trial.num_workers)),
    )
    run_settings = RunSettings(
        train=config, data=settings.data, storage_path=f"{settings.storage_path}/retrain",
        run_name=run_dir.name, fit_on_validation=True,
        search=SearchOrigin(output_dir=str(out_dir), trial=best["trial"], val_accuracy=best["val_accuracy"]),
    )
    print(f"\nretraining the best configuration ({search.describe(best)}) for {epochs} epochs on "
          f"training + validation images → {run_dir}", flush=True)
    return run_training(run_dir, run_settings, splits)
