"""Command-line flags (one definition per flag, shared by the jobs) and exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mnist_ray.config import MODEL_KINDS, TrainConfig

# Exit codes the jobs document and schedulers act on.
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed (Ray, training, infrastructure)
EXIT_BAD_INPUT = 2  # bad flags or bad data: fix the input, do not retry as is

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


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray")
    group.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)",
    )
    group.add_argument(
        "--num-workers", type=positive_int, default=_DEFAULTS.num_workers,
        help=f"Ray Train workers (default: {_DEFAULTS.num_workers})",
    )
    group.add_argument(
        "--cpus-per-worker", type=positive_int, default=None,
        help="CPUs each worker reserves; TensorFlow uses that many threads "
        "(default: the cluster's CPUs divided among the workers)",
    )
    group.add_argument("--use-gpu", action="store_true", help="one GPU per worker")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and optimisation")
    group.add_argument("--model", choices=MODEL_KINDS, default=_DEFAULTS.model,
                       help="cnn (default) or the mlp baseline")
    group.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs,
                       help=f"maximum epochs; early stopping may end sooner (default: {_DEFAULTS.epochs})")
    group.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size,
                       help=f"per-worker batch; global = this × workers (default: {_DEFAULTS.batch_size})")
    group.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate,
                       help=f"Adam's initial learning rate (default: {_DEFAULTS.learning_rate})")
    group.add_argument("--dropout", type=float, default=_DEFAULTS.dropout,
                       help=f"dropout rate of every dropout layer (default: {_DEFAULTS.dropout})")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=_DEFAULTS.augment,
                       help="random small rotations, shifts and zoom while training (default: on)")
    group.add_argument("--mixed-precision", action="store_true",
                       help="float16 compute on GPUs (with --use-gpu)")


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
    add_ray_flags(parser)
    add_run_flags(parser)
    return parser


def run_job(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a job's main, turning user errors into a one-line message and exit code 2."""
    from mnist_ray.schema import DataValidationError

    try:
        return main(args)
    except (DataValidationError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mnist-ray-train``: the same as ``python jobs/train.py``."""
    args = train_parser().parse_args(argv)  # before importing TensorFlow: --help stays instant
    from mnist_ray.train_run import main

    return run_job(main, args)
