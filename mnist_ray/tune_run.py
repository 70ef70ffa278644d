"""One hyperparameter search end to end: data → Ray Tune (each trial a Ray Train run) → results.

This is what ``jobs/tune.py`` runs. The data is loaded and split once; every trial
reads the same Ray datasets. The search sees only training and validation data;
with ``--retrain-best`` the final model is trained as a normal run
(:mod:`mnist_ray.train_run`), which alone reports test metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from mnist_ray import artifacts, tune_results, tuning
from mnist_ray.cli import EXIT_INTERRUPTED, EXIT_OK, SMOKE_TEST_LIMIT, model_flag_problem, tune_parser
from mnist_ray.config import SearchSpace, TrainConfig
from mnist_ray.data import DataSplits
from mnist_ray.ray_setup import connect_ray
from mnist_ray.train_run import (
    DATA_KEYS,
    default_cpus_per_worker,
    load_run_splits,
    run_settings,
    run_training,
)

SMOKE_TEST_TRIALS = 2
SMOKE_TEST_EPOCHS = 2


def main(args: argparse.Namespace) -> int:
    """The search job for parsed flags (``mnist_ray.cli.tune_parser``)."""
    if args.smoke_test:
        args.limit = min(args.limit or SMOKE_TEST_LIMIT, SMOKE_TEST_LIMIT)
        args.num_samples, args.epochs = SMOKE_TEST_TRIALS, SMOKE_TEST_EPOCHS
    out_dir, settings = read_settings(args.resume) if args.resume else (None, new_settings(args))
    space = search_space(settings)
    try:
        tuning.check_search_algorithm(settings["search"])
    except (ValueError, ModuleNotFoundError) as exc:
        tune_parser().error(str(exc))
    connect_ray(args.address)
    if out_dir is None:
        out_dir = create_output_dir(args.output_dir)
        settings = resolve_resources(settings, out_dir, args)
    started = time.time()
    # Loaded once, for the search and the retraining alike: nothing is read or split twice.
    splits = load_run_splits(settings)
    # Written once the data is known to be good: from here on the search can be resumed.
    artifacts.write_json(out_dir / tune_results.SETTINGS_FILE, settings)
    outcome = run_search(out_dir, settings, space, splits, resume=args.resume is not None)
    if outcome is None:
        print(f"search interrupted; continue it with: jobs/tune.py --resume {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    frame, best = outcome
    print(
        f"\n{tune_results.leaderboard_markdown(frame)}\nsearch wall time {time.time() - started:.0f}s; "
        f"best: trial {best['trial']}, {tuning.describe(best)}, val_acc {best['val_accuracy']:.4f} "
        f"at epoch {best['best_epoch']}\nresults: {out_dir}",
        flush=True,
    )
    if args.retrain_best:
        retrain_best(out_dir, settings, best, splits)
    return EXIT_OK


def new_settings(args: argparse.Namespace) -> dict:
    """The search's settings from its flags (resources are resolved once Ray is up)."""
    if problem := model_flag_problem(args):
        tune_parser().error(problem)
    try:
        SearchSpace(dropout=tuple(args.dropout_range), learning_rate=tuple(args.lr_range))
    except ValueError as exc:
        tune_parser().error(str(exc))
    if args.reduction_factor < 2:
        tune_parser().error(f"--reduction-factor must be at least 2, got {args.reduction_factor}")
    return {
        "train": asdict(TrainConfig.from_dict(vars(args))),
        **{key: getattr(args, key) for key in DATA_KEYS},
        "space": {"dropout": args.dropout_range, "learning_rate": args.lr_range},
        "search": args.search,
        "num_samples": args.num_samples,
        "max_concurrent_trials": args.max_concurrent_trials,
        "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor,
        "storage_path": args.storage_path,
    }


def read_settings(output_dir: str) -> tuple[Path, dict]:
    out_dir = Path(output_dir).resolve()
    path = out_dir / tune_results.SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir}: not a search's output directory (no {path.name})")
    print(f"resuming {out_dir}", flush=True)
    return out_dir, artifacts.read_json(path)


def search_space(settings: dict) -> SearchSpace:
    return SearchSpace(
        dropout=tuple(settings["space"]["dropout"]), learning_rate=tuple(settings["space"]["learning_rate"])
    )


def create_output_dir(output_dir: str | None) -> Path:
    if output_dir is None:
        return artifacts.new_run_dir("searches").resolve()
    out_dir = Path(output_dir).resolve()
    if (out_dir / tune_results.SETTINGS_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a search; use --resume {out_dir} to continue it")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def resolve_resources(settings: dict, out_dir: Path, args: argparse.Namespace) -> dict:
    """Fix concurrency, CPUs per worker and storage for this cluster, so a resumed search keeps them."""
    base = TrainConfig.from_dict(settings["train"])
    concurrent = settings["max_concurrent_trials"] or tuning.default_concurrent_trials(
        workers_per_trial=base.num_workers, cpus_per_worker=args.cpus_per_worker, use_gpu=base.use_gpu
    )
    cpus = args.cpus_per_worker or tuning.cpus_per_worker(
        workers_per_trial=base.num_workers, concurrent_trials=concurrent
    )
    storage = settings["storage_path"] or str(out_dir / "ray_tune")
    if "://" not in storage:
        storage = str(Path(storage).resolve())  # Tune needs an absolute local path
    return settings | {
        "train": asdict(replace(base, cpus_per_worker=cpus)),
        "max_concurrent_trials": concurrent,
        "storage_path": storage,
    }


def run_search(
    out_dir: Path, settings: dict, space: SearchSpace, splits: DataSplits, *, resume: bool
) -> tuple[pd.DataFrame, dict] | None:
    """Run (or resume) the search on ``splits`` and write its results: the leaderboard and the best config.

    Returns None, and writes no results, if the search was interrupted (Ctrl+C) before every trial ended.
    """
    base = TrainConfig.from_dict(settings["train"])
    rows = splits.description["rows"]
    print(
        f"data: {rows['train']:,} train / {rows['val']:,} validation images ({', '.join(settings['data'])}); "
        f"{settings['num_samples']} trials of up to {base.epochs} epochs, {settings['search']} search, "
        f"ASHA grace period {settings['grace_period']}; {settings['max_concurrent_trials']} at a time, "
        f"each {base.num_workers} workers × {base.cpus_per_worker} CPU{' + 1 GPU' if base.use_gpu else ''}",
        flush=True,
    )
    trainable = tuning.trainable(
        splits.train, splits.val, base=base, train_storage_path=f"{settings['storage_path']}/train_runs"
    )
    if resume:
        tuner = tuning.restore_tuner(settings["storage_path"], trainable)
    else:
        tuner = tuning.build_tuner(
            trainable,
            space=space,
            search=settings["search"],
            seed=base.seed,
            num_samples=settings["num_samples"],
            max_concurrent_trials=settings["max_concurrent_trials"],
            max_epochs=base.epochs,
            grace_period=settings["grace_period"],
            reduction_factor=settings["reduction_factor"],
            storage_path=settings["storage_path"],
            callbacks=[tuning.ProgressLines(max_epochs=base.epochs, num_samples=settings["num_samples"])],
        )
    grid = tuner.fit()
    if not tuning.search_finished(grid, settings["num_samples"]):
        return None
    frame = tune_results.leaderboard([
        tune_results.trial_row(
            result.metrics.get("trial_id") or Path(result.path).name,
            result.config,
            result.metrics_dataframe,
            max_epochs=base.epochs,
            failed=result.error is not None,
        )
        for result in grid
    ])
    best = tune_results.best_config(frame, base)
    tune_results.write_results(out_dir, frame, best)
    return frame, best


def retrain_best(out_dir: Path, settings: dict, best: dict, splits: DataSplits) -> dict:
    """Train the best configuration on training + validation images into ``out_dir/best_model``.

    It trains for the epochs the best trial needed to reach its best validation
    accuracy, then reports test metrics like any run. Rerun after an interruption, it
    continues from the run's last checkpoint; a finished retraining is not repeated.
    """
    run_dir = out_dir / tune_results.BEST_MODEL_DIR
    if (run_dir / artifacts.METADATA_FILE).is_file():
        print(f"the best configuration was already retrained: {run_dir}", flush=True)
        return artifacts.read_json(run_dir / artifacts.METRICS_FILE)
    if (run_dir / artifacts.CONFIG_FILE).is_file():
        return run_training(run_dir, artifacts.read_json(run_dir / artifacts.CONFIG_FILE), splits)
    run_dir.mkdir(parents=True, exist_ok=True)
    trial = TrainConfig.from_dict(best["train"])
    epochs = best["best_epoch"]
    config = replace(
        trial,
        epochs=epochs,
        # A fixed number of epochs: validation loss (of images now trained on) must not end it sooner.
        early_stopping_patience=epochs,
        # The search shared the CPUs among the trials that ran at once; this run has them all.
        cpus_per_worker=max(trial.cpus_per_worker, default_cpus_per_worker(trial.num_workers)),
    )
    settings = run_settings(
        config,
        {key: settings[key] for key in DATA_KEYS},
        run_dir=run_dir,
        storage_path=f"{settings['storage_path']}/retrain",
        fit_on_validation=True,
    ) | {"search": {"output_dir": str(out_dir), "trial": best["trial"], "val_accuracy": best["val_accuracy"]}}
    print(f"\nretraining the best configuration ({tuning.describe(best)}) for {epochs} epochs on "
          f"training + validation images → {run_dir}", flush=True)
    return run_training(run_dir, settings, splits)
