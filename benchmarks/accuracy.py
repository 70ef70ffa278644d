"""Accuracy of training runs, and how soon they get there: benchmarks/results/accuracy.json.

    python benchmarks/accuracy.py [--seed S] [--members N] [--keep RUN_DIR] [-- more jobs/train.py flags]
    python benchmarks/accuracy.py --record RUN_DIR --command "what trained it" [--configuration NAME]

The first form runs ``jobs/train.py`` (the default configuration unless flags are given) as
a fresh process and measures, from the moment it starts, the seconds until the model's
validation accuracy first reached 99.0%, 99.5% and 99.6% (from the epochs' end times in the
run's history), its final test accuracy and its wall time to exit. The second records a run
trained otherwise (its wall time is then the run's own, from its data's loading). Every run is
appended to ``{"runs": [...]}``; a table of them is printed. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import REPO, RESULTS_DIR, describe, machine

THRESHOLDS = (0.99, 0.995, 0.996)
RESULTS = RESULTS_DIR / "accuracy.json"


def seconds_to(history: list[dict], started: float) -> dict[str, float | None]:
    """Seconds from ``started`` (Unix time) until validation accuracy first reached each threshold
    (member 0's curve in an ensemble), None where it never did."""
    reached = {}
    for threshold in THRESHOLDS:
        epoch = next((e for e in history if e.get("member", 0) == 0 and e["val_accuracy"] >= threshold), None)
        reached[f"{threshold:.3f}"] = round(epoch["wall_time"] - started, 1) if epoch else None
    return reached


def record(run_dir: Path, *, command: str, configuration: str, started: float | None, wall: float | None,
           info: dict) -> dict:
    metadata = json.loads((run_dir / "metadata.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    train = metadata["config"]["train"]
    if started is None:  # a run trained elsewhere: from its first epoch's start
        first = min((e for e in history), key=lambda e: e["wall_time"])
        started = first["wall_time"] - first["epoch_seconds"]
    return {
        "command": command,
        "configuration": configuration,
        "seed": train["seed"],
        "members": metadata["config"].get("members", 1),
        "model": train["model"],
        "epochs": train["epochs"],
        "test_accuracy": metadata["test_metrics"]["accuracy"],
        "wall_seconds": round(wall if wall is not None else metadata["wall_seconds"], 1),
        "seconds_to_val_accuracy": seconds_to(history, started),
        "run_dir": str(run_dir),
        "machine": info,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--record", type=Path, default=None, metavar="RUN_DIR")
    parser.add_argument("--command", default=None, help="with --record: the command that trained it")
    parser.add_argument("--configuration", default=None, help="a name for the configuration "
                        "(default: 'default' for the job's defaults and one member)")
    parser.add_argument("--keep", type=Path, default=None, metavar="RUN_DIR",
                        help="write the run directory here and keep it (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("train_args", nargs="*", help="after --: more flags for jobs/train.py")
    args = parser.parse_args()
    info = machine()
    print(describe(info), flush=True)
    if args.record:
        row = record(args.record, command=args.command or "", configuration=args.configuration or "",
                     started=None, wall=None, info=info)
    else:
        configuration = args.configuration or (
            f"{args.members} members" if args.members > 1 else "custom" if args.train_args else "default")
        with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
            run_dir = args.keep.resolve() if args.keep else Path(tmp) / "run"
            flags = ["--seed", str(args.seed), "--members", str(args.members), *args.train_args]
            command = [sys.executable, "jobs/train.py", *flags, "--output-dir", str(run_dir)]
            started = time.time()
            subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - started
            row = record(run_dir, command=" ".join(["jobs/train.py", *flags]), configuration=configuration,
                         started=started, wall=wall, info=info)
            row["run_dir"] = str(run_dir) if args.keep else None  # a temporary directory is gone
    results = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
    results["runs"].append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'configuration':<16} {'seed':>4} {'members':>7} {'epochs':>6} {'test acc':>9} "
          f"{'to 99.0%':>9} {'to 99.5%':>9} {'to 99.6%':>9} {'wall s':>8}")
    for run in results["runs"]:
        reached = [run["seconds_to_val_accuracy"][f"{t:.3f}"] for t in THRESHOLDS]
        shown = [f"{s:>9,.0f}" if s is not None else f"{'never':>9}" for s in reached]
        print(f"{run['configuration']:<16} {run['seed']:>4} {run['members']:>7} {run['epochs']:>6} "
              f"{run['test_accuracy']:>9.2%} {' '.join(shown)} {run['wall_seconds']:>8,.0f}")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
