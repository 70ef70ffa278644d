"""Setting up a process: connecting to Ray, and sizing TensorFlow to what Ray reserved for it."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import ray

from mnist_ray.errors import JobFailed

# A Ray that a job starts for itself (no --address) serves this machine only.
LOCAL_RAY_ENV = {
    # Every Ray process then listens on 127.0.0.1 alone. Ray 2.60 replaces a requested 127.0.0.1
    # node address with the machine's reachable one (services.resolve_ip_for_localhost) unless
    # it takes clusters to be off, which this switch (meant for Windows and macOS) says. Seen
    # here without it: the GCS, raylet and workers on [::], the dashboard agent's metrics on
    # 0.0.0.0 and the machine's address; with it, every listener on 127.0.0.1. Its processes
    # inherit the variable; docs/ray.md says what remains.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


# Whether connect_ray connected this process (rather than finding Ray already initialised, as
# in the tests, which run jobs in their own process): then shutdown_ray disconnects it.
_connected_here = False


def connect_ray(address: str | None) -> None:
    """Connect to ``address`` (a cluster) or, if None, start Ray on this machine (listening on
    127.0.0.1 only); nothing if this process is connected already.

    The Ray workers' own output is not forwarded to this process (``log_to_driver=False``):
    it is start-up talk of Ray, TensorFlow and Ray Data; the jobs send what a user should
    read through their own channels, and the workers' logs stay in Ray's session directory.
    """
    global _connected_here
    if ray.is_initialized():
        return
    if address is None:
        os.environ.update(LOCAL_RAY_ENV)
        # This process has read the switch already (at `import ray`).
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray 2.60 turns token authentication on for a local Ray and warns that it did.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray's core worker installs its own handlers (a SIGTERM then ends the job with a C++ stack
    # dump and exit code 134, seen on Ray 2.60): the job's own come back after it.
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    if address is not None:
        check_something_answers(address)
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except Exception as exc:  # a node that did not come up in time is a bare Exception in Ray 2.60
        where = f"the Ray cluster at {address}" if address else "Ray on this machine"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JobFailed(f"could not start or reach {where}: {first_line}") from exc
    _connected_here = True
    for signum, handler in handlers.items():
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signum, handler)
    # First use of ray.data (it configures its loggers on import), then quieten it:
    # Ray Data logs every dataset execution at INFO, noise next to our progress lines, and
    # warns that the progress bars we turn off are off.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def check_something_answers(address: str, timeout: float = 10.0) -> None:
    """Raise :class:`JobFailed` if nothing accepts a TCP connection at ``address``'s host and port.

    Ray retries an address where nothing listens for a long time, silently (seen with Ray 2.60:
    ``--address 127.0.0.1:1`` still waiting after 10 minutes): a typo in an address, or a
    cluster that is down, must be one line at once. ``auto`` (Ray finds a cluster started on
    this machine, and says so at once when there is none) and addresses without a port are
    left to Ray.
    """
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if address == "auto" or "/" in target or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except socket.gaierror:
        reason = f"no such host: {host}"
    except TimeoutError:
        reason = f"nothing answered at {host}:{port} within {timeout:.0f} s"
    except ConnectionRefusedError:
        reason = f"nothing listens at {host}:{port} (connection refused)"
    except OSError as exc:
        reason = f"{host}:{port}: {exc.strerror or exc}"
    else:
        return
    raise JobFailed(f"could not reach the Ray cluster at {address}: {reason}")


def beside_the_driver():
    """A scheduling strategy that places a task or actor on the node this (the job's) process runs on.

    For the job's own small helpers (the progress queue, an ensemble member's driver task): they
    hold no CPU, so Ray may put them on any node, and a lost worker node then takes them with it
    (seen: the progress queue on the node a test killed failed a training that Ray Train had
    recovered from its checkpoint). The job's node is the one whose loss ends the job anyway.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def shutdown_ray() -> None:
    """Disconnect what :func:`connect_ray` connected; a Ray it started stops with all its processes
    (its agents and workers die with it: none is left behind)."""
    global _connected_here
    if _connected_here and ray.is_initialized():
        ray.shutdown()
    _connected_here = False


def configure_tensorflow(*, cpus: int | None, use_gpu: bool, mixed_precision: bool = False) -> None:
    """Size TensorFlow's thread pools to ``cpus`` and let it take GPU memory as it needs it.

    Call it before the process's first TensorFlow op: afterwards TensorFlow ignores
    both settings (GPU memory growth then stays as it was, which is harmless).
    ``cpus`` None leaves the pools at TensorFlow's default (every core of the machine).
    With ``use_gpu``, raises ``RuntimeError`` if TensorFlow sees no GPU here (its own
    messages about CUDA are hidden: see :mod:`mnist_ray`).
    """
    import tensorflow as tf

    if cpus is not None:
        # Threads = the CPUs Ray gave this worker or actor, so that those sharing a node do
        # not oversubscribe it (TensorFlow would otherwise size its pools to the node).
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, cpus))
    if use_gpu:
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            raise RuntimeError(
                "--use-gpu, but TensorFlow sees no GPU on this node: is tensorflow[and-cuda] installed "
                "(pip install '.[train,gpu]') and the NVIDIA driver loaded? (TF_CPP_MIN_LOG_LEVEL=0 shows "
                "TensorFlow's own CUDA messages)"
            )
        for gpu in gpus:
            try:
                # Without this TensorFlow takes all GPU memory up front, starving whatever
                # else runs on the GPU (other actors, the job's own process).
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                break  # TensorFlow already ran in this process: too late, and harmless
        if mixed_precision:
            import tf_keras as keras

            keras.mixed_precision.set_global_policy("mixed_float16")
