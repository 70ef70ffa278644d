"""A finished search as files: leaderboard (CSV, Markdown), best configuration (JSON), a plot.

```
<output-dir>/
  search.json         the search's settings (what --resume reads back)
  leaderboard.csv     one row per trial, best validation accuracy first
  leaderboard.md      the same as a Markdown table
  best_config.json    the best trial: its sampled values, the epoch of its best val accuracy, its TrainConfig
  val_accuracy.png    best val accuracy of every trial over (dropout, learning rate)
  ray_tune/           Tune's experiment state and the trials' Ray Train checkpoints (unless --storage-path)
  best_model/         with --retrain-best: a run directory (see mnist_ray.artifacts) for jobs/score.py
```
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from mnist_ray import artifacts
from mnist_ray.config import TrainConfig, to_json
from mnist_ray.errors import JobFailed
from mnist_ray.tune.search import trial_config

SETTINGS_FILE = "search.json"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
BEST_CONFIG_FILE = "best_config.json"
PLOT_FILE = "val_accuracy.png"
BEST_MODEL_DIR = "best_model"

# How a trial ended, in the leaderboard's "stopped early" column.
RAN_ALL_EPOCHS = "no"
STOPPED_BY_ASHA = "ASHA"
STOPPED_BY_PATIENCE = "val-loss patience"
FAILED = "failed"


@dataclass
class TrialRow:
    """One trial on the leaderboard."""

    trial: str
    dropout: float
    learning_rate: float
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped_early: str
    seconds: float


def trial_row(trial_id: str, config: dict, history: pd.DataFrame | None, *, max_epochs: int,
              failed: bool) -> TrialRow:
    """The leaderboard row of a trial: its sampled ``config``, its ``history`` (one row per epoch).

    Tune marks the result on which its scheduler stopped a trial as ``done``; a trial
    that ended by itself before ``max_epochs`` was stopped by Keras' early stopping.
    """
    if history is None or history.empty or "epoch" not in history:
        return TrialRow(trial_id, config["dropout"], config["learning_rate"], math.nan, 0, 0,
                        FAILED if failed else RAN_ALL_EPOCHS, 0.0)
    best = history.loc[history["val_accuracy"].idxmax()]
    last = history.iloc[-1]
    epochs_run = int(last["epoch"])
    if failed:
        ended = FAILED
    elif epochs_run >= max_epochs:
        ended = RAN_ALL_EPOCHS
    elif bool(last.get("done", False)):
        ended = STOPPED_BY_ASHA
    else:
        ended = STOPPED_BY_PATIENCE
    return TrialRow(
        trial=trial_id,
        dropout=float(config["dropout"]),
        learning_rate=float(config["learning_rate"]),
        best_val_accuracy=float(best["val_accuracy"]),
        best_epoch=int(best["epoch"]),
        epochs_run=epochs_run,
        stopped_early=ended,
        seconds=float(last.get("time_total_s", math.nan)),
    )


def leaderboard(rows: list[TrialRow]) -> pd.DataFrame:
    """Trials ranked by best validation accuracy (failed trials last)."""
    frame = pd.DataFrame([asdict(row) for row in rows], columns=list(TrialRow.__dataclass_fields__))
    frame = frame.sort_values("best_val_accuracy", ascending=False, na_position="last", kind="stable")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame.reset_index(drop=True)


def leaderboard_markdown(frame: pd.DataFrame) -> str:
    header = ("| rank | trial | dropout | learning rate | best val acc | best epoch | epochs run "
              "| stopped early | time (s) |")
    lines = [header, "|" + " --- |" * 9]
    for row in frame.itertuples(index=False):
        lines.append(
            f"| {row.rank} | {row.trial} | {row.dropout:.3f} | {row.learning_rate:.2e} | "
            f"{row.best_val_accuracy:.4f} | {row.best_epoch} | {row.epochs_run} | {row.stopped_early} | "
            f"{row.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def best_config(frame: pd.DataFrame, base: TrainConfig) -> dict:
    """The best trial: its values, the epoch of its best validation accuracy and its full TrainConfig."""
    ranked = frame.dropna(subset=["best_val_accuracy"])
    if ranked.empty:
        raise JobFailed("no trial reported a validation accuracy: see the trials' errors above")
    best = ranked.iloc[0]
    config = trial_config(base, {"dropout": best["dropout"], "learning_rate": best["learning_rate"]})
    return {
        "trial": best["trial"],
        "dropout": config.dropout,
        "learning_rate": config.learning_rate,
        "val_accuracy": float(best["best_val_accuracy"]),
        "best_epoch": int(best["best_epoch"]),
        "train": to_json(config),
    }


def plot_val_accuracy(frame: pd.DataFrame, path: Path) -> None:
    """Best val accuracy over (dropout, log learning rate): colour = accuracy, × = ASHA stopped, ★ = best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    done = frame.dropna(subset=["best_val_accuracy"])
    colours = {"cmap": "viridis", "s": 80, "norm": matplotlib.colors.Normalize(
        done["best_val_accuracy"].min(), done["best_val_accuracy"].max())}
    for stopped, marker, label in ((False, "o", "ran on"), (True, "X", "stopped by ASHA")):
        subset = done[(done["stopped_early"] == STOPPED_BY_ASHA) == stopped]
        points = ax.scatter(subset["dropout"], subset["learning_rate"], c=subset["best_val_accuracy"],
                            marker=marker, label=label, **colours)
    if not done.empty:
        best = done.iloc[0]
        ax.scatter([best["dropout"]], [best["learning_rate"]], marker="*", s=400, facecolors="none",
                   edgecolors="red", label=f"best ({best['best_val_accuracy']:.4f})")
    for row in done.itertuples(index=False):
        ax.annotate(f"{row.best_val_accuracy:.3f}", (row.dropout, row.learning_rate),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("dropout")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title("Best validation accuracy of each trial")
    fig.colorbar(points, ax=ax, label="best val accuracy")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def write_results(out_dir: Path, frame: pd.DataFrame, best: dict) -> None:
    artifacts.write_text(out_dir / LEADERBOARD_CSV, frame.to_csv(index=False))
    artifacts.write_text(out_dir / LEADERBOARD_MD, leaderboard_markdown(frame))
    artifacts.write_json(out_dir / BEST_CONFIG_FILE, best)
    plot_val_accuracy(frame, out_dir / PLOT_FILE)
