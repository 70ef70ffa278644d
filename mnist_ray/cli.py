"""Command-line flags (one definition per flag, shared by the jobs) and exit codes."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable

from mnist_ray.artifacts import DEFAULT_RUNS_DIR, LATEST, RunDirError
from mnist_ray.config import (
    DATA_PATHS,
    LOCAL_SCORING_MAX_BYTES,
    MODEL_KINDS,
    PLACEMENT_STRATEGIES,
    SCORE_EXECUTORS,
    SEARCH_ALGORITHMS,
    SearchSpace,
    TrainConfig,
)

# Exit codes the jobs document and schedulers act on.
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed (Ray, training, infrastructure)
EXIT_BAD_INPUT = 2  # bad flags or bad data: fix the input, do not retry as is
EXIT_REJECTS = 3  # scoring completed, but some rows or whole files were rejected (see rejects/)
EXIT_INTERRUPTED = 130  # Ctrl+C (SIGINT), as shells report it; a search can then be resumed

SCORE_EXIT_CODES = """\
exit codes:
  0  every row was scored (or every input had been scored before by this model)
  3  completed, but some rows or whole files were rejected: see rejects/ and the batch summary
  1  the job failed (Ray, I/O, an input changed while read, another job holding --output);
     retrying may help
  2  bad flags, no input file, or an unusable --model: fix them, retrying will not help"""

SMOKE_TEST_LIMIT = 2000
MIN_LIMIT = 100
_DEFAULTS = TrainConfig()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


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


def add_ray_flags(parser: argparse.ArgumentParser, *, gpu_help: str) -> argparse._ArgumentGroup:
    """The flags every job has for Ray: where the cluster is, whether to use GPUs."""
    group = parser.add_argument_group("Ray")
    group.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)",
    )
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
                       help="cnn (default) or the mlp baseline")
    group.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs,
                       help=f"maximum epochs; early stopping may end sooner (default: {_DEFAULTS.epochs})")
    add_batch_size_flag(group, default=_DEFAULTS.batch_size,
                        meaning="per-worker batch; global = this × workers")
    if not searched:
        group.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate,
                           help=f"Adam's initial learning rate (default: {_DEFAULTS.learning_rate})")
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
    group.add_argument("--smoke-test", action="store_true",
                       help=f"a quick check: {SMOKE_TEST_LIMIT} images, 1 epoch")


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
    return parser


DEFAULT_SCORE_BATCH_SIZE = 1024


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
    group.add_argument("--model", default=f"{DEFAULT_RUNS_DIR}/{LATEST}", metavar="RUN_DIR",
                       help="the training run directory whose model scores (default: runs/latest)")
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
    add_batch_size_flag(inference, default=DEFAULT_SCORE_BATCH_SIZE, meaning="images per inference call")
    inference.add_argument("--concurrency", type=positive_int, default=None, metavar="N",
                           help="at most this many inference actors, each loading the model once; Ray Data "
                           "starts one and adds more while work waits and resources are free (default: as "
                           "many as the cluster's CPUs, or GPUs with --use-gpu, hold)")
    inference.add_argument("--cpus-per-actor", type=positive_int, default=1, metavar="N",
                           help="CPUs each inference actor reserves; TensorFlow uses that many threads "
                           "(default: 1)")
    inference.add_argument("--executor", choices=SCORE_EXECUTORS, default="auto",
                           help="where rows are scored: 'ray' with Ray Data (read tasks, an actor pool); "
                           "'local' in this process, no Ray; 'auto' (default) is 'local' for inputs of "
                           f"at most {LOCAL_SCORING_MAX_BYTES >> 20} MB (~140,000 rows) when neither "
                           "--address/$RAY_ADDRESS nor --use-gpu is given (Ray would take longer to start "
                           "than they take to score), 'ray' otherwise")
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


class JobFailed(RuntimeError):
    """The job failed for a reason one line explains: exit code 1, no traceback."""


def run_job(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a job's main: user errors become one line and exit code 2, explained failures exit code 1."""
    from mnist_ray.schema import DataValidationError

    try:
        return main(args)
    except (DataValidationError, RunDirError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def train_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-train``: the same as ``python jobs/train.py``."""
    args = train_parser().parse_args(argv)  # before importing TensorFlow: --help stays instant
    from mnist_ray.train_run import main

    return run_job(main, args)


def tune_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-tune``: the same as ``python jobs/tune.py``."""
    args = tune_parser().parse_args(argv)  # before importing TensorFlow: --help stays instant
    from mnist_ray.tune_run import main

    return run_job(main, args)


def score_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-score``: the same as ``python jobs/score.py``."""
    args = score_parser().parse_args(argv)  # before importing TensorFlow: --help stays instant
    from mnist_ray.score_run import main

    return run_job(main, args)


def report_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-report``: the same as ``python jobs/report.py``."""
    args = report_parser().parse_args(argv)

    def main(args: argparse.Namespace) -> int:
        from mnist_ray.reports import render_and_print

        render_and_print(args.directory)
        return EXIT_OK

    return run_job(main, args)
