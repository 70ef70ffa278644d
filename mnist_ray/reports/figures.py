"""The reports' pictures, drawn with matplotlib from saved metrics, history and predictions.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot: no
global figure state and no interactive backend, so it renders the same in a
job on a headless cluster node as anywhere else (``png_bytes`` draws with Agg).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from mnist_ray.data.schema import CLASS_NAMES, NUM_CLASSES

RIGHT, WRONG, NEUTRAL = "#1a7f37", "#cf222e", "#24292f"
TRAIN_COLOUR, VAL_COLOUR, BATCH_COLOUR, REFERENCE_COLOUR = "#0969da", "#bc4c00", "#0969da", "#8c959f"
DPI = 100
GRID_COLUMNS = 8
# Digit grids: cells of CELL_WIDTH × CELL_HEIGHT mosaic pixels, CELL_INCHES wide; the digit sits
# below a caption band of CAPTION_PIXELS.
CELL_WIDTH, CELL_HEIGHT, CAPTION_PIXELS, CELL_INCHES = 36, 48, 13, 1.25
GRID_TITLE_INCHES = 0.45


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def training_curves(history: list[dict], selected_epoch: int | None) -> Figure:
    """Accuracy and loss per epoch, training vs validation, and the learning rate (log scale)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    panels = fig.subplots(1, 3)
    for ax, metric, title in ((panels[0], "accuracy", "accuracy"), (panels[1], "loss", "loss")):
        ax.plot(epochs, [h[metric] for h in history], "o-", color=TRAIN_COLOUR, ms=3, label="training")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", color=VAL_COLOUR, ms=3,
                label="validation")
        ax.set_title(title)
    panels[0].set_ylabel("accuracy")
    panels[1].set_ylabel("cross-entropy loss")
    panels[2].step(epochs, [h["learning_rate"] for h in history], where="mid", color=NEUTRAL)
    panels[2].set_yscale("log")
    panels[2].set_title("learning rate")
    for ax in panels:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="#6e7781", ls=":", lw=1.2,
                       label=f"selected (epoch {selected_epoch})")
    panels[0].legend(loc="lower right", fontsize=9)
    return fig


def confusion_matrices(matrix: list[list[int]]) -> Figure:
    """The confusion matrix ``[true][predicted]`` as counts and as shares of each true class.

    Colours are on a log scale: on a good model the diagonal holds nearly
    everything, and a linear scale would make every mistake invisible.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(13, 5.9), layout="constrained")
    left, right = fig.subplots(1, 2)
    _heatmap(left, counts, LogNorm(vmin=1, vmax=max(1, counts.max())), "{:,.0f}",
             "counts (colour: log scale)")
    _heatmap(right, shares * 100, LogNorm(vmin=0.1, vmax=100), "{:.1f}",
             "% of each true class (colour: log scale)")
    return fig


def _heatmap(ax, values: np.ndarray, norm: LogNorm, fmt: str, title: str) -> None:
    shown = np.ma.masked_where(values <= 0, values)
    image = ax.imshow(shown, cmap="Blues", norm=norm)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES)
    ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = np.sqrt(norm.vmin * norm.vmax)  # the middle of the log scale: text turns white above it
    for (i, j), value in np.ndenumerate(values):
        if value > 0:
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7.5,
                    color="white" if value > threshold else NEUTRAL)


def per_class_scores(per_class: dict[str, dict]) -> Figure:
    """Precision, recall and F1 per class, with each class's support under its name."""
    names = list(per_class)
    x = np.arange(len(names))
    measures = ("precision", "recall", "f1")
    values = np.array([[per_class[n][m] for n in names] for m in measures])
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.27
    for k, (measure, colour) in enumerate(zip(measures, ("#0969da", "#bc4c00", "#1a7f37"), strict=True)):
        ax.bar(x + (k - 1) * width, values[k], width, color=colour,
               label="F1" if measure == "f1" else measure)
    # The bars of a good model all end near 1: start the axis just below the lowest one.
    low = float(values[values > 0].min()) if (values > 0).any() else 0.0
    bottom = max(0.0, np.floor((low - 0.005) * 100) / 100)
    ax.set_ylim(bottom, 1.0)
    ax.set_xticks(x, [f"{n}\nn={per_class[n]['support']:,}" for n in names], fontsize=9)
    ax.set_ylabel("score" + (f" (axis starts at {bottom:.2f})" if bottom > 0 else ""))
    ax.set_title("per-class precision, recall and F1")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    return fig


def digit_grid(
    images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
    where: list[str], title: str,
) -> Figure:
    """Digits with their predicted class and confidence: green when right, red when wrong,
    dark grey when the true class is unknown (``labels`` -1); under each, ``where`` it is (its
    data row, and file), so that it can be looked up.

    ``images`` uint8 (n, 28, 28); ``labels``, ``predicted`` int (n,); ``confidence`` float (n,).
    """
    n = len(images)
    rows = max(1, -(-n // GRID_COLUMNS))
    # One image of all the digits in one axes, the captions as text: a small axes per digit (with
    # its unused ticks) took seconds to build and draw. A cell is CELL_WIDTH × CELL_HEIGHT pixels
    # of the mosaic: a caption band, the 28×28 digit, a band for its row number.
    mosaic = np.zeros((rows * CELL_HEIGHT, GRID_COLUMNS * CELL_WIDTH), np.uint8)
    grid_inches = (GRID_COLUMNS * CELL_INCHES, rows * CELL_HEIGHT / CELL_WIDTH * CELL_INCHES)
    height = grid_inches[1] + GRID_TITLE_INCHES
    fig = Figure(figsize=(grid_inches[0], height))
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
    ax = fig.add_axes((0, 0, 1, grid_inches[1] / height))
    ax.set_axis_off()
    for k in range(n):
        top, left = (k // GRID_COLUMNS) * CELL_HEIGHT, (k % GRID_COLUMNS) * CELL_WIDTH
        image_top, image_left = top + CAPTION_PIXELS, left + (CELL_WIDTH - 28) // 2
        mosaic[image_top:image_top + 28, image_left:image_left + 28] = images[k]
        percent = _percent(confidence[k])
        if labels[k] < 0:
            text, colour = f"{predicted[k]}  {percent}", NEUTRAL
        elif labels[k] == predicted[k]:
            text, colour = f"{predicted[k]}  {percent}", RIGHT
        else:
            text, colour = f"{predicted[k]}  {percent}\ntrue {labels[k]}", WRONG
        centre = left + CELL_WIDTH / 2 - 0.5
        ax.text(centre, image_top - 1.5, text, color=colour, fontsize=9, fontweight="bold", ha="center",
                va="bottom")
        ax.text(centre, image_top + 28, where[k], ha="center", va="top", fontsize=7, color="#6e7781")
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    return fig


def _percent(probability: float) -> str:
    """Rounded down to 0.1 %: a confidence of 0.9996 must not read as a certain 100 %."""
    return f"{np.floor(probability * 1000) / 10:.1f}%"


def confidence_histogram(confidence: np.ndarray, correct: np.ndarray | None, low_confidence: float) -> Figure:
    """Histogram of the top-class probability, right vs wrong when ``correct`` (bool (n,)) is known.

    Counts are on a log scale: right predictions are almost all above 0.99.
    """
    bins = np.linspace(0.1, 1.0, 37)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    if correct is None:
        ax.hist(confidence, bins=bins, color=BATCH_COLOUR, label=f"all predictions ({len(confidence):,})")
    else:
        # Side by side in each bin: overlaid translucent bars mix into a third colour.
        ax.hist([confidence[correct], confidence[~correct]], bins=bins, color=[RIGHT, WRONG],
                label=[f"right ({int(correct.sum()):,})", f"wrong ({int((~correct).sum()):,})"])
    ax.axvline(low_confidence, color=NEUTRAL, ls="--", lw=1,
               label=f"low-confidence threshold {low_confidence}")
    ax.set_yscale("log")
    ax.set_xlim(0.1, 1.0)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("images (log scale)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def class_distribution(batch_counts: np.ndarray, reference_counts: np.ndarray, title: str) -> Figure:
    """The share of each predicted class in the batch next to its share in the training data."""
    x = np.arange(NUM_CLASSES)
    batch = batch_counts / max(1, batch_counts.sum())
    reference = reference_counts / max(1, reference_counts.sum())
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, batch * 100, 0.4, color=BATCH_COLOUR,
           label=f"predicted in this batch ({batch_counts.sum():,})")
    ax.bar(x + 0.2, reference * 100, 0.4, color=REFERENCE_COLOUR,
           label=f"training data ({reference_counts.sum():,})")
    ax.set_xticks(x, CLASS_NAMES)
    ax.set_xlabel("class")
    ax.set_ylabel("% of images")
    ax.set_title(title, fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig
