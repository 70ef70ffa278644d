"""Small, bounded samples of digit images with their predictions: what the reports' digit grids show.

A report shows a few dozen digits, never all of them, and scoring does not keep
pixels (they would multiply the size of its output). So training and scoring keep,
next to their predictions, the pixels of at most PER_SET images for each of three sets:

* ``sample`` — a uniform random sample; the key is a hash of (group, row), so
  the same input always gives the same sample;
* ``least_confident`` — the lowest top-class probabilities;
* ``confident_mistakes`` — labelled images predicted wrong, most confident first.

Each set is the PER_SET images with the smallest key ("bottom-k"). Bottom-k
selections merge exactly: the bottom k of a union lies within the union of the
parts' bottom k. So every scoring actor forwards the pixels of its own batch's
candidates only, and the driver keeps the overall ones in constant memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_ray.data.schema import IMAGE_SHAPE, NUM_PIXELS

SAMPLE, LEAST_CONFIDENT, CONFIDENT_MISTAKES = "sample", "least_confident", "confident_mistakes"
SETS = (SAMPLE, LEAST_CONFIDENT, CONFIDENT_MISTAKES)
# Four rows of eight in a grid; 3 × 32 images are 75 KB of pixels.
PER_SET = 32

DIGITS_SCHEMA = pa.schema(
    [
        pa.field("set", pa.string(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),  # 0 = first shown
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("label", pa.int64()),  # null: unlabelled
        pa.field("predicted", pa.int64(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("image", pa.binary(NUM_PIXELS), nullable=False),  # uint8, row-major 28 × 28
    ]
)


def set_keys(
    groups: np.ndarray, rows: np.ndarray, labelled: np.ndarray, predicted: np.ndarray,
    labels: np.ndarray, confidence: np.ndarray,
) -> dict[str, np.ndarray]:
    """Each set's key per image (float64 (n,); ``inf`` where the image is not a member).

    ``groups`` int64 (n,) tells sources apart (a file index, or :func:`source_group`);
    ``rows`` int64 (n,); ``labelled`` bool (n,); ``predicted``, ``labels`` int64 (n,);
    ``confidence`` float (n,), the top-class probability.
    """
    confidence = np.asarray(confidence, np.float64)
    mistake = labelled & (predicted != labels)
    return {
        SAMPLE: _uniform(groups, rows),
        LEAST_CONFIDENT: confidence,
        CONFIDENT_MISTAKES: np.where(mistake, -confidence, np.inf),
    }


def candidates(keys: dict[str, np.ndarray], per_set: int = PER_SET) -> np.ndarray:
    """bool (n,): the images within the bottom ``per_set`` of at least one set."""
    keep = np.zeros(len(keys[SAMPLE]), bool)
    for key in keys.values():
        keep[_bottom(key, per_set)] = True
    return keep


def source_group(sources: np.ndarray) -> np.ndarray:
    """int64 ids for source names, stable across processes (Python's hash() is salted)."""
    names, inverse = np.unique(np.asarray(sources, dtype=str), return_inverse=True)
    ids = [int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") for name in names]
    return np.array(ids, np.uint64)[inverse].view(np.int64)


def _bottom(key: np.ndarray, k: int) -> np.ndarray:
    members = np.flatnonzero(np.isfinite(key))
    # A full sort of the members: ties resolve by position, the same on every run.
    order = members[np.argsort(key[members], kind="stable")]
    return order[:k]


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fixed, well-spread hash of uint64 values."""
    x = np.asarray(x, np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _uniform(groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A pseudo-random float in [0, 1) per (group, row): the sample's key."""
    mixed = _mix(_mix(np.asarray(groups).view(np.uint64)) ^ np.asarray(rows, np.int64).view(np.uint64))
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53


class DigitSampler:
    """Keeps the bottom PER_SET images of each set over everything added, with their pixels."""

    COLUMNS = ("group", "source", "row", "labelled", "label", "predicted", "confidence", "image")

    def __init__(self, per_set: int = PER_SET) -> None:
        self.per_set = per_set
        self._kept: dict[str, np.ndarray] | None = None

    def add(
        self, *, groups: np.ndarray, sources: np.ndarray, rows: np.ndarray, labelled: np.ndarray,
        labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, images: np.ndarray,
    ) -> None:
        """Offer images (uint8 (n, 28, 28)); only those in some set's bottom PER_SET so far are kept."""
        new = {
            "group": np.asarray(groups, np.int64), "source": np.asarray(sources, dtype=object),
            "row": np.asarray(rows, np.int64), "labelled": np.asarray(labelled, bool),
            "label": np.asarray(labels, np.int64), "predicted": np.asarray(predicted, np.int64),
            "confidence": np.asarray(confidence, np.float32),
            "image": np.asarray(images, np.uint8).reshape(-1, *IMAGE_SHAPE),
        }
        if self._kept is not None:
            new = {name: np.concatenate([self._kept[name], new[name]]) for name in self.COLUMNS}
        keep = candidates(self._keys(new), self.per_set)
        self._kept = {name: values[keep] for name, values in new.items()}

    def _keys(self, kept: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return set_keys(kept["group"], kept["row"], kept["labelled"], kept["predicted"], kept["label"],
                        kept["confidence"])

    def table(self, exclude: list[str] = ()) -> pa.Table:
        """One row per (set, image), in each set's order (``rank``); an image may be in several sets.

        ``exclude``: sources whose images must not appear (inputs left unpublished).
        """
        if self._kept is None:
            return DIGITS_SCHEMA.empty_table()
        shown = ~np.isin(self._kept["source"].astype(str), list(exclude))
        kept = {name: values[shown] for name, values in self._kept.items()}
        keys = self._keys(kept)
        picks = [(name, _bottom(keys[name], self.per_set)) for name in SETS]
        index = np.concatenate([p for _, p in picks]).astype(np.int64)
        flat = kept["image"][index].reshape(len(index), -1)
        return pa.table(
            {
                "set": pa.array([name for name, p in picks for _ in p], pa.string()),
                "rank": pa.array(np.concatenate([np.arange(len(p)) for _, p in picks]).astype(np.int64)),
                "source": pa.array(kept["source"][index].astype(str), pa.string()),
                "row": pa.array(kept["row"][index]),
                "label": pa.array(kept["label"][index], mask=~kept["labelled"][index]),
                "predicted": pa.array(kept["predicted"][index]),
                "confidence": pa.array(kept["confidence"][index], pa.float32()),
                "image": pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(NUM_PIXELS), len(index), [None, pa.py_buffer(flat.tobytes())]
                ),
            },
            schema=DIGITS_SCHEMA,
        )


def write_digits(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def read_digits(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The sets of a digits file: per set, ``image`` uint8 (n, 28, 28), ``label`` int64 (-1: none),
    ``predicted`` int64, ``confidence`` float32, ``source`` str, ``row`` int64, in rank order."""
    table = pq.read_table(path, schema=DIGITS_SCHEMA).sort_by([("set", "ascending"), ("rank", "ascending")])
    frame = {name: table[name] for name in DIGITS_SCHEMA.names}
    sets = np.asarray(frame["set"].to_pylist(), dtype=object)
    label = frame["label"].fill_null(-1).to_numpy()
    images = np.frombuffer(b"".join(frame["image"].to_pylist()), np.uint8).reshape(-1, *IMAGE_SHAPE)
    out = {}
    for name in SETS:
        mask = sets == name
        out[name] = {
            "image": images[mask], "label": label[mask],
            "predicted": frame["predicted"].to_numpy()[mask],
            "confidence": frame["confidence"].to_numpy()[mask],
            "source": np.asarray(frame["source"].to_pylist(), dtype=object)[mask],
            "row": frame["row"].to_numpy()[mask],
        }
    return out
