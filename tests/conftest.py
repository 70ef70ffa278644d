"""Shared fixtures: the bundled MNIST arrays, one local Ray instance per test session, a tiny real model,
and the session's MLflow store (every job the tests run tracks there, never into the checkout)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import mnist_ray  # noqa: F401  (selects tf-keras before anything imports TensorFlow)

BUNDLED_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@pytest.fixture(scope="session")
def mnist_arrays() -> dict[str, np.ndarray]:
    """The four arrays of the bundled mnist.npz, loaded once. Treat them as read-only."""
    from mnist_ray.data.sources import BUNDLED_MNIST

    with np.load(BUNDLED_MNIST, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in BUNDLED_NPZ_KEYS}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance (2 CPUs, no dashboard) shared by every test that needs Ray.

    ``address="local"`` always starts a fresh instance for the tests: never attach to a
    cluster that happens to be running on this machine (RAY_ADDRESS, ``ray start``).
    If Ray is already initialised in this process it is used as is and left running.
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# Enough for ~94 % accuracy: a weaker model predicts a class mix that the batch reports
# rightly flag as a shift even for an unskewed batch.
TINY_TRAIN_IMAGES, TINY_EPOCHS = 3000, 2


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_arrays) -> Path:
    """A run directory with a real model (an MLP fitted 2 epochs on 3,000 images), without Ray Train:
    model.keras, and model.onnx exported and verified, and its int8 copy, as a training run does.

    Its metadata records the class counts of those images, as a real run's does.
    Treat it as read-only: copy it to change it.
    """
    import tf_keras as keras

    from mnist_ray import artifacts
    from mnist_ray.evaluation import classification_metrics
    from mnist_ray.model import build_model, compile_model
    from mnist_ray.train.export import export_onnx
    from mnist_ray.train.quantize import write_int8_copy

    keras.utils.set_random_seed(0)
    model = compile_model(build_model("mlp", dropout=0.1), learning_rate=1e-3)
    x, y = mnist_arrays["x_train"][:TINY_TRAIN_IMAGES], mnist_arrays["y_train"][:TINY_TRAIN_IMAGES]
    model.fit(x, y, epochs=TINY_EPOCHS, batch_size=64, verbose=0)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_dir.mkdir()
    model.save(run_dir / artifacts.MODEL_FILE)
    config = {"train": {"model": "mlp", "epochs": TINY_EPOCHS}, "data": ["bundled"],
              "limit": TINY_TRAIN_IMAGES}
    artifacts.write_json(run_dir / artifacts.CONFIG_FILE, config)
    data = {"data": ["bundled"], "rows": {"train": TINY_TRAIN_IMAGES, "val": 0, "test": 200},
            "train_class_counts": np.bincount(y, minlength=10).tolist()}
    x, y = mnist_arrays["x_test"][:200], mnist_arrays["y_test"][:200]
    metrics = classification_metrics(y, model.predict(x, verbose=0).argmax(axis=1))
    metadata = artifacts.build_metadata(config=config, data=data, metrics=metrics, best_epoch={"epoch": 1})
    metadata["onnx"] = export_onnx(model, run_dir / artifacts.ONNX_FILE, x)
    metadata["onnx_int8"] = write_int8_copy(run_dir, x, y)
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    return run_dir


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (2 CPUs, with its dashboard and token auth) for jobs run as separate processes.

    One per test module, so that no module inherits another's leftovers. Jobs connect
    to it through ``ray_head.env`` (RAY_ADDRESS and the token), as they would to a
    cluster. Not a Ray each job starts by itself: that one would run beside the test
    session's, and Ray Train's PlacementGroupCleaner, which finds its cluster by
    auto-detection, then fails, so the placement group of a Train run whose controller
    was killed (a trial stopped by ASHA, a killed driver) is never removed and the next
    Train run waits for good for its CPUs (seen in CI).
    """
    from mnist_ray.local_cluster import LocalRayCluster

    cluster = LocalRayCluster(num_cpus=2)
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_onnx_run(tiny_run, tmp_path_factory) -> Path:
    """``tiny_run`` with its model also as ``model.onnx``, converted as training exports it
    (tf2onnx, uint8 ``pixels`` (n, 28, 28) → float32 ``probs`` (n, 10)). Read-only, like tiny_run.

    tiny_run itself, once it has a model.onnx (training's ONNX export writes one).
    """
    import shutil

    import tensorflow as tf
    import tf2onnx

    from mnist_ray import artifacts

    if (tiny_run / artifacts.ONNX_FILE).is_file():
        return tiny_run
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-onnx"
    shutil.copytree(tiny_run, run_dir)
    signature = (tf.TensorSpec((None, 28, 28), tf.uint8, name="pixels"),)
    proto, _ = tf2onnx.convert.from_keras(artifacts.load_model(run_dir), input_signature=signature, opset=17)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "n"  # tf2onnx names the batch dimension unk__N
    (run_dir / artifacts.ONNX_FILE).write_bytes(proto.SerializeToString())
    return run_dir


@pytest.fixture(scope="session", autouse=True)
def session_tracking_store(tmp_path_factory) -> str:
    """The MLflow store of every job the tests run (``$MLFLOW_TRACKING_URI``), and the cache of the
    registry's model files (``$MNIST_RAY_MODEL_CACHE``), in the session's temp dir: without it a job
    would create ``mlflow.db`` in the checkout. The file appears when a job first tracks (or when
    ``mlflow_store_template`` is made: then as a copy of it, without a second migration)."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'session.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MNIST_RAY_MODEL_CACHE"] = str(root / "model_cache")
    return uri


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory, session_tracking_store) -> Path:
    """An empty MLflow store (SQLite) whose database migrations ran once, for this whole session
    (seconds each time: MLflow creates its tables through alembic). Copy it for a fresh store;
    never write to it."""
    from mnist_ray.registry.tracking import Tracking, client, sqlite_path

    template = tmp_path_factory.mktemp("mlflow") / "empty.db"
    client(Tracking(f"sqlite:///{template}")).search_experiments()  # creates and migrates the tables
    session_store = sqlite_path(session_tracking_store)
    if not session_store.exists():
        shutil.copyfile(template, session_store)
    return template


# How long a finished test's Ray work may take to hand back its CPUs (Ray Train removes its
# placement group, Ray Data its actor pool, a few seconds after the job returns).
RAY_RELEASE_SECONDS = 60


class RayResourcesLeft(UserWarning):
    """A test left Ray's CPUs held after it finished."""


@pytest.fixture(autouse=True)
def ray_resources_handed_back(request):
    """After every test that ran Ray in this process: the session's CPUs are free again.

    A test that leaves a placement group or an actor holding CPUs on the shared Ray would make
    the next Ray Train run wait for good for CPUs that never come (a hang until the per-test
    timeout, then the same for every later test). What is still held after
    ``RAY_RELEASE_SECONDS`` is named in a warning against the test that left it (pytest's warnings
    summary), and its placement groups, the way a Train run holds CPUs, are removed.
    """
    yield
    import ray

    if not ray.is_initialized() or _wait_for_free_cpus(ray, RAY_RELEASE_SECONDS):
        return
    held = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
    removed = _remove_ray_leftovers(ray)
    _wait_for_free_cpus(ray, 10)  # a removal takes effect asynchronously
    warnings.warn(RayResourcesLeft(
        f"{request.node.nodeid} left {held:g} of Ray's CPUs held {RAY_RELEASE_SECONDS} s after it "
        f"finished; removed: {'; '.join(removed) or 'no placement group (an actor?)'}"), stacklevel=2)


def _wait_for_free_cpus(ray, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _remove_ray_leftovers(ray) -> list[str]:
    """Remove every placement group not yet removed; name each one. (Actors are left: Ray Data's
    own named actors live for the whole session, and an unnamed one has no public handle.)"""
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_id, entry in placement_group_table().items():
        if entry.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed.append(f"placement group {entry.get('name') or pg_id} {entry.get('bundles')}")
    return removed
