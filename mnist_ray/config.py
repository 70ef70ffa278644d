"""The training configuration: one dataclass, light to import (no TensorFlow)."""

from __future__ import annotations

from dataclasses import dataclass, fields

MODEL_KINDS = ("cnn", "mlp")
# Ray placement-group strategies for the training workers: PACK fills a node before the
# next (fast collectives), SPREAD prefers different nodes, STRICT_SPREAD requires them.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")


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
