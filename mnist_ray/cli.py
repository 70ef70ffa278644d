"""Every flag of every job (one definition each), their validation, and the errors' exit codes.

Jobs are imported only after the flags parsed and checked: ``--help`` and a bad flag
answer at once, without importing TensorFlow or starting Ray. This module is the only
one that knows about argparse; the job packages receive typed settings
(:mod:`mnist_ray.config`) and raise the errors of :mod:`mnist_ray.errors`, which
:func:`run_job` turns into one line and the documented exit code.

Long, and one cohesive thing: each flag is defined once and shared by every job that takes
it (``--data``, ``--address``, ``--use-gpu``, …), so the flags of all jobs live together.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mnist_ray.config import (
    DATA_PATHS,
    LOCAL_SCORING_MAX_BYTES,
    MODEL_KINDS,
    PLACEMENT_STRATEGIES,
    SCHEDULES,
    SCORE_EXECUTORS,
    SEARCH_ALGORITHMS,
    SEARCH_MAX_EPOCHS,
    SERVE_MAX_BATCH_SIZE,
    SERVE_PORT,
    SMOKE_TEST_LIMIT,
    DataConfig,
    InferenceOptions,
    SearchSettings,
    SearchSpace,
    TrainConfig,
)
from mnist_ray.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    InputError,
    JobFailed,
    UsageError,
    as_interrupted,
    handle_signals,
)
from mnist_ray.registry.tracking import REGISTERED_MODEL, Tracking, default_tracking_uri

SCORE_EXIT_CODES = """\
exit codes:
  0  every row was scored (or every input had been scored before by this model)
  3  completed, but some rows or whole files were rejected: see rejects/ and the batch summary
  1  the job failed (Ray, I/O, an input changed while read, another job holding --output);
     retrying may help
  2  bad flags, no input file, or an unusable --model (no champion yet: promote one with
     python jobs/promote.py RUN_DIR): fix them, retrying will not help"""
PROMOTE_EXIT_CODES = """\
exit codes:
  0  promoted: champion names the candidate now (with --rollback: the champion before it again)
  3  refused by the gate: less accurate than the champion beyond --tolerance, or a partial run;
     the champion is unchanged
  2  bad flags, not a usable run directory, bad --gate-data, nothing to roll back to
  1  the job failed: the model registry could not be read or written; retrying may help"""
# --int8, for scoring and serving alike.
INT8_HELP = ("written with model.onnx by training and jobs/export_onnx.py; 1.6-1.9x the images/s "
             "on CPUs measured here; its test accuracy beside the float model's is printed and in "
             "metadata.json")
MODEL_REFERENCES = ("'champion' (what production scores with: the alias of --registered-model that only "
                    "jobs/promote.py moves), 'challenger' (the newest version), models:/NAME@ALIAS, "
                    "models:/NAME/VERSION, or a training run directory (runs/latest, runs/<timestamp>)")

MIN_LIMIT = 100
SMOKE_TEST_TRIALS = 2
SMOKE_TEST_TRIAL_EPOCHS = 2
_DEFAULTS = TrainConfig()
_INFERENCE = InferenceOptions()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def tracking_uri(text: str) -> str:
    """An MLflow store's URI. A bare path would be MLflow's file store, which MLflow 3 no longer
    develops and warns about on every call: refused here, with what to write instead."""
    if "://" not in text and text.split(":")[0] != "databricks":
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a store's URI: a database (sqlite:///path/mlflow.db), a tracking server "
            f"(http://host:5000), or file:///path for MLflow's file store")
    return text


def subset_size(text: str) -> int:
    value = int(text)
    if value < MIN_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_LIMIT} (a few images of each class for every split), got {text}"
        )
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", nargs="+", default=["bundled"], metavar="SOURCE",
        help="'bundled' (the MNIST copy in this package, offline; default), 'keras' "
        "(keras.datasets.mnist, downloads), an MNIST-layout .npz file, or Kaggle training "
        "CSVs: files, directories or globs, .csv or .csv.gz",
    )
    group.add_argument(
        "--test-data", nargs="+", default=None, metavar="CSV",
        help="labelled Kaggle CSVs to use as the test set instead of the default "
        "(the MNIST test set for arrays, a held-out --test-fraction for CSVs)",
    )
    group.add_argument(
        "--limit", type=subset_size, default=None, metavar="N",
        help="use a stratified subset of N training images (and at most N test images)",
    )
    group.add_argument(
        "--val-fraction", type=fraction, default=0.1,
        help="share of the training images held out for validation (default: 0.1)",
    )
    group.add_argument(
        "--test-fraction", type=fraction, default=0.1,
        help="share of CSV rows held out as the test set; arrays use the MNIST test set "
        "(default: 0.1)",
    )
    group.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed (default: 0)")


def run_date(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date YYYY-MM-DD, got {text}") from None


def add_ray_flags(parser: argparse.ArgumentParser, *, gpu_help: str | None) -> argparse._ArgumentGroup:
    """The flags every job has for Ray: where the cluster is, whether to use GPUs (``gpu_help`` None:
    the job has no GPU path)."""
    group = parser.add_argument_group("Ray")
    group.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)",
    )
    if gpu_help is not None:
        group.add_argument("--use-gpu", action="store_true", help=gpu_help)
    return group


def add_worker_flags(
    group: argparse._ArgumentGroup, *, workers_flag: str = "--num-workers", of: str = ""
) -> None:
    """Workers per training run (``workers_flag``, stored as ``num_workers``) and their CPUs."""
    group.add_argument(
        workers_flag, dest="num_workers", type=positive_int, default=_DEFAULTS.num_workers, metavar="N",
        help=f"Ray Train workers{of} (default: {_DEFAULTS.num_workers})",
    )
    group.add_argument(
        "--cpus-per-worker", type=positive_int, default=None,
        help="CPUs each worker reserves; TensorFlow uses that many threads "
        "(default: the cluster's CPUs divided among the workers that run at once)",
    )
    group.add_argument(
        "--placement-strategy", choices=PLACEMENT_STRATEGIES, default=_DEFAULTS.placement_strategy,
        help="how Ray places the workers: PACK on as few nodes as possible (default), SPREAD over "
        "different nodes where it can, STRICT_SPREAD on different nodes or not at all",
    )


def add_batch_size_flag(group: argparse._ArgumentGroup, *, default: int, meaning: str) -> None:
    group.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                       help=f"{meaning} (default: {default})")


def add_model_flags(parser: argparse.ArgumentParser, *, searched: bool = False) -> argparse._ArgumentGroup:
    """Model and optimiser flags; with ``searched``, not the two a search samples (learning rate, dropout)."""
    group = parser.add_argument_group("model and optimisation")
    group.add_argument("--model", choices=MODEL_KINDS, default=_DEFAULTS.model,
                       help="deep_cnn (default: Deotte's strided CNN, ~99.65%%), cnn (a smaller CNN, "
                       "~1.6x faster per epoch) or the mlp baseline")
    epochs = SEARCH_MAX_EPOCHS if searched else _DEFAULTS.epochs
    group.add_argument("--epochs", type=positive_int, default=epochs,
                       help=f"epochs; with --schedule plateau early stopping may end sooner "
                       f"(default: {epochs})")
    group.add_argument("--schedule", choices=SCHEDULES, default=_DEFAULTS.schedule,
                       help="onecycle (default): the learning rate rises to its peak value over the first "
                       "quarter of the epochs, then falls along a cosine to ~0; plateau: it starts at that "
                       "value and halves after 2 epochs without validation-loss improvement, "
                       "with early stopping after 5")
    add_batch_size_flag(group, default=_DEFAULTS.batch_size,
                        meaning="per-worker batch; global = this × workers")
    if not searched:
        group.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate,
                           help=f"Adam's learning rate: the peak with onecycle, the start with plateau "
                           f"(default: {_DEFAULTS.learning_rate})")
        group.add_argument("--dropout", type=float, default=_DEFAULTS.dropout,
                           help=f"dropout rate of every dropout layer (default: {_DEFAULTS.dropout})")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=_DEFAULTS.augment,
                       help="random small rotations, shifts and zoom while training (default: on)")
    group.add_argument("--mixed-precision", action="store_true",
                       help="float16 compute on GPUs (with --use-gpu)")
    group.add_argument("--xla", action="store_true",
                       help="compile the training step with XLA (jit_compile): for GPUs, where it "
                       "fuses kernels; on CPUs it mostly adds compile time. Needs --no-augment, "
                       "and on CPUs a single worker")
    group.add_argument("--data-path", choices=DATA_PATHS, default=_DEFAULTS.data_path,
                       help="how each worker feeds its shard to TensorFlow: memory (materialised once "
                       "as uint8 arrays, fastest), stream (from Ray Data every epoch, for shards too big "
                       "for memory), auto (memory when the shard takes at most a quarter of the memory "
                       "available to each worker on its node; default)")
    return group


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", default=None,
                       help="run directory (default: runs/<timestamp>; runs/latest points to the newest)")
    group.add_argument("--storage-path", default=None,
                       help="where Ray Train keeps checkpoints: a folder or a URI (s3://, gs://, "
                       "a shared NFS path); must be reachable by every node (default: <run dir>/ray_train)")
    group.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue an interrupted run from its latest checkpoint, "
                       "with the configuration it was started with")
    group.add_argument("--max-failures", type=int, default=_DEFAULTS.max_failures,
                       help="worker failures to recover from by restarting from the latest checkpoint")
    group.add_argument("--members", type=positive_int, default=1, metavar="N",
                       help="train an ensemble of N models (seeds SEED..SEED+N-1), as many at once as the "
                       "cluster holds, and average their probabilities into one model (default: 1)")
    group.add_argument("--smoke-test", action="store_true",
                       help=f"a quick check: {SMOKE_TEST_LIMIT} images, 1 epoch")


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    """Where runs are tracked and models registered (MLflow): every job that logs or resolves a model."""
    group = parser.add_argument_group("tracking and model registry (MLflow)")
    group.add_argument("--tracking-uri", type=tracking_uri, default=os.environ.get("MLFLOW_TRACKING_URI"),
                       metavar="URI",
                       help="the MLflow store: a database (sqlite:///path/mlflow.db) or a tracking server "
                       "(http://host:5000) (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                       "current directory)")
    group.add_argument("--registered-model", default=REGISTERED_MODEL, metavar="NAME",
                       help=f"the registered model whose versions runs become and whose aliases 'champion' "
                       f"and 'challenger' name (default: {REGISTERED_MODEL})")


def tracking_target(args: argparse.Namespace) -> Tracking:
    """The store and registered model :func:`add_tracking_flags`' flags name (the default store absolute)."""
    return Tracking(args.tracking_uri or default_tracking_uri(), args.registered_model)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/train.py",
        description="Train the digit classifier with Ray Train and write a run directory.",
        epilog="Exit codes: 0 success; 1 the job failed; 2 bad flags or bad input data.",
    )
    add_data_flags(parser)
    add_model_flags(parser)
    add_worker_flags(add_ray_flags(parser, gpu_help="one GPU per worker"))
    add_run_flags(parser)
    add_tracking_flags(parser)
    return parser


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    space = SearchSpace()
    group = parser.add_argument_group("search")
    group.add_argument("--dropout-range", nargs=2, type=float, default=list(space.dropout),
                       metavar=("LOW", "HIGH"), help="dropout is sampled uniformly in [LOW, HIGH] "
                       "(default: %(default)s)")
    group.add_argument("--lr-range", nargs=2, type=float, default=list(space.learning_rate),
                       metavar=("LOW", "HIGH"), help="the learning rate is sampled log-uniformly in "
                       "[LOW, HIGH] (default: %(default)s)")
    group.add_argument("--num-samples", type=positive_int, default=8, metavar="N",
                       help="trials to run (default: 8)")
    group.add_argument("--search", choices=SEARCH_ALGORITHMS, default="random",
                       help="random search (default), or Optuna's TPE (needs the [tune] extra: "
                       "pip install -e '.[tune]')")
    group.add_argument("--max-concurrent-trials", type=positive_int, default=None, metavar="N",
                       help="trials running at once (default: as many as the cluster has CPUs, or GPUs "
                       "with --use-gpu, for all their workers)")
    group.add_argument("--grace-period", type=positive_int, default=2, metavar="EPOCHS",
                       help="ASHA: epochs every trial runs before it can be stopped (default: 2)")
    group.add_argument("--reduction-factor", type=int, default=3, metavar="F",
                       help="ASHA: at each rung only the top 1/F of trials continue (default: 3)")
    group.add_argument("--retrain-best", action="store_true",
                       help="after the search, train the best configuration on training + validation "
                       "images for the epochs its trial needed, into OUTPUT_DIR/best_model (a run directory "
                       "jobs/score.py accepts; test metrics are reported only there)")


def tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/tune.py",
        description="Search dropout and learning rate with Ray Tune; every trial is a Ray Train run.",
        epilog="Exit codes: 0 success; 1 the job failed; 2 bad flags or bad input data; "
        "130 interrupted (Ctrl+C): continue with --resume OUTPUT_DIR.",
    )
    add_data_flags(parser)
    add_model_flags(parser, searched=True)
    add_search_flags(parser)
    add_worker_flags(add_ray_flags(parser, gpu_help="one GPU per worker"),
                     workers_flag="--workers-per-trial", of=" per trial")
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", default=None,
                       help="the search's results: leaderboard, best configuration, plot "
                       "(default: searches/<timestamp>)")
    group.add_argument("--storage-path", default=None,
                       help="where Tune and the trials' Ray Train runs keep state and checkpoints: a "
                       "folder or a URI (s3://, gs://, a shared NFS path) every node reaches "
                       "(default: OUTPUT_DIR/ray_tune)")
    group.add_argument("--resume", default=None, metavar="OUTPUT_DIR",
                       help="continue an interrupted search with the settings it was started with: "
                       "finished trials are kept, unfinished ones continue from their last checkpoint")
    group.add_argument("--max-failures", type=int, default=_DEFAULTS.max_failures,
                       help="worker failures each trial recovers from by restarting from its latest "
                       "checkpoint")
    group.add_argument("--smoke-test", action="store_true",
                       help=f"a quick check: {SMOKE_TEST_LIMIT} images, 2 trials of 2 epochs")
    add_tracking_flags(parser)
    return parser


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/score.py",
        description="Score Kaggle digit CSVs with a trained model, as a nightly batch: Parquet\n"
        "predictions partitioned by date, rejected rows with their reasons, a batch summary,\n"
        "metrics when labels exist, and a manifest that makes reruns skip what was scored.",
        epilog=SCORE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("inputs and outputs")
    group.add_argument("--model", default="champion", metavar="MODEL",
                       help=f"the model that scores: {MODEL_REFERENCES} (default: champion)")
    group.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="CSV files, directories (searched recursively) or globs; .csv or .csv.gz; "
                       "local paths or URIs (s3://, gs://)")
    group.add_argument("--output", required=True, metavar="DIR",
                       help="the output directory (a local or mounted path): predictions/, rejects/, "
                       "batches/ and the manifest accumulate there night after night")
    group.add_argument("--date", type=run_date, default=None, metavar="YYYY-MM-DD",
                       help="the run date: the partition predictions/date=... and rejects/date=... "
                       "(default: today, UTC)")
    group.add_argument("--force", action="store_true",
                       help="score inputs again even if the manifest says this model scored them; "
                       "their earlier output for the same date is replaced, never duplicated")
    group.add_argument("--submission", default=None, metavar="FILE",
                       help="also write a Kaggle submission CSV (ImageId,Label) for the single input")
    add_ray_flags(parser, gpu_help="one GPU per inference actor (GPU memory growth is enabled)")
    inference = parser.add_argument_group("inference")
    add_batch_size_flag(inference, default=_INFERENCE.batch_size, meaning="images per inference call")
    inference.add_argument("--concurrency", type=positive_int, default=None, metavar="N",
                           help="at most this many inference actors, each loading the model once; Ray Data "
                           "starts one and adds more while work waits and resources are free (default: as "
                           "many as the cluster's CPUs, or GPUs with --use-gpu, hold)")
    inference.add_argument("--cpus-per-actor", type=positive_int, default=_INFERENCE.cpus_per_actor,
                           metavar="N",
                           help="CPUs each inference actor reserves; onnxruntime uses that many threads "
                           "(default: 1)")
    inference.add_argument("--int8", action="store_true",
                           help=f"score with the model's int8 copy (model.int8.onnx): {INT8_HELP}")
    inference.add_argument("--executor", choices=SCORE_EXECUTORS, default="auto",
                           help="where rows are scored: 'ray' with Ray Data (read tasks, an actor pool); "
                           "'local' in this process, no Ray; 'auto' (default) is 'local' for inputs of "
                           f"at most {LOCAL_SCORING_MAX_BYTES >> 20} MB (~140,000 rows) when neither "
                           "--address/$RAY_ADDRESS nor --use-gpu is given (Ray would take longer to start "
                           "than they take to score), 'ray' otherwise")
    add_tracking_flags(parser)
    return parser


SERVE_EXIT_CODES = f"""\
It serves until stopped. exit codes:
  {EXIT_TERMINATED}  stopped by SIGTERM (kill, Kubernetes, systemd), after shutting down cleanly
  {EXIT_INTERRUPTED}  stopped by SIGINT (Ctrl+C), after shutting down cleanly
  {EXIT_BAD_INPUT}    bad flags, an unusable --model, or --host/--port already taken: fix them
  {EXIT_FAILED}    Ray or Serve failed; retrying may help"""


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/serve.py",
        description="Serve a model over HTTP with Ray Serve: POST /predict answers digits (JSON), GET /\n"
        "is a page to draw a digit on, GET /healthz a health check. Requests from many clients are\n"
        "batched into one model call; replicas run the ONNX model with onnxruntime.",
        epilog=SERVE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("model and HTTP")
    group.add_argument("--model", default="champion", metavar="MODEL",
                       help=f"the model to serve: {MODEL_REFERENCES} (default: champion)")
    group.add_argument("--int8", action="store_true",
                       help=f"serve the model's int8 copy (model.int8.onnx): {INT8_HELP}")
    group.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for "
                       "every interface)")
    group.add_argument("--port", type=positive_int, default=SERVE_PORT,
                       help=f"the HTTP port (default: {SERVE_PORT})")
    serving = parser.add_argument_group("replicas and batching")
    serving.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                         help="replicas of the model, one CPU each (default: 1)")
    serving.add_argument("--max-batch-size", type=positive_int, default=SERVE_MAX_BATCH_SIZE, metavar="N",
                         help="requests one replica answers with one model call, at most "
                         f"(default: {SERVE_MAX_BATCH_SIZE})")
    add_ray_flags(parser, gpu_help=None)
    add_tracking_flags(parser)
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/report.py",
        description="Render the report (report.html, report.md, report/*.png) of a training run or a\n"
        "scoring batch again, from its saved artifacts: no training, no scoring, no Ray.",
        epilog="Exit codes: 0 written; 2 the directory is neither a finished run nor a published batch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="RUN_OR_BATCH_DIR",
                        help="a run directory (runs/<timestamp>, runs/latest) or a scoring batch directory "
                        "(OUTPUT/batches/<batch_id>)")
    return parser


AUDIT_EXIT_CODES = """\
exit codes:
  0  consistent: the output holds exactly what its manifest says
  1  inconsistent: one line per problem on stdout (what is wrong, where, what to do), a count on stderr
  2  not a scoring output directory (or bad flags)"""


def audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/audit.py",
        description="Check a scoring output directory end to end, after an incident: every manifest entry's\n"
        "parts exist with the rows it counts, no part that no entry names, no row twice for one model\n"
        "and date, every batch complete, staging left over. Reads only; changes nothing; no Ray.",
        epilog=AUDIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", metavar="OUTPUT",
                        help="the scoring output directory (what jobs/score.py --output named)")
    return parser


def export_onnx_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/export_onnx.py",
        description="Write model.onnx into a training run directory that has only model.keras (runs\n"
        "trained before runs had one), verified against the Keras model on the MNIST test images,\n"
        "and its int8 copy, model.int8.onnx (for --int8), measured on the same images.",
        epilog="Exit codes: 0 written; 1 the export disagrees with the Keras model; 2 not a usable run "
        "directory (or its model.keras carries code).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (runs/<timestamp>)")
    return parser


def tolerance(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a fraction of accuracy from 0 up to 1 (0.002: 0.2 points), got {text}")
    return value


def promote_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/promote.py",
        description="Promote a training run's model to 'champion', the alias production scores with, if it\n"
        "passes the gate: not less accurate than the current champion (beyond --tolerance) on the same\n"
        "labelled gate set, both run with onnxruntime; McNemar's exact test says whether the difference\n"
        "is more than chance. Every decision is recorded on the registered model and printed.",
        epilog=PROMOTE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR",
                        help="the training run directory to promote (runs/<timestamp>, runs/latest, a "
                        "search's best_model); registered first if it is not a version yet")
    group = parser.add_argument_group("the gate")
    group.add_argument("--gate-data", nargs="+", default=None, metavar="CSV",
                       help="labelled Kaggle CSVs (files, directories, globs) both models are evaluated on "
                       "(default: the bundled MNIST test images)")
    group.add_argument("--tolerance", type=tolerance, default=0.0, metavar="T",
                       help="how much less accurate than the champion the candidate may be, as a fraction "
                       "(0.002: 0.2 points) (default: 0)")
    group.add_argument("--allow-partial", action="store_true",
                       help="let the gate judge a run trained on a subset (--limit, --smoke-test), which it "
                       "otherwise refuses")
    group.add_argument("--force", action="store_true",
                       help="promote whatever the figures say (never a run that fails the contract checks); "
                       "needs --reason")
    group.add_argument("--reason", default=None, metavar="TEXT",
                       help="why, recorded with the decision (required with --force)")
    group.add_argument("--rollback", action="store_true",
                       help="move champion back to the champion before it (no RUN_DIR)")
    add_tracking_flags(parser)
    return parser


# --- from flags to settings (validated here: the jobs receive only settings that can run) ---------


def apply_smoke_test(args: argparse.Namespace) -> None:
    """``--smoke-test``: at most SMOKE_TEST_LIMIT images and few epochs (a search: few trials too)."""
    if not args.smoke_test:
        return
    args.limit = min(args.limit or SMOKE_TEST_LIMIT, SMOKE_TEST_LIMIT)
    if hasattr(args, "num_samples"):
        args.num_samples, args.epochs = SMOKE_TEST_TRIALS, SMOKE_TEST_TRIAL_EPOCHS
    else:
        args.epochs = 1
        # Seen: ~11 % (one class) after a smoke test's few steps, which alarms a new user.
        print("smoke test: 2,000 images for 1 epoch check the whole path; too few steps for the "
              "accuracy to mean anything (BatchNorm statistics have not settled)", flush=True)


def model_flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of model flags (``add_model_flags``), if anything."""
    if args.mixed_precision and not args.use_gpu:
        return "--mixed-precision needs --use-gpu (float16 is slower on CPUs)"
    if args.xla and args.augment:
        # Seen with TensorFlow 2.21: "No registered 'ImageProjectiveTransformV3' OpKernel for XLA_CPU_JIT".
        return "--xla needs --no-augment (XLA cannot compile the augmentation's image transforms)"
    if args.xla and not args.use_gpu and args.num_workers > 1:
        # Seen: "Collectives are not yet implemented for CPU devices when compiling with XLA".
        return "--xla on CPUs needs a single worker (XLA has no all-reduce for CPUs; GPUs have NCCL)"
    return None


def unwritable(path: str, what: str) -> str | None:
    """Why the directory ``path`` (a flag's value, ``what``) cannot be created and written, if it
    cannot; checked without creating anything. URIs are left to their filesystems."""
    if "://" in path:
        return None
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{what} {path}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} {path}: {existing} cannot be written (permissions, or a read-only file system)"
    return None


def check_writable(*dirs: tuple[str | None, str]) -> None:
    """Refuse (``UsageError``) the first (path, flag) of ``dirs`` that cannot be written; None is skipped."""
    for path, what in dirs:
        if path is not None and (problem := unwritable(path, what)):
            raise UsageError(problem)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the model, worker and run flags describe (checked by :func:`model_flag_problem`)."""
    if problem := model_flag_problem(args):
        raise UsageError(problem)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in vars(args).items() if name in names})


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)})


def search_settings(args: argparse.Namespace) -> SearchSettings:
    """A new search's settings from its flags (resources are fixed once Ray is up)."""
    space = SearchSpace(dropout=tuple(args.dropout_range), learning_rate=tuple(args.lr_range))
    if problem := space.problem():
        raise UsageError(problem)
    if args.reduction_factor < 2:
        raise UsageError(f"--reduction-factor must be at least 2, got {args.reduction_factor}")
    return SearchSettings(
        train=train_config(args), data=data_config(args), space=space, search=args.search,
        num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent_trials,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        storage_path=args.storage_path,
    )


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    return InferenceOptions(batch_size=args.batch_size, concurrency=args.concurrency,
                            cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu)


# --- running a job -----------------------------------------------------------------------------


def run_job(parser: argparse.ArgumentParser, job: Callable[[], int], *, whole_process: bool = False) -> int:
    """Run ``job``; return its exit code, or, with ``whole_process`` (the job is the program: a
    console command or ``jobs/*.py``, not a caller in Python), end the process with it at once.

    Errors a person can fix become one line and exit code 2
    (a usage error as argparse reports one), explained failures one line and exit code 1.

    SIGINT and SIGTERM stop the job with one line saying what the next run will do, and exit
    code 130 or 143. A Ray this job started is shut down on the way out, whatever happened.
    Anything else is a bug or an infrastructure failure: it keeps its traceback (exit code 1).
    """
    code = _run(parser, job)
    if whole_process:
        exit_now(code)
    return code


def _run(parser: argparse.ArgumentParser, job: Callable[[], int]) -> int:
    handle_signals()
    try:
        return job()
    except UsageError as exc:
        parser.error(str(exc))  # raises SystemExit(2) after the usage line
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # The machine, not the input (a full disk, a network file system gone): one line, and
        # a retry may help. Bad paths a person gave were refused up front, with exit code 2.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except BaseException as exc:
        interrupted = as_interrupted(exc)
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return interrupted.exit_code
    finally:
        if "ray" in sys.modules:  # never imported for --help or a bad flag
            from mnist_ray.runtime import shutdown_ray

            shutdown_ray()


def exit_now(code: int) -> None:
    """End the process with ``code`` after the exit handlers ran and the output was flushed, but
    without the interpreter's teardown: collecting every object of the libraries a job loaded
    (MLflow, SQLAlchemy, matplotlib, pandas) took ~1.1 s of a 10,000-row scoring job's ~6 s.
    Returns (and lets the interpreter end normally) while a non-daemon thread still works."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # logging, Ray, MLflow: what a normal exit runs, in the same order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


def train_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-train``: the same as ``python jobs/train.py``."""
    parser = train_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        apply_smoke_test(args)
        config, data = train_config(args), data_config(args)
        check_writable((args.output_dir, "--output-dir"), (args.storage_path, "--storage-path"))
        from mnist_ray.train.job import main

        return main(config, data, members=args.members, address=args.address, output_dir=args.output_dir,
                    storage_path=args.storage_path, resume=args.resume, tracking=tracking_target(args))

    return run_job(parser, job, whole_process=argv is None)


def tune_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-tune``: the same as ``python jobs/tune.py``."""
    parser = tune_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        apply_smoke_test(args)
        settings = None if args.resume else search_settings(args)
        check_writable((args.output_dir, "--output-dir"), (args.storage_path, "--storage-path"))
        from mnist_ray.tune.job import main

        return main(settings, address=args.address, output_dir=args.output_dir, resume=args.resume,
                    retrain_best=args.retrain_best, tracking=tracking_target(args))

    return run_job(parser, job, whole_process=argv is None)


def score_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-score``: the same as ``python jobs/score.py``."""
    parser = score_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        if "://" in args.output:
            raise UsageError("--output must be a local or mounted directory (atomic renames need one)")
        submission_dir = str(Path(args.submission).absolute().parent) if args.submission else None
        check_writable((args.output, "--output"), (submission_dir, "--submission's directory"))
        from mnist_ray.score.job import main

        return main(args.model, args.input, args.output, date=args.date, force=args.force,
                    submission=args.submission, address=args.address, executor=args.executor,
                    options=inference_options(args), tracking=tracking_target(args), int8=args.int8)

    return run_job(parser, job, whole_process=argv is None)


def export_onnx_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-export-onnx``: the same as ``python jobs/export_onnx.py``."""
    parser = export_onnx_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        from mnist_ray.train.export import export_run

        export_run(args.run_dir)
        return EXIT_OK

    return run_job(parser, job, whole_process=argv is None)


def serve_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-serve``: the same as ``python jobs/serve.py``."""
    parser = serve_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        from mnist_ray.serve.job import main

        return main(args.model, host=args.host, port=args.port, replicas=args.replicas,
                    max_batch_size=args.max_batch_size, address=args.address, tracking=tracking_target(args),
                    int8=args.int8)

    return run_job(parser, job, whole_process=argv is None)


def report_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-report``: the same as ``python jobs/report.py``."""
    parser = report_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        from mnist_ray.reports import render_and_print

        render_and_print(args.directory)
        return EXIT_OK

    return run_job(parser, job, whole_process=argv is None)


def audit_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-audit``: the same as ``python jobs/audit.py``."""
    parser = audit_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        from mnist_ray.score.audit import main

        return main(args.output)

    return run_job(parser, job, whole_process=argv is None)


def promote_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-promote``: the same as ``python jobs/promote.py``."""
    parser = promote_parser()
    args = parser.parse_args(argv)

    def job() -> int:
        if args.rollback and (args.run_dir or args.force or args.allow_partial or args.gate_data):
            raise UsageError("--rollback takes no RUN_DIR and no gate flags: it restores the champion before")
        if not args.rollback and not args.run_dir:
            raise UsageError("RUN_DIR is required (the run to promote), or --rollback")
        if args.force and not args.reason:
            raise UsageError("--force needs --reason TEXT: the decision's record says why the gate gave way")
        from mnist_ray.registry.job import GateOptions, main

        options = GateOptions(gate_data=args.gate_data, tolerance=args.tolerance,
                              allow_partial=args.allow_partial, force=args.force, reason=args.reason)
        return main(args.run_dir, options, tracking_target(args), rollback=args.rollback)

    return run_job(parser, job, whole_process=argv is None)
