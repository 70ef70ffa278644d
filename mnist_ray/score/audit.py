"""The output audit: does a scoring output directory hold exactly what its manifest says?

What ``jobs/audit.py OUTPUT`` runs after an incident (a killed job, a full disk, a hand edit,
a restore from backup), and what the tests run after every fault they inject. It reads the
manifest, the Parquet parts (three columns each, never the probabilities), the batch
directories and the staging area, changes nothing, and returns one line per problem that
names the file and what to do about it:

* every live manifest entry (the latest scoring of a path by a model in a date partition) has
  its parts, each a readable Parquet file holding rows of that input and model only, as many as
  the entry counts (:func:`expected_rows`);
* no file under ``predictions/`` or ``rejects/`` that no live entry names: a part of a
  superseded entry should have been deleted when the rerun was published;
* no (source, row) twice for one model in one date partition, across predictions and rejects;
* every batch in the manifest has ``_SUCCESS``, and every batch with ``_SUCCESS`` its summary;
* staging left over: a committed journal (the next scoring run finishes publishing it) or an
  uncommitted batch (the next scoring run removes it and scores its inputs again).

A batch whose journal is committed is audited as the next run will leave it (its parts and
manifest lines counted as published, the parts it replaces as deleted): what is reported
beside it is what recovery will not mend. The ``_lock`` file is not a problem; a job holding it
is (the output is changing under the audit), and is then the only line.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mnist_ray.errors import EXIT_FAILED, EXIT_OK, InputError
from mnist_ray.score import output
from mnist_ray.score.output import BATCHES, JOURNAL, LOCK, MANIFEST, PREDICTIONS, REJECTS, STAGING, SUCCESS
from mnist_ray.score.records import unread_lines

ENTRY_KEYS = ("path", "sha256", "model_id", "batch_id", "date", "rows_in", "scored", "rejected",
              "file_error", PREDICTIONS, REJECTS)
# Rows named one by one in a duplicate's line; the rest are counted.
ROWS_LISTED = 5


@dataclass
class Entry:
    """A manifest line, where it came from, and whether a later scoring replaced it."""

    line: dict
    where: str  # "_manifest.jsonl line N" or "the journal of batch B"
    pending: bool = False  # published by a committed journal that the next run applies
    replaced_by: str | None = None  # the batch id of the later scoring that supersedes it

    @property
    def key(self) -> tuple[str, str, str]:
        return self.line["path"], self.line["model_id"], self.line["date"]

    def describe(self) -> str:
        e = self.line
        return f"{e['path']} (batch {e['batch_id']}, model {e['model_id']}, date {e['date']})"

    def rescore(self) -> str:
        e = self.line
        return (f"score it again: jobs/score.py --input {e['path']} --date {e['date']} --force, "
                f"with the model {e['model_id']}")


@dataclass
class State:
    """The output directory as the next scoring run will leave it: the manifest with the committed
    journals' lines, where each pending file is now, and the parts those journals delete."""

    output_dir: Path
    entries: list[Entry] = field(default_factory=list)
    pending_files: dict[str, Path] = field(default_factory=dict)  # relative path → where it is now
    pending_batches: set[str] = field(default_factory=set)
    to_delete: set[str] = field(default_factory=set)

    def location(self, relative: str) -> Path:
        return self.pending_files.get(relative, self.output_dir / relative)


def audit(output_dir: str | Path) -> list[str]:
    """The problems of the scoring output directory ``output_dir``, one line each; [] if consistent.

    Raises ``InputError`` if ``output_dir`` is not a scoring output directory.
    """
    out = Path(output_dir)
    check_is_output(out)
    if (holder := lock_holder(out / LOCK)) is not None:
        return [f"{out}: a scoring job (pid {holder}) holds {LOCK}, so the output is changing: "
                "audit it once that job has ended"]
    problems: list[str] = []
    state = State(out)
    problems += read_staging(state)
    problems += read_manifest_lines(state)
    mark_superseded(state.entries)
    live = [e for e in state.entries if e.replaced_by is None]
    rows, part_problems = check_parts(state, live)
    problems += part_problems
    problems += unnamed_files(state)
    problems += duplicates(rows)
    problems += check_batches(state)
    return problems


def check_is_output(out: Path) -> None:
    """Refuse (``InputError``) a path that is not a scoring output directory."""
    if not out.is_dir():
        raise InputError(f"{out}: no such directory")
    if not any((out / name).exists() for name in (MANIFEST, LOCK, PREDICTIONS, REJECTS, BATCHES, STAGING)):
        raise InputError(f"{out} is not a scoring output directory: it has none of {MANIFEST}, {LOCK}, "
                         f"{PREDICTIONS}/, {REJECTS}/, {BATCHES}/, {STAGING}/")


def lock_holder(lock: Path) -> int | None:
    """The pid of the process holding ``lock`` (a flock, as :func:`output.locked` takes it), if any.

    Read from /proc/locks rather than by trying the lock: a probe that held it for a moment could
    make a scoring job starting just then fail on a busy output. None where /proc/locks is absent.
    """
    try:
        stat = lock.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4])
    return None


def read_staging(state: State) -> list[str]:
    """Report what ``_staging/`` holds, and take the committed journals into ``state``, oldest first."""
    problems = []
    staging = state.output_dir / STAGING
    for root in sorted(staging.iterdir()) if staging.is_dir() else []:
        where = f"{STAGING}/{root.name}"
        if not (root / JOURNAL).is_file():
            problems.append(f"{where}: an unpublished batch (no {JOURNAL}): nothing of it is visible; "
                            "the next scoring run removes it and scores its inputs again")
            continue
        try:
            journal = json.loads((root / JOURNAL).read_text())
            batch_id, moves, manifest = journal["batch_id"], journal["moves"], journal["manifest"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{where}/{JOURNAL} cannot be read ({exc!r}): the next scoring run will fail on "
                            f"it; move {where} out of the output and score its inputs again")
            continue
        problems.append(f"{where}: a batch committed but not fully published (its {JOURNAL} is there): "
                        "the next scoring run finishes publishing it")
        state.pending_batches.add(batch_id)
        state.to_delete.update(journal["delete"])
        for relative in moves:
            if (root / relative).exists():
                state.pending_files[relative] = root / relative
        state.entries += [Entry(line, f"the journal of batch {batch_id}", pending=True)
                          for line in manifest if isinstance(line, dict)]
    return problems


def read_manifest_lines(state: State) -> list[str]:
    """Add the manifest's lines to ``state`` before the pending ones (they come after on disk);
    report lines that cannot be read and entries whose counts do not add up."""
    path = state.output_dir / MANIFEST
    lines = path.read_text().splitlines() if path.is_file() else []
    published, problems = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            missing = [key for key in ENTRY_KEYS if key not in line]
        except ValueError as exc:
            problems.append(f"{MANIFEST} line {number} is not JSON ({exc}): restore the file from a backup")
            continue
        if missing:
            problems.append(f"{MANIFEST} line {number} lacks {', '.join(missing)}: "
                            "restore the file from a backup")
            continue
        published.append(Entry(line, f"{MANIFEST} line {number}"))
    known = {e.line["batch_id"] for e in published}
    # A journal interrupted after it appended its lines is pending only for its files.
    state.entries = published + [e for e in state.entries if e.line.get("batch_id") not in known]
    for e in state.entries:
        line = e.line
        if line["rows_in"] != line["scored"] + line["rejected"]:
            problems.append(f"{e.where}: {e.describe()} counts {line['rows_in']} rows in but "
                            f"{line['scored']} scored + {line['rejected']} rejected: rows were lost or "
                            f"duplicated; {e.rescore()}")
    return problems


def mark_superseded(entries: list[Entry]) -> None:
    """Mark every entry that a later scoring of its path by its model in its date partition replaced."""
    latest: dict[tuple[str, str, str], Entry] = {}
    for e in entries:
        if (earlier := latest.get(e.key)) is not None:
            earlier.replaced_by = e.line["batch_id"]
        latest[e.key] = e


def expected_rows(entry: dict) -> tuple[int, int, int]:
    """(predictions rows, rejects rows with a row number, rejects rows without) of a manifest entry.

    Every scored row is a prediction; every row rejected one by one a reject with its row number. A
    file rejected whole (``file_error``) has one reject with a null row, and its ``rejected`` count
    also holds the data lines it left unread (its reason ends "(N data lines not read)"), which have
    no reject of their own.
    """
    whole = entry["file_error"] is not None
    unread = unread_lines(entry["file_error"]) if whole else 0
    return entry["scored"], entry["rejected"] - unread, int(whole)


def check_parts(state: State, live: list[Entry]) -> tuple[list[tuple[str, str, str, pa.Table]], list[str]]:
    """Check the parts of the live entries; returns their (model, date, part, rows) and the problems.

    ``rows`` holds the parts' ``source`` and non-null ``row`` columns, for :func:`duplicates`.
    """
    rows, problems = [], []
    for e in live:
        expected = dict(zip(("predictions", "numbered", "whole"), expected_rows(e.line), strict=True))
        found = {"predictions": 0, "numbered": 0, "whole": 0}
        complete = True
        for kind in (PREDICTIONS, REJECTS):
            for relative in e.line[kind]:
                table, problem = read_part(state.location(relative), relative, e)
                problems += [problem] if problem else []
                if table is None:
                    complete = False
                    continue
                numbered = table.filter(pc.is_valid(table["row"]))
                if kind == PREDICTIONS:
                    found["predictions"] += table.num_rows
                else:
                    found["numbered"] += numbered.num_rows
                    found["whole"] += table.num_rows - numbered.num_rows
                # Plain fields: the two schemas differ in whether ``row`` may be null.
                pairs = pa.Table.from_arrays([numbered["source"], numbered["row"]], names=["source", "row"])
                rows.append((e.line["model_id"], e.line["date"], relative, pairs))
        if complete and found != expected:
            problems.append(
                f"{e.describe()}: its parts hold {found['predictions']} predictions and "
                f"{found['numbered']} + {found['whole']} rejects (numbered rows + whole file); the manifest "
                f"says {expected['predictions']} and {expected['numbered']} + {expected['whole']}: "
                f"{e.rescore()}")
    return rows, problems


def read_part(path: Path, relative: str, e: Entry) -> tuple[pa.Table | None, str | None]:
    """A live part's ``source``, ``row`` and ``model_id`` columns (None if it cannot be read) and the
    problem with it, if any (rows of another input or model are counted, and said)."""
    if not path.is_file():
        return None, (f"{relative} is missing: {e.where} names it for {e.describe()}, "
                      f"so its rows are gone from the output; {e.rescore()}")
    try:
        table = pq.ParquetFile(path).read(columns=["source", "row", "model_id"])
    except (OSError, pa.ArrowException) as exc:
        return None, (f"{relative} is not a readable Parquet file ({exc}): part of {e.describe()}; "
                      f"{e.rescore()}")
    foreign = table.filter(pc.or_(pc.not_equal(table["source"], e.line["path"]),
                                  pc.not_equal(table["model_id"], e.line["model_id"])))
    if foreign.num_rows:
        others = sorted({f"{s} by {m}" for s, m in zip(foreign["source"].to_pylist(),
                                                        foreign["model_id"].to_pylist(), strict=True)})
        return table, (f"{relative} holds {foreign.num_rows} rows of {', '.join(others[:3])}, not only of "
                       f"{e.describe()}, whose part it is: remove those rows or {e.rescore()}")
    return table, None


def unnamed_files(state: State) -> list[str]:
    """Files under predictions/ and rejects/ that readers see but no live entry names."""
    owner = {p: e for e in state.entries for kind in (PREDICTIONS, REJECTS) for p in e.line[kind]}
    problems = []
    for kind in (PREDICTIONS, REJECTS):
        top = state.output_dir / kind
        for directory, subdirs, files in os.walk(top) if top.is_dir() else []:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(("_", ".")))
            for name in sorted(files):
                relative = (Path(directory) / name).relative_to(state.output_dir).as_posix()
                if name.startswith(("_", ".")) or relative in state.to_delete:
                    continue  # readers skip these; a committed journal deletes those
                e = owner.get(relative)
                if e is None:
                    problems.append(f"{relative}: no manifest entry names it, yet readers of {kind}/ see its "
                                    "rows: move it out of the output directory")
                elif e.replaced_by is not None:
                    problems.append(f"{relative}: a part of {e.describe()}, which batch {e.replaced_by} "
                                    "replaced: it should have been deleted then, and readers count its rows "
                                    "twice: delete it")
    return problems


def duplicates(rows: list[tuple[str, str, str, pa.Table]]) -> list[str]:
    """(source, row) pairs found more than once for one model in one date partition, one line per
    input and set of parts."""
    groups: dict[tuple[str, str], list[pa.Table]] = {}
    for model_id, date, relative, table in rows:
        groups.setdefault((model_id, date), []).append(
            table.append_column("part", pa.repeat(pa.scalar(relative), table.num_rows)))
    problems = []
    for (model_id, date), tables in sorted(groups.items()):
        counted = pa.concat_tables(tables).group_by(["source", "row"]).aggregate([("part", "list")])
        repeated = counted.filter(pc.greater(pc.list_value_length(counted["part_list"]), 1))
        found: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for source, row, parts in zip(*(repeated[c].to_pylist() for c in ("source", "row", "part_list")),
                                      strict=True):
            found.setdefault((source, tuple(sorted(set(parts)))), []).append(row)
        for (source, parts), numbers in sorted(found.items()):
            numbers.sort()
            listed = ", ".join(map(str, numbers[:ROWS_LISTED]))
            more = f" and {len(numbers) - ROWS_LISTED} more" if len(numbers) > ROWS_LISTED else ""
            problems.append(f"{len(numbers)} row(s) of {source} (rows {listed}{more}) appear more than once "
                            f"for model {model_id} in date={date}: in {', '.join(parts)}; readers count "
                            "them twice: keep one part's copy")
    return problems


def check_batches(state: State) -> list[str]:
    """Every batch of the manifest has ``_SUCCESS``; every batch directory with it has a summary;
    one without it and without entries is a batch never published."""
    out = state.output_dir
    listed: dict[str, int] = {}
    for e in state.entries:
        listed[e.line["batch_id"]] = listed.get(e.line["batch_id"], 0) + 1
    on_disk = sorted(p.name for p in (out / BATCHES).iterdir()) if (out / BATCHES).is_dir() else []
    problems = []
    for batch_id in sorted(set(on_disk) | set(listed) | state.pending_batches):
        relative = f"{BATCHES}/{batch_id}"
        done = batch_id in state.pending_batches or (out / relative / SUCCESS).is_file()
        if not done and batch_id in listed:
            problems.append(f"{relative}/{SUCCESS} is missing, but the manifest lists {listed[batch_id]} "
                            f"input(s) of batch {batch_id}: readers of {BATCHES}/ take it as unfinished; if "
                            f"its summary is complete, create the {SUCCESS} file")
        elif not done:
            problems.append(f"{relative} has no {SUCCESS} and the manifest names none of its inputs: a "
                            "batch never published; move it out of the output directory")
        elif not state.location(f"{relative}/{output.SUMMARY_FILE}").is_file():
            problems.append(f"{relative} has {SUCCESS} but no {output.SUMMARY_FILE}: its report cannot be "
                            f"rendered; restore the summary from a backup")
    return problems


def main(output_dir: str) -> int:
    """The audit as a job: one line per problem on stdout, a verdict on stderr; returns the exit code
    (0 consistent, 1 not)."""
    problems = audit(output_dir)
    for line in problems:
        print(line, flush=True)
    if problems:
        print(f"{output_dir}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILED
    manifest = output.read_manifest(Path(output_dir))
    batches = {e["batch_id"] for e in manifest}
    print(f"{output_dir}: consistent ({len(manifest)} manifest entries, {len(batches)} batches)",
          file=sys.stderr)
    return EXIT_OK
