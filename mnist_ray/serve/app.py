"""The Ray Serve application: one deployment that answers the page, health checks and predictions.

A replica holds one onnxruntime session (never TensorFlow: its import alone costs ~4 s and
~700 MB per process, measured here) and batches ``/predict`` requests across clients with
``@serve.batch``. :func:`build_app` makes the application for ``jobs/serve.py``;
:func:`app_builder` is the same for ``serve run`` / ``serve deploy`` config files
(``import_path: mnist_ray.serve.app:app_builder``). :func:`resolve_model` turns ``--model``
into model bytes and a version, through the one resolver of model references
(:func:`mnist_ray.registry.versions.resolve`).

The settings below are what keeps one replica from collapsing under many clients (measured
with benchmarks/serve_load.py; docs/serving.md says what was found and why).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.config import HTTPOptions
from starlette.requests import Request
from starlette.responses import Response

from mnist_ray import onnx_model
from mnist_ray.config import SERVE_MAX_BATCH_SIZE as DEFAULT_MAX_BATCH_SIZE
from mnist_ray.errors import InputError
from mnist_ray.registry.tracking import REGISTERED_MODEL, Tracking
from mnist_ray.serve.api import (
    MAX_BODY_BYTES,
    RequestError,
    body_too_large,
    error_body,
    parse_predict_body,
    predictions,
)

APP_NAME = "mnist-digits"
DEPLOYMENT_NAME = "DigitClassifier"
PAGE_FILE = Path(__file__).with_name("page.html")
# Why one replica served 12 req/s at 32 clients (p50 3.4 s) with Serve's default of 5: the
# proxy's router sends a replica at most max_ongoing_requests requests; the rest wait in the
# router, whose routing tasks (2 per replica) then probe the replica and sleep between tries,
# 25 ms doubling to 500 ms (ray/serve/_private/request_router/request_router.py,
# _choose_replicas_with_backoff). A batch of 5 finishes in ~1 ms and the replica then idles
# until a sleeping task wakes: ~5 requests per backoff period. A replica of this model holds
# a few hundred waiting requests for nothing (a coroutine each), so the limit is set far above
# the clients one replica serves: requests wait in the replica's batch queue, where they are
# batched, not in the router's backoff.
MAX_ONGOING_REQUESTS = 256
# Past this many requests waiting in one proxy for a replica, the proxy answers 503 at once:
# a bounded queue instead of latencies that grow without limit under overload. (Serve's Python
# proxy's queue; with HAProxy as the ingress, the default of jobs/serve.py, HAProxy's maxconn.)
MAX_QUEUED_REQUESTS = 1024
# A batch's first request waits at most this long for others: at 1 client every request pays
# it, so it is small; under load, requests that arrive while a batch runs form the next one.
BATCH_WAIT_TIMEOUT_S = 0.002
# Images per onnxruntime call: a batch of many multi-image requests is cut into calls this big.
INFERENCE_BATCH = 1024
# onnxruntime threads per replica: the CPU a replica reserves. More threads do not help one
# image (~0.1 ms), and on a 2-core node they would fight the proxy for the cores.
REPLICA_CPUS = 1
# A stuck request ends with an error after this long instead of holding a connection forever.
REQUEST_TIMEOUT_S = 30.0


def resolve_model(ref: str, tracking: Tracking | None = None, *, int8: bool = False) -> tuple[bytes, str]:
    """The ONNX model ``--model ref`` names, checked, and its version string.

    ``ref`` is what scoring takes (:func:`mnist_ray.registry.versions.resolve`): a run directory
    (``runs/latest`` is followed), ``champion``, ``challenger`` or ``models:/…``, looked up in
    ``tracking``'s store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db). What scoring refuses,
    serving refuses (``artifacts.check_scoring_run``), and the ``model.onnx`` must pass
    :func:`mnist_ray.onnx_model.check_onnx`. The version is ``<run name or NAME/N>@<sha256 prefix>``,
    with `` int8`` after the name for the run's int8 copy (``int8``).
    """
    from mnist_ray import artifacts
    from mnist_ray.registry.versions import resolve

    resolved = resolve(ref, tracking or Tracking.from_env())
    metadata = artifacts.check_scoring_run(resolved.path)  # unfinished, off-contract
    model = onnx_model.read_run_model(resolved.path, metadata, int8=int8,
                                      version=resolved.version if resolved.registered else None)
    name = resolved.version if resolved.registered else resolved.path.name
    return model.data, f"{name}{' int8' if int8 else ''}@{model.sha256[:artifacts.MODEL_ID_CHARS]}"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,
    ray_actor_options={"num_cpus": REPLICA_CPUS},
    # One line per request in the replica's log, forwarded to the driver's terminal, costs CPU on
    # the request path at hundreds of requests per second; errors still show.
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
    health_check_period_s=5,
    # A request takes milliseconds: a stopping replica need not wait Serve's default 20 s for stragglers,
    # and the whole shutdown must fit Kubernetes' 30 s grace period.
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5,
)
class DigitClassifier:
    """Routes: ``GET /`` the page, ``GET /healthz``, ``POST /predict`` (see :mod:`mnist_ray.serve.api`)."""

    def __init__(self, model: bytes, model_version: str,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> None:
        checked = onnx_model.check_onnx(model, model_version)
        self._session = onnx_model.session(checked.data, threads=REPLICA_CPUS)
        self._version = model_version
        self._page = PAGE_FILE.read_bytes()
        # onnxruntime releases the GIL while it computes: on a thread of its own, the replica's
        # event loop keeps reading and validating the next requests meanwhile.
        self._inference = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self.predict_batch.set_max_batch_size(max_batch_size)
        # The first run of a session allocates its buffers: not in a client's request.
        onnx_model.predict(self._session, np.zeros((1, 28, 28), np.uint8), 1)

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except RequestError as exc:
            allowed = "POST" if request.url.path == "/predict" else "GET"
            headers = {"Allow": allowed} if exc.status == 405 else None
            return Response(error_body(exc.message), exc.status, headers=headers,
                            media_type="application/json")

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if path == "/predict":
            if method != "POST":
                raise RequestError(405, f"{method} /predict: use POST with a JSON body")
            images = parse_predict_body(await _read_body(request))
            probs = await self.predict_batch(images)
            return _json(predictions(probs, self._version))
        if path in ("/", "/healthz"):
            if method not in ("GET", "HEAD"):
                raise RequestError(405, f"{method} {path}: use GET")
            if path == "/":
                return Response(self._page, media_type="text/html; charset=utf-8")
            return _json({"status": "ok", "model_version": self._version})
        raise RequestError(404, f"no such path {path!r}: the API has GET /, GET /healthz and POST /predict")

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def predict_batch(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities float32 (n_i, 10) of each request's images uint8 (n_i, 28, 28): one model call."""
        images = np.concatenate(requests)
        probs = await asyncio.get_running_loop().run_in_executor(
            self._inference, onnx_model.predict, self._session, images, INFERENCE_BATCH)
        return np.split(probs, np.cumsum([len(r) for r in requests])[:-1])


async def _read_body(request: Request) -> bytes:
    """The body, or a 413 as soon as it passes MAX_BODY_BYTES (a declared or a streamed length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise body_too_large(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise body_too_large(None)
        chunks.append(chunk)
    return b"".join(chunks)


def _json(payload: dict) -> Response:
    return Response(json.dumps(payload).encode(), media_type="application/json")


def build_app(model: bytes, model_version: str, *, replicas: int = 1,
              max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> serve.Application:
    """The application: ``replicas`` replicas of :class:`DigitClassifier` over checked model bytes."""
    return DigitClassifier.options(num_replicas=replicas).bind(model, model_version, max_batch_size)


def app_builder(args: dict) -> serve.Application:
    """For Serve config files: ``args`` ``model`` (``champion``, another registry reference, or a run
    directory every node sees, e.g. on a shared volume), optional ``max_batch_size``, ``int8`` (true:
    the model's int8 copy), and where
    registry references are looked up: ``tracking_uri`` (default: $MLFLOW_TRACKING_URI, else
    ./mlflow.db) and ``registered_model``. The model is resolved when the application is built:
    a new champion is served from the next deploy. Replicas come from the config's ``deployments``."""
    optional = {"max_batch_size", "tracking_uri", "registered_model", "int8"}
    unknown = sorted(set(args) - {"model"} - optional)
    if unknown or "model" not in args:
        allowed = ", ".join(map(repr, sorted(optional)))
        raise InputError(f"application args: need 'model', optionally {allowed}; got {sorted(args)}")
    tracking = Tracking.from_env(args.get("registered_model", REGISTERED_MODEL))
    if args.get("tracking_uri"):
        tracking = Tracking(str(args["tracking_uri"]), tracking.registered_model)
    model, version = resolve_model(str(args["model"]), tracking, int8=args.get("int8") is True)
    return DigitClassifier.bind(model, version, int(args.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))


def http_options(host: str, port: int) -> HTTPOptions:
    """Serve's proxy settings for ``--host``/``--port``."""
    return HTTPOptions(host=host, port=port, request_timeout_s=REQUEST_TIMEOUT_S)
