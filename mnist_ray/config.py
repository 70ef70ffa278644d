"""The jobs' configuration: the training dataclass and the choices flags offer (no TensorFlow)."""

from __future__ import annotations

from dataclasses import dataclass, fields

MODEL_KINDS = ("cnn", "mlp")
# Ray placement-group strategies for the training workers: PACK fills a node before the
# next (fast collectives), SPREAD prefers different nodes, STRICT_SPREAD requires them.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
# How a worker feeds its shard to TensorFlow: from memory (materialised once as uint8 arrays),
# streamed from Ray Data every epoch, or whichever fits (see mnist_ray.training.feeds_from_memory).
DATA_PATHS = ("auto", "memory", "stream")
# Where the scoring job scores rows: with Ray Data, in its own process, or whichever suits the
# input (see mnist_ray.scoring.choose_executor).
SCORE_EXECUTORS = ("auto", "ray", "local")
# Inputs up to this size (~140,000 CSV rows) are scored in the job's own process when no cluster
# is named: on one small machine that takes ~30 s, about what starting Ray and loading the model
# in its actors costs before the first row is scored (benchmarks/score_throughput.py measures both).
LOCAL_SCORING_MAX_BYTES = 256 << 20


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes. Saved with every run."""

    model: str = "cnn"
    epochs: int = 20
    batch_size: int = 128  # per worker; the global batch is batch_size × num_workers
    learning_rate: float = 1e-3
    dropout: float = 0.25
    augment: bool = True
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    placement_strategy: str = "PACK"
    mixed_precision: bool = False
    xla: bool = False
    data_path: str = "auto"
    seed: int = 0
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 2
    max_failures: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_workers


SEARCH_ALGORITHMS = ("random", "optuna")
TUNED_PARAMETERS = ("dropout", "learning_rate")


@dataclass(frozen=True)
class SearchSpace:
    """What a search samples: dropout uniformly, the learning rate log-uniformly, in these closed ranges."""

    dropout: tuple[float, float] = (0.1, 0.6)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)

    def __post_init__(self):
        low, high = self.dropout
        if not 0.0 <= low < high < 1.0:
            raise ValueError(f"the dropout range must satisfy 0 <= LOW < HIGH < 1, got {low} {high}")
        low, high = self.learning_rate
        if not 0.0 < low < high:
            raise ValueError(f"the learning-rate range must satisfy 0 < LOW < HIGH, got {low} {high}")

    def contains(self, config: dict) -> bool:
        return all(
            getattr(self, name)[0] <= config[name] <= getattr(self, name)[1] for name in TUNED_PARAMETERS
        )
