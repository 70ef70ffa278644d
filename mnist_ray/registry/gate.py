"""The promotion gate: a candidate against the champion on one labelled gate set, and the record
of every decision.

Both models run with onnxruntime (:mod:`mnist_ray.onnx_model`; no TensorFlow) on the same
images, so their errors can be paired: ``b`` images the champion gets right and the
candidate wrong, ``c`` the opposite. McNemar's exact test asks whether b and c differ more
than chance would make them (a two-sided binomial test of b against b + c at one half): a
difference in accuracy with a large p is noise of this gate set. The decision itself is the
rule the operator set: the candidate passes if its accuracy is at least the champion's minus
``--tolerance``.

Decisions are tags of the registered model, ``decision.0001``, ``decision.0002``, … each a JSON
object (``mlflow ui`` lists them on the model's page); the version a decision was about gets
``gate.decision`` too. The champion's history (for ``--rollback``) is read back from them.
"""

from __future__ import annotations

import datetime
import getpass
import json
from dataclasses import dataclass

import numpy as np

from mnist_ray import onnx_model
from mnist_ray.data.schema import LABEL

DECISION_TAG = "decision."
VERSION_DECISION_TAG = "gate.decision"
PROMOTED, REFUSED, FORCED, ROLLED_BACK = "promoted", "refused", "forced", "rolled back"
MOVES_CHAMPION = (PROMOTED, FORCED)
BATCH_SIZE = 1024
# McNemar's p below which the figures do not add a note that the difference may be chance.
SIGNIFICANT = 0.05


@dataclass(frozen=True)
class GateSet:
    """Labelled images: ``images`` uint8 (n, 28, 28), ``labels`` int64 (n,), and what they are."""

    images: np.ndarray
    labels: np.ndarray
    description: str


def bundled_gate_set() -> GateSet:
    """The MNIST test images shipped in this package (never trained on: the runs' test set)."""
    from mnist_ray.data.sources import BUNDLED_MNIST, load_npz

    arrays = load_npz(BUNDLED_MNIST)
    return GateSet(arrays["x_test"], arrays["y_test"].astype(np.int64), "the bundled MNIST test images")


def csv_gate_set(specs: list[str]) -> GateSet:
    """Labelled Kaggle CSVs (files, directories, globs), read as training reads them: every problem
    refused with its file, row, column and value (``DataValidationError``, exit 2)."""
    from mnist_ray.data.csv_files import resolve_csv_paths
    from mnist_ray.data.csv_reader import read_training_csv
    from mnist_ray.data.schema import IMAGE, DataValidationError

    paths = resolve_csv_paths(specs)
    rows = [read_training_csv(path) for path in paths]
    labels = np.concatenate([r[LABEL] for r in rows]).astype(np.int64)
    if not len(labels):
        raise DataValidationError("no labelled rows: every file has a header and nothing else",
                                  source=", ".join(paths))
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return GateSet(np.concatenate([r[IMAGE] for r in rows]), labels, f"{len(paths)} CSV file(s): {shown}")


def predictions(model_file: bytes, gate: GateSet) -> np.ndarray:
    """The classes a checked ONNX model predicts for the gate set's images, int64 (n,)."""
    session = onnx_model.session(model_file, threads=None)
    return onnx_model.predict(session, gate.images, BATCH_SIZE).argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class Comparison:
    """Candidate against champion on ``n`` paired images: correct counts, b, c and McNemar's p."""

    n: int
    candidate_correct: int
    champion_correct: int
    b: int  # the champion right, the candidate wrong
    c: int  # the candidate right, the champion wrong
    p_value: float

    @property
    def difference(self) -> float:
        """Candidate accuracy minus champion accuracy, as a fraction."""
        return (self.candidate_correct - self.champion_correct) / self.n

    def passes(self, tolerance: float) -> bool:
        """Whether the candidate's accuracy is at least the champion's minus ``tolerance``."""
        return self.candidate_correct >= self.champion_correct - tolerance * self.n - 1e-9


def compare(labels: np.ndarray, candidate: np.ndarray, champion: np.ndarray) -> Comparison:
    """Pair the two models' predictions of the same images against ``labels`` (all int64 (n,))."""
    from scipy.stats import binomtest

    candidate_right, champion_right = candidate == labels, champion == labels
    b = int((champion_right & ~candidate_right).sum())
    c = int((candidate_right & ~champion_right).sum())
    p_value = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return Comparison(len(labels), int(candidate_right.sum()), int(champion_right.sum()), b, c,
                      float(p_value))


# --- decisions ------------------------------------------------------------------------------------


def read_decisions(mlflow_client, name: str) -> list[dict]:
    """Every decision recorded on the registered model ``name``, oldest first ([] if it has none)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = mlflow_client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return [json.loads(tags[key]) for key in sorted(tags) if key.startswith(DECISION_TAG)]


def record_decision(mlflow_client, name: str, decision: dict, *, about: str) -> dict:
    """Add ``decision`` (its action, versions, figures, reason) to the registered model's record,
    numbered and stamped with the time and the user, and tag the version it was ``about``;
    returns it as recorded."""
    number = len(read_decisions(mlflow_client, name)) + 1
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    recorded = {"number": number, "time": now, "user": _user(), **decision}
    mlflow_client.set_registered_model_tag(name, f"{DECISION_TAG}{number:04d}", json.dumps(recorded))
    mlflow_client.set_model_version_tag(name, about, VERSION_DECISION_TAG,
                                        f"{recorded['action']} (decision {number}, {now})")
    return recorded


def champion_history(decisions: list[dict]) -> list[str]:
    """The versions that were champion, oldest first, the current one last: promotions and forced
    promotions push, rollbacks pop."""
    stack: list[str] = []
    for decision in decisions:
        if decision["action"] in MOVES_CHAMPION:
            stack.append(decision["candidate"])
        elif decision["action"] == ROLLED_BACK and stack:
            stack.pop()
    return stack


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


# --- what the operator reads --------------------------------------------------------------------------


def figures_lines(name: str, gate: GateSet, candidate: str, candidate_correct: int,
                  champion: str | None, comparison: Comparison | None, tolerance: float) -> list[str]:
    """The gate's figures as a small table: both accuracies, the difference and McNemar's test."""
    n = len(gate.labels)
    lines = [f"gate set: {gate.description} ({n:,} labelled images)",
             f"  {'':<10} {'version':<20} {'accuracy':>9} {'correct':>16}"]
    if comparison is not None and champion is not None:
        lines.append(_row("champion", f"{name}/{champion}", comparison.champion_correct, n))
    lines.append(_row("candidate", f"{name}/{candidate}", candidate_correct, n))
    if comparison is not None:
        lines += [
            f"  difference {comparison.difference * 100:+.2f} points "
            f"(tolerance {tolerance * 100:.2f} points)",
            f"  McNemar's exact test: b = {comparison.b:,} (champion right, candidate wrong), "
            f"c = {comparison.c:,} (candidate right, champion wrong), p {_p(comparison.p_value)}",
        ]
        if comparison.p_value >= SIGNIFICANT:
            lines.append(f"  (p >= {SIGNIFICANT}: on this gate set, a difference this size is what chance "
                         "gives)")
    return lines


def _p(value: float) -> str:
    return f"= {value:.3g}" if value > 0 else "< 1e-300"  # the binomial tail underflows to 0


def _row(role: str, version: str, correct: int, n: int) -> str:
    return f"  {role:<10} {version:<20} {correct / n:>8.2%} {f'{correct:,}/{n:,}':>16}"


def figures(comparison: Comparison | None, candidate_correct: int, n: int, tolerance: float,
            gate: GateSet) -> dict:
    """What a decision records of the gate's figures."""
    recorded = {"gate_set": gate.description, "images": n, "candidate_accuracy": candidate_correct / n,
                "tolerance": tolerance}
    if comparison is not None:
        recorded |= {"champion_accuracy": comparison.champion_correct / n,
                     "difference": comparison.difference,
                     "mcnemar_b": comparison.b, "mcnemar_c": comparison.c, "mcnemar_p": comparison.p_value}
    return recorded
