"""The run directory: where a training run's model, metadata, history and metrics live.

```
runs/<timestamp>/
  config.json     the full configuration (what --resume reads back)
  model.keras     the model; loads with plain tf_keras.models.load_model
  model.onnx      the same model for onnxruntime (what scoring and serving run), verified against
                  model.keras on the test images when it was written (mnist_ray.train.export)
  model.int8.onnx its int8 copy (quantised; scoring and serving use it with --int8), measured
                  against model.onnx on the test images (mnist_ray.train.quantize)
  metadata.json   data source + fingerprint, config, input contract, versions, git commit, metrics,
                  the ONNX files' sha256, the export's verification, the int8 copy's accuracy
  history.json    one record per epoch (also history.csv)
  metrics.json    test-set metrics
  test_predictions.parquet  one row per test image: source, row, label, predicted, confidence
  test_digits.parquet       pixels and predictions of the few test digits the report shows
                            (a random sample, the least confident, the most confident mistakes:
                            mnist_ray.digit_samples)
  report.html     the run's report, self-contained (pictures embedded); report.md the same for
  report.md         terminals and code review, showing the pictures in report/
  report/*.png
  ray_train/      Ray Train's checkpoints, unless --storage-path points elsewhere
runs/latest  ->   the newest completed run
```
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_ray.config import SettingsError, from_json, to_json
from mnist_ray.data.schema import CLASS_NAMES, IMAGE_SHAPE, PIXEL_MAX, PIXEL_MIN
from mnist_ray.digit_samples import DigitSampler, source_group
from mnist_ray.errors import InputError

MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
METRICS_FILE = "metrics.json"
TEST_PREDICTIONS_FILE = "test_predictions.parquet"
TEST_DIGITS_FILE = "test_digits.parquet"
# The same names in a scoring batch's directory (mnist_ray.score.output).
REPORT_HTML, REPORT_MD, REPORT_FIGURES = "report.html", "report.md", "report"
T = TypeVar("T")
LATEST = "latest"
DEFAULT_RUNS_DIR = "runs"

# What a saved model expects and returns; scoring checks models against this.
INPUT_CONTRACT = {
    "input": {"shape": list(IMAGE_SHAPE), "dtype": "uint8", "range": [PIXEL_MIN, PIXEL_MAX]},
    "csv_pixel_order": "pixelK is image row K // 28, column K % 28",
    "output": "softmax probabilities, one per class, in class_labels order",
}
VERSIONED_PACKAGES = ("mnist-ray", "ray", "tensorflow", "tf-keras", "numpy", "pandas", "pyarrow")


def new_run_dir(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """A fresh ``runs/<YYYYmmdd-HHMMSS>`` directory (suffixed if that second is taken)."""
    base = Path(runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def resolve_run_dir(path: str | Path) -> Path:
    """Resolve a run directory, following ``runs/latest``; raises ``RunDirError`` if it holds no run."""
    run_dir = Path(path).resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{path}: not a run directory (no {CONFIG_FILE})")
    return run_dir


def update_latest(run_dir: Path, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> None:
    """Point ``<runs_dir>/latest`` at ``run_dir`` atomically (symlink replaced by rename), if the run
    is in ``runs_dir``: a run written elsewhere (``--output-dir``) leaves no link beside it."""
    if run_dir.resolve().parent != Path(runs_dir).resolve():
        return
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def write_json(path: Path, payload: object) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_settings(path: Path, settings: object) -> None:
    """Save a settings dataclass (:mod:`mnist_ray.config`) as JSON."""
    write_json(path, to_json(settings))


def read_settings(path: Path, cls: type[T]) -> T:
    """The ``cls`` settings saved in ``path``; raises ``SettingsError`` naming what is wrong."""
    try:
        value = read_json(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path}: not readable JSON ({exc})") from exc
    return from_json(cls, value, str(path))


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_json(run_dir / HISTORY_JSON, history)
    if not history:
        return
    tmp = run_dir / f".{HISTORY_CSV}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, run_dir / HISTORY_CSV)


TEST_PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("predicted", pa.int64(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
    ]
)


def write_test_predictions(
    run_dir: Path, sources: np.ndarray, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray,
    images: np.ndarray,
) -> None:
    """Save what the run's report needs of the test set: every prediction, and a few digits' pixels.

    ``sources`` str (n,), ``rows`` and ``labels`` int64 (n,), ``probs`` float32 (n, 10),
    ``images`` uint8 (n, 28, 28). About 20 bytes per test image plus ~75 KB of pixels.
    """
    predicted = probs.argmax(axis=1).astype(np.int64)
    confidence = probs.max(axis=1).astype(np.float32)
    table = pa.table(
        {"source": pa.array(sources.astype(str)), "row": pa.array(rows, pa.int64()),
         "label": pa.array(labels, pa.int64()), "predicted": pa.array(predicted),
         "confidence": pa.array(confidence)},
        schema=TEST_PREDICTIONS_SCHEMA,
    )
    _write_parquet(run_dir / TEST_PREDICTIONS_FILE, table)
    digits = DigitSampler()
    digits.add(
        groups=source_group(sources), sources=sources, rows=rows, labelled=np.ones(len(rows), bool),
        labels=labels, predicted=predicted, confidence=confidence, images=images,
    )
    _write_parquet(run_dir / TEST_DIGITS_FILE, digits.table())


def _write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def build_metadata(*, config: object, data: dict, metrics: dict, best_epoch: dict) -> dict:
    """A run's metadata.json: ``config`` is its settings (a dataclass, or their JSON)."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_file": MODEL_FILE,
        "class_labels": CLASS_NAMES,
        "input_contract": INPUT_CONTRACT,
        "config": config if isinstance(config, dict) else to_json(config),
        "data": data,
        "selected_epoch": best_epoch,
        "test_metrics": {k: metrics[k] for k in ("count", "accuracy", "macro_f1", "errors")},
        "versions": library_versions(),
        "git_commit": git_commit(),
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the code that ran, with ``-dirty`` if it had local changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def load_model(run_dir: str | Path):
    """Load a run's Keras model in safe mode: a model file cannot run code while loading.

    Raises ``RunDirError`` if the file cannot be loaded that way (it carries code, or is no model).
    """
    import tf_keras as keras

    path = Path(run_dir) / MODEL_FILE
    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # any failure to load means the same thing: this file is not usable
        reason = str(exc).split("\n")[0]
        if "safe_mode" in reason:  # Keras's words suggest an option this project does not offer
            reason = ("it carries code (a Lambda layer) that would run when loaded; models this project "
                      "trains carry none, so the file was not loaded: retrain it")
        raise RunDirError(f"{path} cannot be loaded: {reason}") from None


class RunDirError(InputError, ValueError):
    """A run directory that cannot be used: unfinished, unreadable or off-contract."""


MODEL_ID_CHARS = 12


def model_id(run_dir: str | Path) -> str:
    """A short content id of the run's scored model: the first 12 hex digits of the sha256 of model.onnx."""
    return content_id((Path(run_dir) / ONNX_FILE).read_bytes())


def content_id(model_file: bytes) -> str:
    """The model id of the bytes of a model file (see :func:`model_id`)."""
    return hashlib.sha256(model_file).hexdigest()[:MODEL_ID_CHARS]


def check_scoring_run(run_dir: Path, *, require_onnx: bool = True) -> dict:
    """Refuse a run that is not finished or whose model takes other input than this code sends.

    Returns the run's metadata. Raises ``RunDirError`` naming what is wrong: a missing
    model.onnx (with ``require_onnx``) or metadata.json, metadata that is not a JSON object,
    an input contract or class labels other than this code's.
    """
    required = (ONNX_FILE, METADATA_FILE) if require_onnx else (MODEL_FILE, METADATA_FILE)
    for name in required:
        if not (run_dir / name).is_file():
            if name == ONNX_FILE and (run_dir / MODEL_FILE).is_file():
                hint = f"; trained before runs had one? write it: python jobs/export_onnx.py {run_dir}"
            else:
                hint = ": not a finished training run"
            raise RunDirError(f"{run_dir}: no {name}{hint}")
    try:
        metadata = read_json(run_dir / METADATA_FILE)
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{run_dir}: {METADATA_FILE} is not readable JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise RunDirError(f"{run_dir}: {METADATA_FILE} holds a JSON {type(metadata).__name__}, not an object")
    contract = metadata.get("input_contract")
    if contract != INPUT_CONTRACT:
        raise RunDirError(
            f"{run_dir}: the model's input contract {json.dumps(contract)} differs from the one this "
            f"code scores with {json.dumps(INPUT_CONTRACT)}; score it with the version of mnist_ray that "
            "trained it, or retrain"
        )
    labels = metadata.get("class_labels")
    if labels != CLASS_NAMES:
        raise RunDirError(
            f"{run_dir}: the model's class_labels {json.dumps(labels)[:80]} are not this code's "
            f"{json.dumps(CLASS_NAMES)}: its outputs would be read as other classes"
        )
    data = metadata.get("data")
    counts = data.get("train_class_counts") if isinstance(data, dict) else None
    if counts is not None and not (
        isinstance(counts, list) and len(counts) == len(CLASS_NAMES)
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    ):
        raise RunDirError(f"{run_dir}: data.train_class_counts {json.dumps(counts)[:80]} is not 10 counts")
    return metadata
