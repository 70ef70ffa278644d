"""A Kaggle submission (``ImageId,Label``) from the published predictions of one input."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mnist_ray.score import output
from mnist_ray.score.output import PREDICTION_SCHEMA, PREDICTIONS


def write_submission(output_dir: Path, path: str, model_id: str, destination: Path) -> None:
    """A Kaggle submission (``ImageId,Label``) from the published predictions of the input ``path``.

    ``ImageId`` is the file's id column where it has one, else the data row number. Ids that
    are all integers (Kaggle's) are written and sorted as numbers, other ids as text.
    """
    manifest = output.read_manifest(output_dir)
    entries = [e for e in manifest if (e["path"], e["model_id"]) == (path, model_id)]
    parts = entries[-1][PREDICTIONS] if entries else []
    table = output.read_parts(output_dir, parts, PREDICTION_SCHEMA)
    if not table.num_rows:
        print(f"no submission written: no row of {path} has been scored by model {model_id}", flush=True)
        return
    image_id = pc.coalesce(table["image_id"], pc.cast(table["row"], pa.string()))
    if pc.all(pc.match_substring_regex(image_id, r"^-?[0-9]{1,18}$")).as_py():
        image_id = pc.cast(image_id, pa.int64())
    submission = pa.table({"ImageId": image_id, "Label": table["predicted"]}).sort_by("ImageId")
    tmp = destination.with_name(f".{destination.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as out:
        out.write(b"ImageId,Label\n")  # by hand: pyarrow would quote the names, Kaggle's sample does not
        pacsv.write_csv(submission, out, pacsv.WriteOptions(include_header=False))
    os.replace(tmp, destination)
    missing = entries[-1]["rejected"]
    note = f"; {missing:,} rejected row(s) are missing from it" if missing else ""
    print(f"submission: {destination} ({submission.num_rows:,} rows){note}", flush=True)
