"""The inputs of a scoring batch: what each is, and which this model has already scored.

Every input is hashed (sha256 of the file as stored) before scoring. An input is its
content, not its name: the manifest of the output directory (:mod:`mnist_ray.score.output`)
says which contents the model already scored, under whatever path, and those are skipped
unless ``--force``. Two inputs of one run with the same content are scored once, always.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mnist_ray.data.csv_files import file_digest
from mnist_ray.score import output

MAX_SKIPS_LISTED = 20


@dataclass
class InputFile:
    """One resolved input and what the driver knows of it before scoring."""

    path: str
    size: int | None = None
    sha256: str | None = None
    unreadable: str | None = None  # why its bytes could not be read for hashing
    previous: dict | None = None  # the manifest entry of an earlier scoring of this content


def plan_inputs(paths: list[str], manifest: list[dict], model_id: str, *, force: bool) -> list[InputFile]:
    """Hash every input and find those this model already scored (printing what is skipped).

    A skipped input's ``previous`` is the earlier scoring's manifest entry, or for the second
    copy of a content in this run ``{"path": <the first copy>, "batch_id": None, "date": None}``.
    """
    inputs = []
    first_of: dict[str, str] = {}  # sha256 -> the path of this run's first input with that content
    for path in paths:
        item = InputFile(path)
        try:
            item.size, item.sha256 = file_digest(path)
        except OSError as exc:
            item.unreadable = f"cannot be read: {exc.strerror or exc}"
        if item.sha256 is not None:
            if item.sha256 in first_of:
                item.previous = {"path": first_of[item.sha256], "batch_id": None, "date": None}
            elif not force:
                item.previous = output.previous_scoring(manifest, item.sha256, model_id)
            first_of.setdefault(item.sha256, path)
        inputs.append(item)
    skipped = [i for i in inputs if i.previous is not None]
    # A directory that keeps old files would repeat them every night: name a few, count the rest.
    for item in skipped[:MAX_SKIPS_LISTED]:
        print(f"skipping {item.path}: {why_skipped(item, model_id)}", flush=True)
    if len(skipped) > MAX_SKIPS_LISTED:
        print(f"skipping {len(skipped) - MAX_SKIPS_LISTED} more input(s) already scored by model {model_id}",
              flush=True)
    return inputs


def why_skipped(item: InputFile, model_id: str) -> str:
    """The reason printed for a skipped input: which earlier scoring (or input of this run) it repeats."""
    earlier = item.previous
    if earlier["batch_id"] is None:
        return f"same content as {earlier['path']}, which this run scores"
    same = "" if earlier["path"] == item.path else f"same content as {earlier['path']}, "
    return (f"{same}already scored by model {model_id} in batch {earlier['batch_id']} "
            f"(date {earlier['date']}); --force scores it again")


def input_size(paths: list[str]) -> int | None:
    """The inputs' total stored size in bytes; None if one cannot be had cheaply (a URI, an error)."""
    try:
        return sum(os.path.getsize(path) for path in paths)
    except OSError:
        return None
