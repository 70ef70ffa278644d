"""One scoring batch end to end: model → inputs → records → staged Parquet → publication → summary.

This is what ``jobs/score.py`` runs. Inputs the manifest says this model has already
scored (the same content, under any path) are skipped unless ``--force``
(:mod:`~mnist_ray.score.inputs`); the rest are read, validated and scored
(:mod:`~mnist_ray.score.inference`: with Ray Data, or in this process for small inputs on
one machine), collected on the driver (:mod:`~mnist_ray.score.collect`) and written by
:mod:`~mnist_ray.score.output`, which publishes the batch atomically.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from mnist_ray import onnx_model
from mnist_ray.config import InferenceOptions
from mnist_ray.data.csv_files import resolve_csv_paths
from mnist_ray.digit_samples import DigitSampler
from mnist_ray.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REJECTS,
    InputError,
    JobFailed,
    UsageError,
    as_interrupted,
    uninterrupted,
)
from mnist_ray.registry.tracking import Tracking, log_scoring_batch
from mnist_ray.registry.versions import resolve
from mnist_ray.reports import write_report
from mnist_ray.runtime import connect_ray
from mnist_ray.score import output
from mnist_ray.score.collect import FileResult, check_counts, labelled_metrics, stream_into
from mnist_ray.score.inference import (
    ScoringModel,
    choose_executor,
    load_scoring_model,
    local_stream,
    scored_stream,
)
from mnist_ray.score.inputs import InputFile, input_size, plan_inputs
from mnist_ray.score.output import StagedBatch
from mnist_ray.score.submission import write_submission
from mnist_ray.score.summary import build_summary, manifest_entries, print_summary, show_batch

_IMPORTED = time.monotonic()


@dataclass
class Staged:
    """A batch written to staging, ready to publish."""

    summary: dict
    metrics: dict | None
    published: list[InputFile]  # the inputs whose rows (or rejection) this batch publishes
    changed: list[InputFile]  # inputs that changed while read: left out, scored by the next run
    results: dict[str, FileResult]


def main(
    model_ref: str,
    inputs: list[str],
    output_dir: str,
    *,
    date: str | None = None,
    force: bool = False,
    submission: str | None = None,
    address: str | None = None,
    executor: str = "auto",
    options: InferenceOptions | None = None,
    tracking: Tracking | None = None,
    int8: bool = False,
) -> int:
    """The scoring job: score the CSVs ``inputs`` with the model ``model_ref`` names (a run directory,
    ``champion``, ``models:/…``: :func:`~mnist_ray.registry.versions.resolve`) into ``output_dir`` as
    one batch of ``date`` (default: today, UTC); returns the exit code. The batch is logged to
    ``tracking``'s store (None: not tracked; registry references then use $MLFLOW_TRACKING_URI or
    ./mlflow.db). ``int8``: score with the model's int8 copy."""
    options = options or InferenceOptions()
    paths = resolve_csv_paths(inputs)
    if submission and len(paths) != 1:
        raise UsageError(f"--submission needs exactly one input file; {len(paths)} matched")
    resolved = resolve(model_ref, tracking or Tracking.from_env())
    scoring_model = load_scoring_model(resolved.path, version=resolved.version, int8=int8,
                                       registered=resolved.registered)
    out_dir = Path(output_dir).resolve()
    executor = choose_executor(
        executor, address=address, use_gpu=options.use_gpu, input_bytes=input_size(paths)
    )
    date = date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    try:
        with output.locked(out_dir):
            recovered = [show_batch(batch_dir) for batch_dir in output.recover(out_dir)]
            code = score_batch(
                paths, scoring_model, out_dir, date, options, force=force, address=address, executor=executor,
                tracking=tracking,
            )
            # The batch an interrupted job could not report on is reported now.
            if code == EXIT_OK and EXIT_REJECTS in recovered:
                code = EXIT_REJECTS
            if submission:
                write_submission(out_dir, paths[0], scoring_model.model_id, Path(submission))
    except output.OutputInUse as exc:
        raise JobFailed(str(exc)) from None
    return code


def score_batch(
    paths: list[str],
    model: ScoringModel,
    output_dir: Path,
    date: str,
    options: InferenceOptions,
    *,
    force: bool,
    address: str | None,
    executor: str,
    tracking: Tracking | None = None,
) -> int:
    """Score the inputs this model has not scored yet as one batch, publish it and log it to
    ``tracking``'s store (best effort); returns the exit code.

    ``executor`` ``local`` scores them in this process, ``ray`` with Ray (``address``, or a Ray
    started here once there is something to score)."""
    inputs = plan_inputs(paths, output.read_manifest(output_dir), model.model_id, force=force)
    todo = [i for i in inputs if i.previous is None]
    if not todo:
        print(f"nothing to score: all {len(inputs)} input(s) were scored before by model {model.model_id}",
              flush=True)
        return EXIT_OK
    started = datetime.datetime.now(datetime.timezone.utc)
    batch = StagedBatch(output_dir, output.new_batch_id(started), date, model.model_id, started,
                        model_version=model.version)
    print(
        f"batch {batch.batch_id}: scoring {len(todo)} file(s) with model {model.model_id} "
        f"({model.version or model.run_dir}), date {date}",
        flush=True,
    )
    try:
        staged = stage(batch, model, inputs, options, address, executor)
    except BaseException as exc:
        batch.remove()  # nothing was published; the next job would remove it anyway
        interrupted = as_interrupted(exc)
        if interrupted is None:
            raise
        interrupted.next_run = (
            f"batch {batch.batch_id} was not published; the next run scores these inputs"
        )
        raise interrupted from None
    manifest = output.read_manifest(output_dir)
    entries, replaced = manifest_entries(batch, staged.published, staged.results, manifest)
    code = EXIT_FAILED if staged.changed else staged.summary["exit_code"]
    try:
        with uninterrupted():  # a handful of renames: never stopped halfway
            batch_dir = output.publish(batch, entries, replaced)
        print_summary(staged.summary, staged.metrics, batch_dir)
        write_report(batch_dir)
        log_scoring_batch(batch_dir, tracking)  # the batch is complete: a store that is down costs a warning
    except BaseException as exc:
        if (interrupted := as_interrupted(exc)) is None:
            raise
        # The batch is complete and visible: the job ends as the batch did, not as an interrupted one.
        print(f"{interrupted}, after batch {batch.batch_id} was published: its results are complete "
              f"(exit code {code} is the batch's; its report: python jobs/report.py {batch_dir})",
              file=sys.stderr)
        return code
    if staged.changed:
        raise JobFailed(
            f"{', '.join(i.path for i in staged.changed)} changed while being scored: not published; "
            "the next run scores it"
        )
    return code


def process_uptime() -> float:
    """Seconds since this process started (Linux: its start time in /proc, so that Python's own
    start and imports count too)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


def stage(
    batch: StagedBatch, model: ScoringModel, inputs: list[InputFile], options: InferenceOptions,
    address: str | None, executor: str,
) -> Staged:
    """Score the inputs not skipped into ``batch``, check the counts, stage summary and metrics."""
    todo = [i for i in inputs if i.previous is None]
    readable = [i for i in todo if i.unreadable is None]
    results = {i.path: FileResult(i.path) for i in todo}
    digits = DigitSampler()
    paths = [i.path for i in readable]
    if readable and executor == "local":
        print(f"inference: in this process (no Ray), batch size {options.batch_size}", flush=True)
        if options.concurrency is not None or options.cpus_per_actor != InferenceOptions.cpus_per_actor:
            print("note: --concurrency and --cpus-per-actor size Ray's actor pool; scoring in this process, "
                  "onnxruntime uses all of this machine's cores (--executor ray to apply them)", flush=True)
        scoring_started = time.monotonic()
        stream_into(batch, readable, results, digits, local_stream(paths, model.model_file, options))
    elif readable:
        connect_ray(address)
        if options.use_gpu and not ray.cluster_resources().get("GPU"):
            print("warning: --use-gpu, but the Ray cluster has no GPU now: the actors wait until a node "
                  "with one joins (an autoscaler adds it)", flush=True)
        options = options.resolved(ray.cluster_resources())
        print(
            f"inference: Ray Data, up to {options.concurrency} actor(s) × {options.cpus_per_actor} CPU"
            f"{' + 1 GPU' if options.use_gpu else ''}, batch size {options.batch_size}",
            flush=True,
        )
        input_bytes = sum(i.size or 0 for i in readable)
        scoring_started = time.monotonic()
        records = scored_stream(paths, model.model_file, options, input_bytes=input_bytes)
        try:
            stream_into(batch, readable, results, digits, records)
        except Exception as exc:
            # An actor's failure reaches the driver wrapped in Ray's errors: keep the line that matters.
            if onnx_model.GPU_RUNTIME_MISSING in str(exc):
                raise InputError(onnx_model.GPU_RUNTIME_MISSING) from None
            raise
    for item in todo:
        if item.unreadable is not None:
            batch.add_rejects(item.path, [None], [item.unreadable], [""])
            results[item.path] = FileResult(item.path, rows_in=0, file_error=item.unreadable)
    check_counts(results.values())
    changed = [i for i in readable if results[i.path].read_sha256 not in (None, i.sha256)]
    for item in changed:
        batch.discard(item.path)
    published = [i for i in todo if i not in changed]
    now, wall = time.monotonic(), process_uptime()
    scoring = now - scoring_started if readable else 0.0
    seconds = {"start_up": wall - scoring, "scoring": scoring, "wall": wall}
    summary = build_summary(batch, model, inputs, published, changed, results, seconds)
    summary["executor"] = executor
    metrics = labelled_metrics([results[i.path] for i in published])
    batch.write_parquet(output.DIGITS_FILE, digits.table(exclude=[i.path for i in changed]))
    batch.write_json(output.SUMMARY_FILE, summary)
    if metrics is not None:
        batch.write_json(output.METRICS_FILE, metrics)
    return Staged(summary, metrics, published, changed, results)
