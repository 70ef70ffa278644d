"""Registered versions of the model, its aliases, and what a ``--model`` reference names.

Every finished training run (a search's retrained best model too) becomes a version of the
registered model (``mnist-digits`` unless ``--registered-model``) whose source is the
``model/`` folder of its MLflow run (model.onnx, model.keras, metadata.json). The version's
tags record what the gate and an auditor need: the run directory, the data fingerprint, the
test accuracy and macro F1, model.onnx's sha256, the input contract, whether the run was
partial. A new version gets the alias ``challenger``; ``champion``, what production scores
with, moves only through the gate (:mod:`mnist_ray.registry.job`).

:func:`resolve` is the one place a ``--model`` reference becomes files: a run directory, or a
registry reference (``champion``, ``challenger``, ``models:/NAME@ALIAS``, ``models:/NAME/N``)
whose model.onnx and metadata.json are downloaded with MLflow into a cache keyed by the
version, re-used while the file still has the sha256 the version recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mnist_ray import artifacts
from mnist_ray.errors import InputError, JobFailed
from mnist_ray.registry import tracking as tracking_
from mnist_ray.registry.tracking import ONNX_SHA256_TAG, Tracking, best_effort

CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)
MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")
PROMOTE_HINT = "promote a run first: python jobs/promote.py RUN_DIR"
# The model files a version's consumers (scoring, serving, the gate) need; model.keras stays in the
# store (TensorFlow is never loaded to score).
SCORING_FILES = (artifacts.ONNX_FILE, artifacts.METADATA_FILE)


@dataclass(frozen=True)
class ResolvedModel:
    """A model a job can load: ``path`` holds model.onnx and metadata.json; ``version`` says which
    (``mnist-digits/3``, or the run directory's absolute path)."""

    path: Path
    version: str
    registered: bool


@dataclass(frozen=True)
class RegistryRef:
    """``name`` and either an ``alias`` or a ``version`` number."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_reference(ref: str, registered_model: str) -> RegistryRef | None:
    """The registry reference ``ref`` is (``champion`` and ``challenger`` are aliases of
    ``registered_model``), or None for a path. Raises ``InputError`` for a malformed ``models:/``."""
    if ref in ALIASES:
        return RegistryRef(registered_model, alias=ref)
    if not ref.startswith("models:"):
        return None
    match = MODELS_URI.fullmatch(ref)
    if not match:
        raise InputError(f"--model {ref}: a registry reference is models:/NAME@ALIAS or models:/NAME/VERSION")
    return RegistryRef(match["name"], alias=match["alias"], version=match["version"])


def label(name: str, version: str | int) -> str:
    return f"{name}/{version}"


# --- registering ----------------------------------------------------------------------------------


def version_tags(run_dir: Path, metadata: dict) -> dict[str, str]:
    """What a version records of its run, as tags (readable in ``mlflow ui``)."""
    test = metadata.get("test_metrics") or {}
    partial = tracking_.partial_reason(metadata)
    config = metadata.get("config") or {}
    tags = {
        "run_dir": str(run_dir),
        "data_fingerprint": str((metadata.get("data") or {}).get("fingerprint")),
        "test_accuracy": str(test.get("accuracy")),
        "test_macro_f1": str(test.get("macro_f1")),
        ONNX_SHA256_TAG: tracking_.onnx_sha256(run_dir, metadata),
        "input_contract": json.dumps(metadata.get("input_contract"), sort_keys=True),
        "partial": json.dumps(partial is not None),
    }
    if partial:
        tags["partial_reason"] = partial
    if isinstance(config.get("search"), dict):
        tags["search"] = f"{config['search'].get('output_dir')} (trial {config['search'].get('trial')})"
    return tags


def find_version(mlflow_client, name: str, sha256: str):
    """The version of ``name`` whose model.onnx has this sha256 (the newest, if several), or None."""
    found = [v for v in mlflow_client.search_model_versions(f"name = '{name}'")
             if v.tags.get(ONNX_SHA256_TAG) == sha256]
    return max(found, key=lambda v: int(v.version)) if found else None


def ensure_version(mlflow_client, tracking: Tracking, run_dir: Path, metadata: dict):
    """The version of the run ``run_dir``: found by its model.onnx's sha256, or registered now (its
    MLflow run logged first if it has none; the new version gets the alias ``challenger``).
    Returns (version, whether it is new)."""
    from mlflow.exceptions import MlflowException

    name = tracking.registered_model
    sha256 = tracking_.onnx_sha256(run_dir, metadata)
    existing = find_version(mlflow_client, name, sha256)
    if existing is not None:
        return existing, False
    run_id = tracking_.find_training_run(mlflow_client, tracking, sha256) or tracking_.log_training_run(
        mlflow_client, tracking, run_dir, metadata)
    try:
        mlflow_client.create_registered_model(
            name, description="Handwritten-digit classifiers of mnist_ray: every training run is a version; "
            "production scores with the alias champion, which only jobs/promote.py moves.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/{tracking_.MODEL_ARTIFACT_PATH}"
    version = mlflow_client.create_model_version(name, source, run_id=run_id,
                                                 tags=version_tags(run_dir, metadata),
                                                 description=f"run directory {run_dir}")
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version, True


def register_training_run(run_dir: Path, tracking: Tracking | None) -> str | None:
    """The end of a training run: log it to MLflow and register it as a version (alias
    ``challenger``). Best effort, printing one line; returns ``NAME/N`` (None when ``tracking`` is
    None or the store failed)."""
    if tracking is None:
        return None

    def work() -> str:
        mlflow_client = tracking_.client(tracking)
        metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
        version, new = ensure_version(mlflow_client, tracking, run_dir, metadata)
        name = label(tracking.registered_model, version.version)
        state = f"registered as {name} (alias {CHALLENGER})" if new else f"already registered as {name}"
        print(f"tracking: MLflow run {version.run_id} (experiment {tracking_.TRAINING_EXPERIMENT}, "
              f"{tracking.uri}); {state}", flush=True)
        return name

    return best_effort(f"run {run_dir}", tracking, work)


# --- resolving a reference ------------------------------------------------------------------------


def resolve(ref: str, tracking: Tracking) -> ResolvedModel:
    """The model ``--model ref`` names, as files a job can load.

    A path is a run directory (``runs/latest`` is followed; ``artifacts.resolve_run_dir``); a
    registry reference is looked up in ``tracking``'s store and its files fetched into the cache.
    Raises ``InputError`` (exit 2) for a reference that names nothing (no champion yet: the
    message says how to promote one) and ``JobFailed`` (exit 1) when the store cannot be read.
    MLflow is imported only for registry references.
    """
    reference = parse_reference(ref, tracking.registered_model)
    if reference is None:
        run_dir = artifacts.resolve_run_dir(ref)
        return ResolvedModel(run_dir, str(run_dir), registered=False)
    database = tracking_.sqlite_path(tracking.uri)
    if database is not None and not database.is_file():
        raise InputError(f"--model {ref}: no model registry at {tracking.uri} (the file does not exist: "
                         f"nothing was tracked there); {PROMOTE_HINT}")
    mlflow_client = tracking_.client(tracking)
    version = _lookup(mlflow_client, ref, reference, tracking)
    name = label(reference.name, version.version)
    return ResolvedModel(fetch(mlflow_client, tracking, reference.name, version), name, registered=True)


def _lookup(mlflow_client, ref: str, reference: RegistryRef, tracking: Tracking):
    from mlflow.exceptions import MlflowException

    try:
        if reference.alias:
            return mlflow_client.get_model_version_by_alias(reference.name, reference.alias)
        return mlflow_client.get_model_version(reference.name, reference.version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise JobFailed(f"the model registry {tracking.uri} cannot be read: "
                            f"{tracking_.reason(exc)}") from None
        what = f"no alias {reference.alias}" if reference.alias else f"no version {reference.version}"
        hint = f": {PROMOTE_HINT}" if reference.alias == CHAMPION else ""
        raise InputError(f"--model {ref}: the registered model {reference.name} has {what} in "
                         f"{tracking.uri}{hint}") from None
    except Exception as exc:  # the store itself: unreachable, locked, not a database
        raise JobFailed(f"the model registry {tracking.uri} cannot be read: {type(exc).__name__}: "
                        f"{tracking_.reason(exc)}") from None


def cache_root() -> Path:
    """Where registry versions' files are cached: ``$MNIST_RAY_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/mnist-ray/models`` (``~/.cache/mnist-ray/models``)."""
    if os.environ.get("MNIST_RAY_MODEL_CACHE"):
        return Path(os.environ["MNIST_RAY_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-ray" / "models"


def fetch(mlflow_client, tracking: Tracking, name: str, version) -> Path:
    """The cached folder of ``version``'s model.onnx and metadata.json (and model.int8.onnx, if the
    metadata records one), downloaded if the cache lacks them or holds a model.onnx of another
    sha256 than the version recorded (``InputError`` if the store's own file differs from it)."""
    expected = version.tags.get(ONNX_SHA256_TAG)
    if not expected:
        raise InputError(f"{label(name, version.version)} records no {ONNX_SHA256_TAG}: it was not "
                         "registered by mnist_ray, whose model files this code can check")
    store_key = hashlib.sha256(tracking.uri.encode()).hexdigest()[:12]
    folder = cache_root() / store_key / name / str(version.version)
    if _sha256(folder / artifacts.ONNX_FILE) == expected and _complete(folder):
        return folder
    source = mlflow_client.get_model_version_download_uri(name, version.version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    mlflow = tracking_.mlflow_module()
    try:
        for file in SCORING_FILES:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{file}", dst_path=str(staging),
                                                tracking_uri=tracking.uri)
        if _records_int8(staging):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{artifacts.ONNX_INT8_FILE}",
                                                dst_path=str(staging), tracking_uri=tracking.uri)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise JobFailed(f"{label(name, version.version)}: its files could not be downloaded from {source}: "
                        f"{tracking_.reason(exc)}") from None
    found = _sha256(staging / artifacts.ONNX_FILE)
    if found != expected:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"{label(name, version.version)}: {source}/{artifacts.ONNX_FILE} has sha256 "
                         f"{found}, not the {expected} the version recorded: the stored file was changed; "
                         "not used")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def _records_int8(folder: Path) -> bool:
    """Whether the version's metadata records an int8 copy (registered since runs have one)."""
    try:
        return bool(artifacts.read_json(folder / artifacts.METADATA_FILE).get("onnx_int8"))
    except (OSError, ValueError, AttributeError):
        return False  # read again, and judged, where the files are loaded


def _complete(folder: Path) -> bool:
    """Whether a cached version holds every file it should: metadata.json, and the int8 copy it records."""
    return (folder / artifacts.METADATA_FILE).is_file() and (
        not _records_int8(folder) or (folder / artifacts.ONNX_INT8_FILE).is_file())


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
