"""MLflow tracking: the store, and every training run, search and scoring batch as an MLflow run.

The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in
the current directory (MLflow 3.7+'s own default; made absolute here, so that the job prints
where it is). A SQLite store keeps the runs' files beside it, in ``mlartifacts/<experiment>/``;
a tracking server keeps them where it is configured to.

Only the job's driver logs, after its run directory or batch is complete: a training run once
it has finished (:func:`log_training_run`), a search once every trial has ended
(:func:`log_search`, one child run per trial, from the results Tune returned to the driver), a
scoring batch once it is published (:func:`log_scoring_batch`). Ray workers never talk to the
store.

Tracking never fails a job (:func:`best_effort`): a store that cannot be reached or errors
costs one line, ``warning: tracking: …``, and the job goes on; what it wrote on disk is
complete either way. MLflow is imported on first use (``import mlflow`` took 3-8 s on this
loaded 2-core machine) with its telemetry off, bounded HTTP retries and its INFO lines (a
new store's database migrations) silenced (:func:`mlflow_module`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from mnist_ray import artifacts

REGISTERED_MODEL = "mnist-digits"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store: what `mlflow server` calls its artifact root
TRAINING_EXPERIMENT = "mnist-ray-training"
TUNING_EXPERIMENT = "mnist-ray-tuning"
SCORING_EXPERIMENT = "mnist-ray-scoring"
# Where a version's model files are in its MLflow run's artefacts.
MODEL_ARTIFACT_PATH = "model"
# Per-epoch metrics of a run's history.json (and of a Tune trial's results), logged with step = epoch.
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_s")
# The tag that identifies a model by content: the sha256 of model.onnx (metadata.json's onnx.sha256).
ONNX_SHA256_TAG = "onnx_sha256"
# A search's results (mnist_ray.tune.results) logged with its parent run.
SEARCH_FILES = ("search.json", "leaderboard.csv", "leaderboard.md", "best_config.json", "val_accuracy.png")

# Set before MLflow is imported: it starts its telemetry client at import (mlflow/__init__.py,
# set_telemetry_client) and would send usage events to its own servers from a thread.
MLFLOW_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}
# MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes, for
# rate-limited servers): a job at the end of a training run would wait that long on a server
# that is down. Defaults only: a value in the environment wins.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# A new store logs "Creating initial MLflow database tables..." and alembic's migrations at INFO;
# MLflow warns about things this project does on purpose. What is wrong reaches the user as our
# own line (best_effort, or the registry's errors).
QUIET_LOGGERS = {"mlflow": logging.ERROR, "alembic": logging.WARNING, "sqlalchemy": logging.WARNING}
MAX_REASON_CHARS = 240

T = TypeVar("T")


@dataclass(frozen=True)
class Tracking:
    """Where runs are tracked and models registered: the store's URI and the registered model's name."""

    uri: str
    registered_model: str = REGISTERED_MODEL

    @classmethod
    def from_env(cls, registered_model: str = REGISTERED_MODEL) -> Tracking:
        return cls(default_tracking_uri(), registered_model)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<current directory>/mlflow.db`` (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / STORE_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths from the current directory), else None."""
    if not uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(uri).path)
    # sqlite:///relative/x.db parses to "/relative/x.db"; sqlite:////abs/x.db to "//abs/x.db".
    path = path[1:] if path.startswith("/") else path
    return Path(path).absolute() if path else None


def mlflow_module():
    """``mlflow``, imported with telemetry off, bounded HTTP retries and its own log lines quietened."""
    os.environ.update(MLFLOW_ENV)
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import mlflow

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    return mlflow


def client(tracking: Tracking):
    """An ``MlflowClient`` for ``tracking``'s store (tracking and registry alike)."""
    mlflow_module()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)


def reason(exc: BaseException) -> str:
    """One line of what went wrong: the exception's first line, cut at MAX_REASON_CHARS."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(" (Background on this error")[0]  # SQLAlchemy appends a link to its docs
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def best_effort(what: str, tracking: Tracking, work: Callable[[], T]) -> T | None:
    """``work()``, or None and one line on stderr if it raised: tracking must never fail a job.

    ``what`` names what was not logged. Signals (``Interrupted``, a ``BaseException``) pass.
    """
    try:
        return work()
    except Exception as exc:  # a store that is down, full, locked, misconfigured: all the same here
        print(f"warning: tracking: {what} not logged to {tracking.uri}: {type(exc).__name__}: {reason(exc)}",
              file=sys.stderr, flush=True)
        return None


def experiment_id(mlflow_client, name: str, tracking: Tracking) -> str:
    """The id of the experiment ``name``, created if needed (a SQLite store's beside it, in
    ``mlartifacts/<name>``: not MLflow's ``./mlruns`` of whatever directory the job ran in)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    database = sqlite_path(tracking.uri)
    location = str(database.parent / ARTIFACTS_DIR / name) if database else None
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = mlflow_client.get_experiment_by_name(name)  # another job created it meanwhile
        if found is None:
            raise
        return found.experiment_id


# --- what a run logs ---------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: ``{"train": {"epochs": 20}}`` → ``{"train.epochs": "20"}``;
    lists and None as JSON."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat |= flatten(inner, f"{prefix}{key}." if isinstance(inner, dict) else f"{prefix}{key}")
        return flat
    text = value if isinstance(value, str) else json.dumps(value)
    return {prefix.rstrip("."): text}


def partial_reason(metadata: dict) -> str | None:
    """Why a run's model saw only part of its data (``--limit``, which ``--smoke-test`` sets), or None."""
    config = metadata.get("config") or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else config
    limit = data.get("limit") if isinstance(data, dict) else None
    return f"trained on a subset: --limit {limit} (or --smoke-test)" if limit is not None else None


def onnx_sha256(run_dir: Path, metadata: dict) -> str:
    """The sha256 of the run's model.onnx that metadata.json recorded (else the file's own)."""
    recorded = (metadata.get("onnx") or {}).get("sha256")
    if recorded:
        return recorded
    import hashlib

    return hashlib.sha256((run_dir / artifacts.ONNX_FILE).read_bytes()).hexdigest()


def _metrics(values: dict[str, float], *, step: int = 0) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]


def _log(mlflow_client, run_id: str, *, params: dict[str, str] | None = None, metrics: list | None = None,
         files: Iterable[tuple[Path, str | None]] = ()) -> None:
    """Params and metrics in batches MLflow accepts (100 params, 1,000 metrics a request), then the
    files that exist: ``(path, artifact directory or None)``; a directory is logged whole."""
    from mlflow.entities import Param

    items = [Param(key, value[:6000]) for key, value in (params or {}).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])
    metrics = metrics or []
    for start in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path, folder in files:
        if path.is_dir():
            mlflow_client.log_artifacts(run_id, str(path), folder)
        elif path.is_file():
            mlflow_client.log_artifact(run_id, str(path), folder)


def _finished_run(mlflow_client, experiment: str, run_name: str, tags: dict[str, str],
                  fill: Callable[[str], None], *, span: tuple[int, int] | None = None) -> str:
    """Create a run, ``fill(run_id)`` it, and end it FINISHED (FAILED if filling raised).

    ``span``: (start, end) in ms since the epoch, when the work the run records happened (it is
    logged afterwards: without it MLflow would show the logging's milliseconds as its duration).
    """
    start, end = span or (None, None)
    run_id = mlflow_client.create_run(experiment, start_time=start, run_name=run_name, tags=tags).info.run_id
    try:
        fill(run_id)
    except BaseException:
        try:
            mlflow_client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: S110  the store that failed the run may refuse this too; the cause is raised
            pass
        raise
    mlflow_client.set_terminated(run_id, "FINISHED", end_time=end)
    return run_id


def _span(ended: str | None, seconds: float | None) -> tuple[int, int] | None:
    """(start, end) in ms of work that ended at the ISO time ``ended`` and took ``seconds``, if known."""
    if not ended or seconds is None:
        return None
    try:
        end = datetime.datetime.fromisoformat(ended).timestamp()
    except ValueError:
        return None
    return int((end - seconds) * 1000), int(end * 1000)


# --- training runs ---------------------------------------------------------------------------------


def find_training_run(mlflow_client, tracking: Tracking, sha256: str) -> str | None:
    """The MLflow run already logged, to the end, for the model whose model.onnx has this sha256, if any
    (a run whose logging failed midway lacks files a version would point at)."""
    experiment = mlflow_client.get_experiment_by_name(TRAINING_EXPERIMENT)
    if experiment is None:
        return None
    query = f"tags.{ONNX_SHA256_TAG} = '{sha256}' and attributes.status = 'FINISHED'"
    found = mlflow_client.search_runs([experiment.experiment_id], query, max_results=1)
    return found[0].info.run_id if found else None


def log_training_run(mlflow_client, tracking: Tracking, run_dir: Path, metadata: dict) -> str:
    """Log a finished run directory as one MLflow run of TRAINING_EXPERIMENT; returns its id.

    Params: the run's settings flattened (train.*, data.*, …); metrics: the history per
    epoch (step = epoch) and the test metrics (``test_accuracy``, ``test_macro_f1``,
    ``test_errors``); tags: data fingerprint, git commit, run directory, whether it is partial;
    artefacts: metrics, metadata, history.csv, the report, and ``model/`` (model.onnx,
    model.keras, metadata.json: what a registered version points at).
    """
    history = artifacts.read_json(run_dir / artifacts.HISTORY_JSON) \
        if (run_dir / artifacts.HISTORY_JSON).is_file() else []
    test = metadata.get("test_metrics") or {}
    partial = partial_reason(metadata)
    tags = {
        "run_dir": str(run_dir), "data_fingerprint": str((metadata.get("data") or {}).get("fingerprint")),
        "git_commit": str(metadata.get("git_commit")), ONNX_SHA256_TAG: onnx_sha256(run_dir, metadata),
        "partial": json.dumps(partial is not None), **({"partial_reason": partial} if partial else {}),
    }

    def fill(run_id: str) -> None:
        metrics = [m for record in history for m in _metrics(
            {k: record[k] for k in EPOCH_METRICS if k in record}, step=int(record.get("epoch", 0)))]
        metrics += _metrics({f"test_{k}": test[k] for k in ("accuracy", "macro_f1", "errors", "count")
                             if k in test})
        if "wall_seconds" in metadata:
            metrics += _metrics({"wall_seconds": metadata["wall_seconds"]})
        files = [(run_dir / name, None) for name in (artifacts.METRICS_FILE, artifacts.METADATA_FILE,
                                                     artifacts.HISTORY_CSV, artifacts.REPORT_HTML,
                                                     artifacts.REPORT_MD)]
        files.append((run_dir / artifacts.REPORT_FIGURES, artifacts.REPORT_FIGURES))
        files += [(run_dir / name, MODEL_ARTIFACT_PATH)
                  for name in (artifacts.ONNX_FILE, artifacts.MODEL_FILE, artifacts.METADATA_FILE)]
        if metadata.get("onnx_int8"):  # the int8 copy, for scoring and serving with --int8
            files.append((run_dir / artifacts.ONNX_INT8_FILE, MODEL_ARTIFACT_PATH))
        _log(mlflow_client, run_id, params=flatten(metadata.get("config") or {}), metrics=metrics,
             files=files)

    experiment = experiment_id(mlflow_client, TRAINING_EXPERIMENT, tracking)
    span = _span(metadata.get("created"), metadata.get("wall_seconds"))
    return _finished_run(mlflow_client, experiment, run_dir.name, tags, fill, span=span)


# --- searches -----------------------------------------------------------------------------------------


@dataclass
class Trial:
    """What the driver knows of one finished Tune trial: its id, sampled values, per-epoch results
    (a DataFrame with an ``epoch`` column, or None), how it ended (the leaderboard's column)."""

    trial_id: str
    config: dict
    history: Any
    ended: str
    failed: bool


def log_search(out_dir: Path, settings: Any, best: dict, trials: list[Trial],
               tracking: Tracking | None) -> None:
    """The end of a search: one parent run of TUNING_EXPERIMENT (the search's settings, its best
    trial, its leaderboard and plot) and one child run per trial (dropout, learning rate, its
    per-epoch results). Best effort, printing one line; nothing when ``tracking`` is None."""
    if tracking is None:
        return
    from mnist_ray.config import to_json

    def work() -> str:
        mlflow_client = client(tracking)
        experiment = experiment_id(mlflow_client, TUNING_EXPERIMENT, tracking)

        def fill(run_id: str) -> None:
            _log(mlflow_client, run_id, params=flatten(to_json(settings)),
                 metrics=_metrics({"best_val_accuracy": best["val_accuracy"], "trials": len(trials),
                                   "trials_failed": sum(t.failed for t in trials)}),
                 files=[(out_dir / name, None) for name in SEARCH_FILES])
            for trial in trials:
                _log_trial(mlflow_client, experiment, run_id, trial)

        tags = {"output_dir": str(out_dir), "best_trial": str(best["trial"])}
        parent = _finished_run(mlflow_client, experiment, out_dir.name, tags, fill)
        print(f"tracking: search logged as MLflow run {parent} with {len(trials)} trial run(s) "
              f"(experiment {TUNING_EXPERIMENT}, {tracking.uri})", flush=True)
        return parent

    best_effort(f"search {out_dir}", tracking, work)


def _log_trial(mlflow_client, experiment: str, parent_id: str, trial: Trial) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    metrics = []
    if trial.history is not None and "epoch" in trial.history:
        for record in trial.history.to_dict("records"):
            values = {k: record[k] for k in EPOCH_METRICS if k in record}
            metrics += _metrics(values, step=int(record["epoch"]))
    tags = {MLFLOW_PARENT_RUN_ID: parent_id, "trial": trial.trial_id, "stopped_early": trial.ended}
    run_id = mlflow_client.create_run(experiment, run_name=trial.trial_id, tags=tags).info.run_id
    params = {k: json.dumps(trial.config.get(k)) for k in ("dropout", "learning_rate")}
    _log(mlflow_client, run_id, params=params, metrics=metrics)
    mlflow_client.set_terminated(run_id, "FAILED" if trial.failed else "FINISHED")


# --- scoring batches -------------------------------------------------------------------------------


def log_scoring_batch(batch_dir: Path, tracking: Tracking | None) -> str | None:
    """A published batch as one run of SCORING_EXPERIMENT: its counts, accuracy when labelled, the
    model version that scored, its summary and report. Best effort, printing one line; returns the
    run id (None when ``tracking`` is None or the store failed)."""
    if tracking is None:
        return None
    from mnist_ray.score import output as scoring_output

    def work() -> str:
        summary = artifacts.read_json(batch_dir / scoring_output.SUMMARY_FILE)
        metrics_path = batch_dir / scoring_output.METRICS_FILE
        labelled = artifacts.read_json(metrics_path) if metrics_path.is_file() else None
        mlflow_client = client(tracking)
        experiment = experiment_id(mlflow_client, SCORING_EXPERIMENT, tracking)
        version = str(summary.get("model_version") or summary.get("model_run"))
        tags = {"model_version": version, "model_id": summary["model_id"], "batch_dir": str(batch_dir),
                "date": summary["date"], "exit_code": str(summary["exit_code"])}
        values = {**summary["total"], "rows_per_s": summary.get("rows_per_s"),
                  **{f"seconds_{k}": v for k, v in summary["seconds"].items()}}
        if labelled:
            values |= {k: labelled[k] for k in ("accuracy", "macro_f1", "errors")}
            values["labelled"] = labelled["count"]

        def fill(run_id: str) -> None:
            _log(mlflow_client, run_id,
                 params={"model_version": version, "model_id": summary["model_id"], "date": summary["date"],
                         "executor": str(summary.get("executor"))},
                 metrics=_metrics(values),
                 files=[*[(batch_dir / name, None) for name in (scoring_output.SUMMARY_FILE,
                                                                 scoring_output.METRICS_FILE,
                                                                 artifacts.REPORT_HTML, artifacts.REPORT_MD)],
                        (batch_dir / artifacts.REPORT_FIGURES, artifacts.REPORT_FIGURES)])

        started = datetime.datetime.fromisoformat(summary["scored_at"])
        scoring = summary["seconds"].get("scoring") or 0.0
        span = _span((started + datetime.timedelta(seconds=scoring)).isoformat(), scoring)
        run_id = _finished_run(mlflow_client, experiment, summary["batch_id"], tags, fill, span=span)
        print(f"tracking: batch logged as MLflow run {run_id} (experiment {SCORING_EXPERIMENT}, "
              f"{tracking.uri})", flush=True)
        return run_id

    return best_effort(f"batch {batch_dir.name}", tracking, work)
