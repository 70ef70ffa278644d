"""Ensembles: N members trained as separate Ray Train runs, averaged into one model.

Member ``k`` is the run's configuration with seed ``seed + k`` (initial weights, shuffling and
augmentation differ; the data splits are the run's), trained as a Ray Train run of its own
(``member-k`` under the run's storage path). As many members train at once as the cluster
holds all their workers; each is driven by a small Ray task, so that the job's own process
only waits (and answers SIGTERM at once). A member is selected, like a single run, at its best
validation epoch. The ensemble is one Keras model whose output is the mean of the members'
probabilities: one ``model.keras`` (built-in layers only: it loads without this package) and
one ``model.onnx``, so scoring, reports and the registry need nothing new.

``--resume`` runs every member again under its own name: Ray Train continues an interrupted
one from its latest checkpoint, and a finished one returns at once with its results.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import ray
import ray.train

from mnist_ray.config import TrainConfig
from mnist_ray.runtime import beside_the_driver
from mnist_ray.train.loop import MODEL_FILE, STATE_FILE, build_trainer
from mnist_ray.train.progress import Progress

# A member's driver task only waits on its Train run: like a Tune trial's (mnist_ray.tune.search),
# it must not hold a CPU that the members' workers need.
MEMBER_DRIVER_MEMORY = 256 * 1024**2


@dataclasses.dataclass
class Member:
    """One trained member: its seed, its selected epoch's metrics, its history, its model's checkpoint."""

    index: int
    seed: int
    best: dict
    history: list[dict]
    checkpoint: ray.train.Checkpoint


def member_config(config: TrainConfig, index: int) -> TrainConfig:
    return dataclasses.replace(config, seed=config.seed + index)


def concurrent_members(config: TrainConfig) -> int:
    """How many members' workers the cluster holds at once (at least 1)."""
    resources = ray.cluster_resources()
    if config.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // config.num_workers)
    return max(1, int(resources.get("CPU", 1)) // (config.num_workers * config.cpus_per_worker))


def train_members(
    config: TrainConfig, members: int, train: ray.data.Dataset, val: ray.data.Dataset, *, storage_path: str
) -> list[Member]:
    """Train ``members`` members of ``config`` (see the module's doc); returns them in order."""
    at_once = min(members, concurrent_members(config))
    print(f"ensemble: {members} members (seeds {config.seed}..{config.seed + members - 1}), "
          f"{at_once} at a time", flush=True)
    with Progress() as progress:
        waiting, running, done = list(range(members)), {}, {}
        while waiting or running:
            while waiting and len(running) < at_once:
                k = waiting.pop(0)
                fit = _fit_member.options(scheduling_strategy=beside_the_driver())  # never on a lost node
                running[fit.remote(member_config(config, k), train, val, run_name=f"member-{k}",
                                   storage_path=storage_path, progress=progress.queue,
                                   label=f"member {k}: ")] = k
            finished, _ = ray.wait(list(running), num_returns=1, timeout=0.5)  # short: signals act at once
            for ref in finished:
                k = running.pop(ref)
                best, history, checkpoint = ray.get(ref)
                done[k] = Member(k, config.seed + k, best, history, checkpoint)
                print(f"member {k} done: val_acc {best['val_accuracy']:.4f} at epoch {best['epoch']}",
                      flush=True)
    return [done[k] for k in range(members)]


@ray.remote(num_cpus=0, memory=MEMBER_DRIVER_MEMORY)
def _fit_member(config: TrainConfig, train, val, *, run_name: str, storage_path: str, progress,
                label: str) -> tuple[dict, list[dict], ray.train.Checkpoint]:
    """One member's Ray Train run: (its best epoch's metrics, its history, that epoch's checkpoint)."""
    result = build_trainer(config, train, val, run_name=run_name, storage_path=storage_path,
                           progress=progress, progress_label=label).fit()
    if result.error:
        raise result.error
    checkpoint, best = max(result.best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    with result.checkpoint.as_directory() as directory:
        history = json.loads(Path(directory, STATE_FILE).read_text())["history"]
    return best, history, checkpoint


def average_model(members: list[Member]):
    """One Keras model whose output ``probs`` is the mean of the members' probabilities."""
    import tf_keras as keras

    from mnist_ray.data.schema import IMAGE_SHAPE

    models = []
    for member in members:
        with member.checkpoint.as_directory() as directory:
            model = keras.models.load_model(os.path.join(directory, MODEL_FILE), safe_mode=True)
        model._name = f"member_{member.index}"  # one model may not hold two layers of one name
        models.append(model)
    inputs = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="pixels")
    outputs = keras.layers.Average(name="probs")([model(inputs) for model in models])
    return keras.Model(inputs, outputs, name=f"digits_ensemble_of_{len(models)}")


def member_records(members: list[Member], test_accuracy: list[float]) -> list[dict]:
    """What metadata.json says of each member (the report shows it)."""
    return [
        {"member": m.index, "seed": m.seed, "selected_epoch": m.best["epoch"],
         "val_accuracy": m.best["val_accuracy"], "test_accuracy": accuracy, "epochs_run": len(m.history)}
        for m, accuracy in zip(members, test_accuracy, strict=True)
    ]
