"""Ray Tune over training: dropout and learning rate, ASHA early stopping, random or Optuna search.

Each trial is a Tune function trainable that builds the same ``TensorflowTrainer``
as a training run (:func:`mnist_ray.train.loop.build_trainer`) and forwards its
per-epoch reports to Tune with ``TuneReportCallback``. The trial itself is only
the driver of that Train run: it reserves no CPU (see :data:`TRIAL_DRIVER_RESOURCES`),
the Train workers do. The datasets are prepared once by the job and handed to
every trial through ``tune.with_parameters`` (Ray's object store), not reloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Sequence

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from mnist_ray.config import SEARCH_ALGORITHMS, TUNED_PARAMETERS, SearchSpace, TrainConfig
from mnist_ray.errors import MissingInput, UsageError
from mnist_ray.train.loop import build_trainer, format_progress

METRIC, MODE = "val_accuracy", "max"
# ASHA counts epochs as reported by the workers, not Tune's iterations: a trial that
# resumes from its Train checkpoint after an interruption keeps its epoch numbers.
TIME_ATTR = "epoch"
EXPERIMENT_NAME = "search"
# The trial only waits on its Train run. Tune's default (1 CPU per trial) would keep
# a CPU the trial's own Train workers need: on a 2-core machine, 2 workers × 1 CPU
# could then never be scheduled. Ray refuses a placement-group bundle with only zero
# amounts, so the trial reserves a little memory (logical, in bytes) instead.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 1024**2}


def param_space(space: SearchSpace) -> dict:
    """The Tune search space: dropout uniform, learning rate log-uniform, in ``space``'s ranges."""
    return {
        "dropout": tune.uniform(*space.dropout),
        "learning_rate": tune.loguniform(*space.learning_rate),
    }


def trial_config(base: TrainConfig, sampled: dict) -> TrainConfig:
    """The training configuration of one trial: the base run with the sampled values."""
    return dataclasses.replace(base, **{name: float(sampled[name]) for name in TUNED_PARAMETERS})


def run_trial(
    sampled: dict,
    *,
    train: ray.data.Dataset,
    val: ray.data.Dataset,
    base: TrainConfig,
    train_storage_path: str,
) -> None:
    """A Tune trial: one distributed training run whose epochs Tune sees (and ASHA may stop)."""
    config = trial_config(base, sampled)
    trainer = build_trainer(
        config,
        train,
        val,
        # The trial id names the Train run, so a trial restarted after an interruption
        # finds its own checkpoints and continues from its last epoch.
        run_name=tune.get_context().get_trial_id(),
        storage_path=train_storage_path,
        callbacks=[TuneReportCallback()],
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def trainable(train: ray.data.Dataset, val: ray.data.Dataset, *, base: TrainConfig, train_storage_path: str):
    """``run_trial`` with the datasets and the base configuration bound, and its resources."""
    return tune.with_resources(
        tune.with_parameters(
            run_trial, train=train, val=val, base=base, train_storage_path=train_storage_path
        ),
        TRIAL_DRIVER_RESOURCES,
    )


def check_search_algorithm(name: str) -> None:
    """Refuse (``UsageError``) an unknown search algorithm, or Optuna when it is not installed."""
    if name not in SEARCH_ALGORITHMS:
        raise UsageError(f"unknown search algorithm {name!r}; expected one of {', '.join(SEARCH_ALGORITHMS)}")
    if name == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UsageError(
            "--search optuna needs the optional dependency optuna: pip install -e '.[tune]' "
            "(or pip install optuna), or use --search random"
        )


def make_searcher(name: str, seed: int, max_concurrent: int):
    """Random search (seeded) or Optuna's TPE sampler; both read the Tune search space."""
    check_search_algorithm(name)
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Tune wraps a Searcher in a ConcurrencyLimiter for max_concurrent_trials.
        return OptunaSearch(seed=seed)
    # Tune applies max_concurrent_trials only to a generator it creates itself.
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def make_scheduler(*, max_epochs: int, grace_period: int, reduction_factor: int) -> ASHAScheduler:
    """ASHA on validation accuracy: a trial below its rung's top 1/reduction_factor stops.

    ASHA's ``max_t`` is one epoch past the last: at ``max_t`` ASHA stops a trial, and Tune
    then ends the trial's actor at once, killing its Ray Train controller mid-shutdown. The
    Train run's placement group then lingers until Ray Train's cleaner removes it, and its
    CPU reservation with Ray's AutoscalingCoordinator (which Ray Data consults) for 180 s
    (seen on Ray 2.60). Past the last epoch, a trial that ran every epoch returns by
    itself and its Train run shuts down cleanly.
    """
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=max_epochs + 1,
        grace_period=min(grace_period, max_epochs),
        reduction_factor=reduction_factor,
    )


def cpus_per_worker(*, workers_per_trial: int, concurrent_trials: int) -> int:
    """The cluster's CPUs shared among all workers of the trials that run at once (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // (workers_per_trial * concurrent_trials))


def default_concurrent_trials(*, workers_per_trial: int, cpus_per_worker: int | None, use_gpu: bool) -> int:
    """As many trials at once as the cluster has room for all their workers (at least 1)."""
    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)) // workers_per_trial)
    return max(1, int(resources.get("CPU", 1)) // (workers_per_trial * (cpus_per_worker or 1)))


class ProgressLines(tune.Callback):
    """Live progress of the search as plain lines: trial started, each epoch, finished or failed."""

    def __init__(self, *, max_epochs: int, num_samples: int):
        self.max_epochs = max_epochs
        self.num_samples = num_samples
        self.started = 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started += 1
        self._print(
            f"trial {trial.trial_id} started ({self.started}/{self.num_samples} this session): "
            f"{describe(trial.config)}"
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if TIME_ATTR not in result:
            return
        line = f"trial {trial.trial_id} {format_progress(result, self.max_epochs)}"
        # Tune marks the result on which the scheduler stopped a trial as done.
        if result.get("done") and result[TIME_ATTR] < self.max_epochs:
            line += "  → stopped by ASHA"
        self._print(line)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # The best epoch's figure (Tune keeps it across restores), as the leaderboard ranks trials:
        # the last epoch's may be lower.
        result = trial.last_result or {}
        best = trial.metric_analysis.get(METRIC, {}).get("max", float("nan"))
        self._print(
            f"trial {trial.trial_id} finished after {result.get(TIME_ATTR, 0)} epochs: "
            f"best val_acc {best:.4f}"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(f"trial {trial.trial_id} failed: see {trial.local_path}/error.txt")

    @staticmethod
    def _print(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def describe(sampled: dict) -> str:
    return f"dropout {sampled['dropout']:.3f}, learning rate {sampled['learning_rate']:.2e}"


def build_tuner(
    trainable_fn,
    *,
    space: SearchSpace,
    search: str,
    seed: int,
    num_samples: int,
    max_concurrent_trials: int,
    max_epochs: int,
    grace_period: int,
    reduction_factor: int,
    storage_path: str,
    callbacks: Sequence[tune.Callback] = (),
) -> tune.Tuner:
    """A new Tuner maximising validation accuracy over ``space``."""
    searcher = make_searcher(search, seed, max_concurrent_trials)
    return tune.Tuner(
        trainable_fn,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=make_scheduler(
                max_epochs=max_epochs, grace_period=grace_period, reduction_factor=reduction_factor
            ),
            num_samples=num_samples,
            # A BasicVariantGenerator limits concurrency itself (Tune would warn and ignore this).
            max_concurrent_trials=(
                None if isinstance(searcher, BasicVariantGenerator) else max_concurrent_trials
            ),
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=storage_path,
            callbacks=list(callbacks),
            # Our ProgressLines replace Tune's periodic status tables.
            verbose=0,
        ),
    )


def experiment_path(storage_path: str) -> str:
    return f"{storage_path.rstrip('/')}/{EXPERIMENT_NAME}"


def search_finished(grid: tune.ResultGrid, num_samples: int) -> bool:
    """Whether every trial ended (Tune returns normally, with trials unfinished, after Ctrl+C)."""
    # Terminated: ran every epoch or was stopped early; errored: failed for good.
    return len(grid) == num_samples and grid.num_terminated + grid.num_errors == num_samples


def restore_tuner(storage_path: str, trainable_fn) -> tune.Tuner:
    """Reopen an interrupted search: finished trials are kept, unfinished ones continue."""
    path = experiment_path(storage_path)
    if not tune.Tuner.can_restore(path):
        raise MissingInput(f"{path}: no Tune experiment to resume there")
    # Errored trials run again from their last Train checkpoint (the trial id names the Train run).
    return tune.Tuner.restore(path, trainable=trainable_fn, resume_unfinished=True, restart_errored=True)
