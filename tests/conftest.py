"""Shared fixtures: the bundled MNIST arrays and one local Ray instance per test session."""

from __future__ import annotations

import numpy as np
import pytest

import mnist_ray  # noqa: F401  (selects tf-keras before anything imports TensorFlow)

BUNDLED_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@pytest.fixture(scope="session")
def mnist_arrays() -> dict[str, np.ndarray]:
    """The four arrays of the bundled mnist.npz, loaded once. Treat them as read-only."""
    from mnist_ray.data import BUNDLED_MNIST

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
