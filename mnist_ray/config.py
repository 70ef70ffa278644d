"""Typed settings of the jobs, with one way in and out of JSON, and the choices flags offer.

A training run's settings (:class:`RunSettings`) and a search's (:class:`SearchSettings`)
are written once as ``config.json`` / ``search.json`` and read back by ``--resume``;
the same :class:`TrainConfig` object the flags produced reaches every Ray Train worker.
:func:`to_json` and :func:`from_json` are the only converters: reading refuses unknown
keys, missing keys and values of the wrong type, naming the file and the key. No TensorFlow.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mnist_ray.errors import InputError

MODEL_KINDS = ("deep_cnn", "cnn", "mlp")
# How the learning rate moves: one cycle (up for a quarter of the run, then down along a cosine
# to almost 0), or held until validation loss stops improving (halved, with early stopping).
SCHEDULES = ("onecycle", "plateau")
# Ray placement-group strategies for the training workers: PACK fills a node before the
# next (fast collectives), SPREAD prefers different nodes, STRICT_SPREAD requires them.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
# How a worker feeds its shard to TensorFlow: from memory (materialised once as uint8 arrays),
# streamed from Ray Data every epoch, or whichever fits (see mnist_ray.train.loop.feeds_from_memory).
DATA_PATHS = ("auto", "memory", "stream")
# Where the scoring job scores rows: with Ray Data, in its own process, or whichever suits the
# input (see mnist_ray.score.inference.choose_executor).
SCORE_EXECUTORS = ("auto", "ray", "local")
# Inputs up to this size (~140,000 CSV rows) are scored in the job's own process when no cluster
# is named: on one small machine that takes ~30 s, about what starting Ray and loading the model
# in its actors costs before the first row is scored (benchmarks/score_throughput.py measures both).
LOCAL_SCORING_MAX_BYTES = 256 << 20
SEARCH_ALGORITHMS = ("random", "optuna")
TUNED_PARAMETERS = ("dropout", "learning_rate")
# A quick check of the whole path: this many images (and 1 epoch; a search: 2 trials of 2).
SMOKE_TEST_LIMIT = 2000
# jobs/serve.py: requests one replica batches into one model call (the page and most clients send
# one image per request), and the HTTP port (Ray Serve's own default).
SERVE_MAX_BATCH_SIZE = 32
SERVE_PORT = 8000


class SettingsError(InputError):
    """A settings file (config.json, search.json) that does not hold what this code reads."""


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes. Saved with every run."""

    model: str = "deep_cnn"
    epochs: int = 30  # one cycle: 30 gave 99.72 / 99.61 % (seeds 0, 1), 20 gave 99.68 / 99.60 / 99.64 %
    batch_size: int = 64  # per worker; the global batch is batch_size × num_workers
    learning_rate: float = 3e-3  # the peak, with the one-cycle schedule
    schedule: str = "onecycle"
    dropout: float = 0.4
    augment: bool = True
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int | None = None  # None: the cluster's CPUs shared among the workers (set by the job)
    placement_strategy: str = "PACK"
    mixed_precision: bool = False
    xla: bool = False
    data_path: str = "auto"
    seed: int = 0
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 2
    max_failures: int = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_workers


@dataclass
class DataConfig:
    """Which images a run trains and is tested on (see :func:`mnist_ray.data.splits.load_splits`)."""

    data: list[str] = field(default_factory=lambda: ["bundled"])
    test_data: list[str] | None = None
    limit: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class SearchOrigin:
    """Where a run that retrains a search's best configuration comes from."""

    output_dir: str
    trial: str
    val_accuracy: float


@dataclass
class RunSettings:
    """What a run's ``config.json`` holds: the training config, the data, where checkpoints go.

    ``fit_on_validation`` (a final model trained for a fixed number of epochs, e.g. the
    best configuration of a search) adds the validation images to the training data and
    keeps the last epoch's model: validation accuracy can no longer choose an epoch.
    """

    train: TrainConfig
    data: DataConfig
    storage_path: str
    run_name: str
    fit_on_validation: bool = False
    search: SearchOrigin | None = None
    members: int = 1  # more: an ensemble of this many models (mnist_ray.train.ensemble)


@dataclass(frozen=True)
class SearchSpace:
    """What a search samples: dropout uniformly, the learning rate log-uniformly, in these closed ranges."""

    dropout: tuple[float, float] = (0.1, 0.6)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)

    def problem(self) -> str | None:
        """What is wrong with these ranges, if anything."""
        low, high = self.dropout
        if not 0.0 <= low < high < 1.0:
            return f"the dropout range must satisfy 0 <= LOW < HIGH < 1, got {low} {high}"
        low, high = self.learning_rate
        if not 0.0 < low < high:
            return f"the learning-rate range must satisfy 0 < LOW < HIGH, got {low} {high}"
        return None

    def contains(self, sampled: dict) -> bool:
        return all(
            getattr(self, name)[0] <= sampled[name] <= getattr(self, name)[1] for name in TUNED_PARAMETERS
        )


# A search's trials run at most this many epochs (ASHA stops most sooner): fewer than a single
# run's default, so that a search of 8 trials stays within hours on a small machine.
SEARCH_MAX_EPOCHS = 20


@dataclass
class SearchSettings:
    """What a search's ``search.json`` holds; ``storage_path`` and ``max_concurrent_trials`` are
    fixed once Ray is up (so that a resumed search keeps them)."""

    train: TrainConfig
    data: DataConfig
    space: SearchSpace = field(default_factory=SearchSpace)
    search: str = "random"
    num_samples: int = 8
    max_concurrent_trials: int | None = None
    grace_period: int = 2
    reduction_factor: int = 3
    storage_path: str | None = None


@dataclass(frozen=True)
class InferenceOptions:
    """How scoring runs inference: ``batch_size`` images per call; with Ray, up to ``concurrency``
    actors × ``cpus_per_actor`` CPUs (+ 1 GPU each with ``use_gpu``).

    ``concurrency`` None means as many actors as the cluster has room for (see :meth:`resolved`).
    """

    batch_size: int = 1024
    concurrency: int | None = None
    cpus_per_actor: int = 1
    use_gpu: bool = False

    def resolved(self, cluster: dict[str, float]) -> InferenceOptions:
        """These options with ``concurrency`` None (auto) set to as many actors as ``cluster`` holds."""
        if self.concurrency is not None:
            return self
        if self.use_gpu:
            fits = int(cluster.get("GPU", 0))
        else:
            fits = int(cluster.get("CPU", 0)) // self.cpus_per_actor
        return dataclasses.replace(self, concurrency=max(1, fits))


def to_json(settings: Any) -> dict:
    """A settings dataclass as a JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(settings)


T = TypeVar("T")


def from_json(cls: type[T], value: Any, where: str) -> T:
    """The ``cls`` dataclass that ``value`` (parsed JSON) describes; ``where`` names it in errors.

    Raises ``SettingsError`` for a key ``cls`` does not have, a required key that is
    missing, or a value of the wrong type.
    """
    return _convert(cls, value, where)


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SettingsError(f"{where}: expected a list, found {value!r}")
        args = typing.get_args(kind)
        if origin is tuple:
            if len(value) != len(args):
                raise SettingsError(f"{where}: expected {len(args)} values, found {value!r}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_convert(arg, v, f"{where}[{i}]") for i, (arg, v) in pairs)
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    # JSON has one number type: an integral float is accepted for an int, any int for a float.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise SettingsError(f"{where}: expected {kind.__name__}, found {value!r}")
    return value


def _dataclass(cls: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected an object, found {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = [
        name for name, f in fields.items()
        if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SettingsError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**{name: _convert(hints[name], v, f"{where}.{name}") for name, v in value.items()})
