"""Distributed training: the per-worker loop and the ``TensorflowTrainer`` that runs it.

Each Ray Train worker receives its shard of the ``train`` and ``val`` datasets.
When the shard fits (MNIST shards are tens of MB) it is materialised once as uint8
arrays and fed to ``tf.data`` from memory: measured here, 2–4× faster than
streaming ``to_tf()`` batches every epoch. A training shard too big for that is
streamed from Ray Data every epoch instead (``--data-path``); the validation shard is
always held in memory (see :func:`stream_inputs`). The model trains under
``MultiWorkerMirroredStrategy`` (a lone worker under TensorFlow's default strategy);
every epoch all workers save a checkpoint (collective reads require all of them) and
rank 0 hands it to Ray Train.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import ray
import ray.train
import tensorflow as tf
import tf_keras as keras
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.tensorflow import TensorflowTrainer

from mnist_ray import TENSORFLOW_ENV
from mnist_ray.config import TrainConfig
from mnist_ray.data.schema import IMAGE, LABEL
from mnist_ray.model import build_model, compile_model
from mnist_ray.runtime import configure_tensorflow
from mnist_ray.train.progress import Progress, in_background, say
from mnist_ray.train.schedules import schedule_callbacks

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
# Checkpoints kept per run: the best few by validation accuracy (Ray also keeps the latest).
CHECKPOINTS_TO_KEEP = 3
# --data-path auto keeps a shard in memory when it takes at most this share of the memory
# available to each worker on its node (the rest is TensorFlow's, the object store's, the OS's).
MEMORY_SHARE_FOR_SHARD = 0.25
BYTES_PER_IMAGE = 28 * 28 + 8  # uint8 pixels and an int64 label
# Rows each streaming worker shuffles among (Ray Data's local shuffle buffer).
STREAM_SHUFFLE_ROWS = 10_000


def fit_distributed(
    config: TrainConfig,
    train: ray.data.Dataset,
    val: ray.data.Dataset,
    *,
    run_name: str,
    storage_path: str,
) -> ray.train.Result:
    """Train with ``config.num_workers`` Ray Train workers; returns Ray Train's result.

    A run whose ``run_name`` already has checkpoints under ``storage_path`` resumes
    from the latest one (Ray Train restores the run's checkpoint manager). The workers'
    progress lines are printed here, as they come (:class:`~mnist_ray.train.progress.Progress`).
    """
    with Progress() as progress:
        trainer = build_trainer(config, train, val, run_name=run_name, storage_path=storage_path,
                                progress=progress.queue)
        return in_background(trainer.fit)


def build_trainer(
    config: TrainConfig,
    train: ray.data.Dataset,
    val: ray.data.Dataset,
    *,
    run_name: str,
    storage_path: str,
    callbacks: Sequence[UserCallback] = (),
    progress=None,
    progress_label: str = "",
) -> TensorflowTrainer:
    """The ``TensorflowTrainer`` of one training run, shared by training jobs and Tune trials.

    ``callbacks`` are Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` in a trial;
    ``progress`` the queue of the driver's :class:`~mnist_ray.train.progress.Progress`, if it
    prints the workers' lines, each after ``progress_label`` (an ensemble's member).
    """
    return TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        # The row counts let each worker size its shard and its steps without reading it
        # (the datasets are materialised: counting them reads no data).
        train_loop_config={"config": config, "train_rows": train.count(), "val_rows": val.count(),
                           "progress": progress, "progress_label": progress_label},
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=CHECKPOINTS_TO_KEEP,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": dict(TENSORFLOW_ENV)},
            callbacks=list(callbacks),
            # At INFO Ray Train prints every checkpoint it persists around rank 0's one progress
            # line per epoch; its log files keep them.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train, "val": val},
    )


def scaling_config(config: TrainConfig) -> ScalingConfig:
    """The workers Ray Train starts: how many, what each reserves, and how they are placed on nodes."""
    return ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=config.use_gpu,
        resources_per_worker={"CPU": config.cpus_per_worker} | ({"GPU": 1} if config.use_gpu else {}),
        placement_strategy=config.placement_strategy,
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: build, (resume,) fit, report every epoch.

    ``loop_config``: the run's ``config`` (a :class:`TrainConfig`), the row counts of
    the ``train_rows`` and ``val_rows`` datasets, and the ``progress`` queue (or None).
    """
    config: TrainConfig = loop_config["config"]
    progress, label = loop_config["progress"], loop_config["progress_label"]
    # Ray Train logs each report of each worker at INFO through a logger named after its file
    # path (Ray 2.60), out of LoggingConfig's reach: the root level is what silences it.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # On a cluster, where each worker ran is the first thing to know when one is slow or fails.
    runtime = ray.get_runtime_context()
    gpus = runtime.get_accelerator_ids().get("GPU", [])
    say(progress, label + f"worker {rank} of {context.get_world_size()} on node {runtime.get_node_id()} "
                  f"(host {socket.gethostname()}{', GPU ' + ','.join(gpus) if gpus else ''})")
    # MultiWorkerMirroredStrategy logs every collective at INFO; keep worker logs readable.
    tf.get_logger().setLevel("WARNING")
    # Non-chief workers save to a scratch path without the .keras suffix (only
    # rank 0's copy is kept); tf-keras then warns about HDF5 on every epoch.
    warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
    configure_tensorflow(cpus=config.cpus_per_worker, use_gpu=config.use_gpu,
                         mixed_precision=config.mixed_precision)
    keras.utils.set_random_seed(config.seed + rank)
    world = context.get_world_size()
    # A lone worker has nobody to all-reduce with: the default strategy spares it
    # MultiWorkerMirroredStrategy's collective ops on every step.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()

    # Ray gives every worker an equal share (streaming_split(equal=True): the floor of
    # rows ÷ workers), so all workers agree on the step counts; MultiWorkerMirroredStrategy
    # hangs if they do not.
    train_rows, val_rows = loop_config["train_rows"] // world, loop_config["val_rows"] // world
    if train_rows < 1 or val_rows < 1:
        raise RuntimeError(
            f"each of the {world} workers would get {train_rows} training and {val_rows} validation "
            "images: use fewer workers or more images"
        )
    # A shard smaller than a batch still trains: one (partial) batch per epoch.
    steps_per_epoch = max(1, train_rows // config.batch_size)
    validation_steps = math.ceil(val_rows / config.batch_size)
    from_memory = feeds_from_memory(config.data_path, train_rows + val_rows, context.get_local_world_size())
    if rank == 0:
        say(progress, label + f"data path: {'memory' if from_memory else 'stream'} ({train_rows:,} training "
                      f"and {val_rows:,} validation images per worker)")
    train_input, val_input = (
        memory_inputs(config, rank) if from_memory else stream_inputs(config, rank, train_rows)
    )
    # Per-replica batches from each worker's own shard: Ray already sharded, so
    # TensorFlow must neither re-shard nor re-batch.
    train_data = strategy.distribute_datasets_from_function(train_input)
    val_data = strategy.distribute_datasets_from_function(val_input)

    initial_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as ckpt_dir:
                model = keras.models.load_model(os.path.join(ckpt_dir, MODEL_FILE))
                with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
                    state = json.load(f)
            initial_epoch, history = state["epoch"], state["history"]
            if rank == 0:
                say(progress, label + f"resuming from the checkpoint of epoch {initial_epoch}")
        else:
            model = build_model(config.model, dropout=config.dropout, augment=config.augment)
            compile_model(model, config.learning_rate)
        # Set, not compiled in: a model restored from a checkpoint keeps its optimiser state.
        model.jit_compile = config.xla

    callbacks = [
        *schedule_callbacks(config, steps_per_epoch),
        ReportToRayTrain(
            rank=rank,
            epochs=config.epochs,
            images_per_epoch=steps_per_epoch * config.global_batch_size,
            history=history,
            progress=progress,
            label=label,
        ),
    ]
    if initial_epoch >= config.epochs:
        return
    model.fit(
        train_data,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        validation_data=val_data,
        validation_steps=validation_steps,
        callbacks=callbacks,
        verbose=0,
    )


InputFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def feeds_from_memory(data_path: str, images_per_worker: int, workers_on_node: int) -> bool:
    """Whether a worker materialises its training shard (``memory``) or streams it (``stream``);
    ``auto`` decides by the size of its shards (training and validation) against this node's
    available memory shared among its workers."""
    if data_path != "auto":
        return data_path == "memory"
    budget = MEMORY_SHARE_FOR_SHARD * available_memory_bytes() / max(1, workers_on_node)
    return images_per_worker * BYTES_PER_IMAGE <= budget


def available_memory_bytes() -> int:
    """Memory the OS can still give out on this node (MemAvailable: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # free memory only: cautious


def memory_inputs(config: TrainConfig, rank: int) -> tuple[InputFn, InputFn]:
    """Input functions over the worker's shards, both materialised once as uint8 arrays."""
    x_train, y_train = shard_to_arrays(ray.train.get_dataset_shard("train"))

    def train_input(_ctx) -> tf.data.Dataset:
        return (
            tf.data.Dataset.from_tensor_slices((x_train, y_train))
            .shuffle(len(x_train), seed=config.seed + rank, reshuffle_each_iteration=True)
            .repeat()
            .batch(config.batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    return train_input, validation_input(config)


def stream_inputs(config: TrainConfig, rank: int, train_rows: int) -> tuple[InputFn, InputFn]:
    """Input functions that stream the worker's training shard from Ray Data, one pass per epoch.

    The training input repeats: an epoch is exactly one pass (``steps_per_epoch`` full
    batches), and the next pass starts when Keras asks for the next batch. Keras opens
    that iterator once per ``fit``, so every worker starts each pass of its streamed split
    in step with the others, as Ray's ``streaming_split`` requires.

    The validation shard is held in memory even here: Keras opens a *new* iterator on the
    validation data at every epoch's evaluation while the previous one, prefetching, may
    already have started the next pass of the split. Streamed, the workers' passes then
    drift apart and one waits forever at Ray's epoch barrier (seen in CI: one worker in
    ``evaluate``, the other in its collective checkpoint save).
    """
    train_shard = ray.train.get_dataset_shard("train")

    def train_input(_ctx) -> tf.data.Dataset:
        return train_shard.to_tf(
            IMAGE, LABEL, batch_size=config.batch_size, drop_last=train_rows >= config.batch_size,
            local_shuffle_buffer_size=STREAM_SHUFFLE_ROWS, local_shuffle_seed=config.seed + rank,
        ).repeat().prefetch(tf.data.AUTOTUNE)

    return train_input, validation_input(config)


def validation_input(config: TrainConfig) -> InputFn:
    """The input function over the worker's validation shard, materialised once as uint8 arrays."""
    x_val, y_val = shard_to_arrays(ray.train.get_dataset_shard("val"))

    def val_input(_ctx) -> tf.data.Dataset:
        return (
            tf.data.Dataset.from_tensor_slices((x_val, y_val))
            .batch(config.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    return val_input


def shard_to_arrays(shard) -> tuple[np.ndarray, np.ndarray]:
    """Materialise a worker's dataset shard as (images uint8 (n, 28, 28), labels int64 (n,))."""
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):
        images.append(batch[IMAGE])
        labels.append(batch[LABEL])
    if not images:
        raise RuntimeError(
            "this worker received no data: use fewer workers or more images "
            f"(rank {ray.train.get_context().get_world_rank()})"
        )
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int64)


class ReportToRayTrain(keras.callbacks.Callback):
    """Reports metrics and a checkpoint to Ray Train every epoch; rank 0 sends a progress line."""

    def __init__(self, *, rank: int, epochs: int, images_per_epoch: int, history: list, progress=None,
                 label: str = ""):
        super().__init__()
        self.rank = rank
        self.progress, self.label = progress, label
        self.epochs = epochs
        self.images_per_epoch = images_per_epoch
        self.history = list(history)
        self.epoch_start = time.perf_counter()
        self.train_seconds: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.train_seconds = None

    def on_test_begin(self, logs=None):
        # Validation starts: the training part of the epoch is over.
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = time.perf_counter()
        record = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"]),
            "accuracy": float(logs["accuracy"]),
            "val_loss": float(logs["val_loss"]),
            "val_accuracy": float(logs["val_accuracy"]),
            "learning_rate": float(keras.backend.get_value(self.model.optimizer.learning_rate)),
            "images_per_s": self.images_per_epoch / (self.train_seconds or now - self.epoch_start),
            "epoch_seconds": now - self.epoch_start,
            # When the epoch ended (Unix time): benchmarks/time_to_accuracy.py measures from the job's start.
            "wall_time": time.time(),
        }
        self.history.append(record)
        with tempfile.TemporaryDirectory() as tmp:
            # Every worker saves (reading mirrored BatchNorm statistics is a
            # collective); only rank 0's copy becomes the checkpoint.
            self.model.save(os.path.join(tmp, MODEL_FILE))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({"epoch": epoch + 1, "history": self.history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            ray.train.report(record, checkpoint=checkpoint)
        if self.rank == 0:
            say(self.progress, self.label + format_progress(record, self.epochs))


def format_progress(record: dict, epochs: int) -> str:
    """One progress line per epoch, as printed by the job."""
    return (
        f"epoch {record['epoch']:>3}/{epochs}  loss {record['loss']:.4f}  "
        f"acc {record['accuracy']:.4f}  val_loss {record['val_loss']:.4f}  "
        f"val_acc {record['val_accuracy']:.4f}  lr {record['learning_rate']:.2e}  "
        f"{record['images_per_s']:,.0f} img/s  {record['epoch_seconds']:.0f}s"
    )

