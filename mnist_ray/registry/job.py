"""``jobs/promote.py``: move the alias ``champion`` through the gate, or back with ``--rollback``.

A run is checked as scoring would check it (finished, on this code's input contract, a
standard ONNX model whose sha256 is the one training recorded), registered if it is not a
version yet, and evaluated with the current champion on the gate set
(:mod:`mnist_ray.registry.gate`). ``champion`` moves only if the candidate is at least as
accurate as the champion minus ``--tolerance``; the first champion needs only the checks. A run
trained on a subset (``--limit``, ``--smoke-test``) is refused unless ``--allow-partial``;
``--force --reason`` overrides the gate, never the checks. Every decision is recorded on the
registered model and printed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist_ray import artifacts, onnx_model
from mnist_ray.errors import EXIT_OK, InputError, JobFailed
from mnist_ray.registry import gate, versions
from mnist_ray.registry import tracking as tracking_
from mnist_ray.registry.tracking import Tracking

# Done, but not what was asked: the same number as scoring's EXIT_REJECTS, for a scheduler's "alert".
EXIT_REFUSED = 3


@dataclass(frozen=True)
class GateOptions:
    """The operator's rules for one promotion (see ``jobs/promote.py --help``)."""

    gate_data: list[str] | None = None
    tolerance: float = 0.0
    allow_partial: bool = False
    force: bool = False
    reason: str | None = None


def main(run_dir: str | None, options: GateOptions, tracking: Tracking, *, rollback: bool = False) -> int:
    """Promote the run directory ``run_dir`` (or, with ``rollback``, restore the previous champion);
    returns 0 (champion moved), EXIT_REFUSED (3) or raises ``InputError`` / ``JobFailed``."""
    if rollback:
        return roll_back(tracking, options.reason)
    return promote(run_dir, options, tracking)


@contextlib.contextmanager
def registry_errors(tracking: Tracking) -> Iterator[None]:
    """The store's failures as one line and exit code 1 (a retry may help); our own errors pass."""
    tracking_.mlflow_module()
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError) as exc:
        raise JobFailed(f"the model registry {tracking.uri} failed: {tracking_.reason(exc)}") from None


def checked_candidate(path: str) -> tuple[Path, dict, onnx_model.OnnxModel]:
    """The run directory, its metadata and its checked model.onnx: refused (``InputError``) as scoring
    refuses a run, and if model.onnx is not the file training recorded."""
    run_dir = artifacts.resolve_run_dir(path)
    metadata = artifacts.check_scoring_run(run_dir)
    model = onnx_model.read_checked(run_dir / artifacts.ONNX_FILE)
    recorded = (metadata.get("onnx") or {}).get("sha256")
    if recorded and recorded != model.sha256:
        raise artifacts.RunDirError(
            f"{run_dir}: model.onnx has sha256 {model.sha256}, not the {recorded} metadata.json recorded "
            "when training wrote it: the file was changed since; not promoted")
    return run_dir, metadata, model


def promote(path: str, options: GateOptions, tracking: Tracking) -> int:
    """The gate for the run ``path``: 0 when ``champion`` now names it, EXIT_REFUSED when it does not."""
    run_dir, metadata, candidate = checked_candidate(path)
    gate_set = gate.csv_gate_set(options.gate_data) if options.gate_data else gate.bundled_gate_set()
    name = tracking.registered_model
    client = tracking_.client(tracking)
    with registry_errors(tracking):
        version, new = versions.ensure_version(client, tracking, run_dir, metadata)
        if new:
            print(f"registered {run_dir} as {name}/{version.version} (alias {versions.CHALLENGER})",
                  flush=True)
        champion = current_champion(client, name)
        candidate_version = str(version.version)
        if champion is not None and str(champion.version) == candidate_version:
            print(f"{name}/{candidate_version} is already the champion: nothing to do", flush=True)
            return EXIT_OK
        predicted = gate.predictions(candidate.data, gate_set)
        correct = int((predicted == gate_set.labels).sum())
        comparison = None
        if champion is not None:
            folder = versions.fetch(client, tracking, name, champion)
            artifacts.check_scoring_run(folder)
            champion_model = onnx_model.read_checked(folder / artifacts.ONNX_FILE)
            champion_predicted = gate.predictions(champion_model.data, gate_set)
            comparison = gate.compare(gate_set.labels, predicted, champion_predicted)
        before = str(champion.version) if champion is not None else None
        print("\n".join(gate.figures_lines(name, gate_set, candidate_version, correct, before, comparison,
                                           options.tolerance)), flush=True)
        action, why = decide(tracking_.partial_reason(metadata), comparison, options)
        after = candidate_version if action in gate.MOVES_CHAMPION else before
        if action in gate.MOVES_CHAMPION:
            client.set_registered_model_alias(name, versions.CHAMPION, candidate_version)
        recorded = gate.record_decision(client, name, {
            "action": action, "candidate": candidate_version, "champion_before": before,
            "champion_after": after, "run_dir": str(run_dir), "reason": why,
            **gate.figures(comparison, correct, len(gate_set.labels), options.tolerance, gate_set),
        }, about=candidate_version)
    print(decision_line(name, recorded), flush=True)
    return EXIT_OK if action in gate.MOVES_CHAMPION else EXIT_REFUSED


def decide(partial: str | None, comparison: gate.Comparison | None, options: GateOptions) -> tuple[str, str]:
    """(action, why) for a candidate that passed the checks."""
    if options.force:
        return gate.FORCED, options.reason or ""
    if partial and not options.allow_partial:
        return gate.REFUSED, f"{partial}: --allow-partial lets the gate judge it"
    if comparison is None:
        return gate.PROMOTED, "no champion to compare with; the run passed the contract checks"
    shown = f"{comparison.difference * 100:+.2f} points against the champion"
    if comparison.passes(options.tolerance):
        return gate.PROMOTED, f"{shown} (tolerance {options.tolerance * 100:.2f} points)"
    return gate.REFUSED, f"{shown}, beyond the tolerance of {options.tolerance * 100:.2f} points"


def current_champion(client, name: str):
    """The version ``champion`` names, or None (no such alias, or no such registered model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, versions.CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def roll_back(tracking: Tracking, reason: str | None) -> int:
    """Move ``champion`` back to the champion before the current one (the gate's record says which)."""
    name = tracking.registered_model
    client = tracking_.client(tracking)
    with registry_errors(tracking):
        history = gate.champion_history(gate.read_decisions(client, name))
        champion = current_champion(client, name)
        if champion is None:
            raise InputError(f"{name} has no champion in {tracking.uri}: nothing to roll back")
        current = str(champion.version)
        if not history or history[-1] != current:
            recorded = f"{name}/{history[-1]}" if history else "no champion"
            raise InputError(
                f"champion names {name}/{current}, but the gate's record says {recorded}: the alias "
                "was moved outside jobs/promote.py; set it with: python jobs/promote.py RUN_DIR --force "
                "--reason TEXT")
        if len(history) < 2:
            raise InputError(f"{name}/{current} is the first champion on record: there is none "
                             "before it to roll back to")
        previous = history[-2]
        client.set_registered_model_alias(name, versions.CHAMPION, previous)
        recorded = gate.record_decision(client, name, {
            "action": gate.ROLLED_BACK, "candidate": None, "champion_before": current,
            "champion_after": previous, "reason": reason or "",
        }, about=current)
    print(decision_line(name, recorded), flush=True)
    return EXIT_OK


def decision_line(name: str, decision: dict) -> str:
    """One line saying what the decision did, and why."""
    action, before, after = decision["action"], decision["champion_before"], decision["champion_after"]
    was = f" (was {name}/{before})" if before else " (the first champion)"
    why = f": {decision['reason']}" if decision.get("reason") else ""
    if action == gate.PROMOTED:
        said = f"{name}/{after} is the champion{was}"
    elif action == gate.FORCED:
        said = f"{name}/{after} is the champion, forced by {decision['user']}{was}"
    elif action == gate.ROLLED_BACK:
        said = f"{name}/{after} is the champion again (was {name}/{before})"
    else:
        kept = f"{name}/{before} stays the champion" if before else "there is still no champion"
        said = f"{name}/{decision['candidate']} is not promoted; {kept}"
    return f"decision {decision['number']}: {action}: {said}{why}"
