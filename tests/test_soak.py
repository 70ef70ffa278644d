"""A month of nights: 30 nightly scoring runs on one output directory, with the faults of real nights.

Each night new small files arrive in an incoming directory that keeps a week of files (as an
upstream's retention would): some with bad rows, some rejected whole, some exact copies of
older files (at a new path, or re-delivered at their old path), and once a file still being
written while the job reads it. Some nights the job is stopped: SIGTERM or SIGKILL at a random
moment, or SIGKILL just before its batch is committed (staging is left) or halfway through
publishing it (a journal is left). Halfway through the month a new model takes over. Every
night is ``jobs/score.py`` as a process, the next night's run recovers what the last one left.

Afterwards the audit passes, and every (content, model) that a night was given was scored
exactly once, under whichever path came first: one manifest entry, each of its rows once in the
Parquet parts, none lost.
The test prints a table of the faults injected (``-s``) and records it as a property.

The nights score in the job's own process (``--executor local``), not on Ray: what a month
stresses (skipping what was scored, staging, the journal, recovery, the lock, the manifest) is
the same code for both executors, while Ray's own faults, a killed actor and a lost node, have
their tests (test_scoring_faults.py, test_node_loss.py); and a night on Ray costs ~20 s here
against ~3 s, which would make this month take over ten minutes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mnist_ray import artifacts
from mnist_ray.score import output as scoring_output
from mnist_ray.score.audit import audit
from mnist_ray.score.records import unread_lines
from tests.helpers import (
    KILL_BEFORE_PUBLISHING,
    KILL_WHILE_PUBLISHING,
    REPO,
    append_column,
    rewrite_csv,
    set_csv_cell,
    write_kaggle_csv,
)

pytestmark = [pytest.mark.slow, pytest.mark.extended]
SEED = 20261201
NIGHTS, NEW_MODEL_NIGHT, RETENTION_NIGHTS = 30, 16, 7
FIRST_NIGHT = datetime.date(2026, 11, 1)
SIGNALLED = ("SIGTERM at a random moment", "SIGKILL at a random moment")
HOOKED = {"SIGKILL before publishing (staging left)": KILL_BEFORE_PUBLISHING,
          "SIGKILL while publishing (journal left)": KILL_WHILE_PUBLISHING}
FAULTS_EACH = 2  # nights of each kind of stop
GROWING = "a file still being written (changed while read)"
BAD_ROWS, WHOLE = "files with bad rows", "files rejected whole (unknown column)"
SAME_PATH = "copies of an older file at its own path (skipped)"
NEW_PATH = "copies of an older file at a new path (skipped)"
NEW_MODEL = "a new model (scores every file anew)"
ALL = "every (content, model) given to a night"
NIGHT_TIMEOUT_S = 300

# The upstream writer finishing a file after the job hashed its inputs, before the job reads it:
# run in the job's process, so that the moment is always the same one.
GROW_AFTER_HASHING = """
from mnist_ray.score import job
planned = job.plan_inputs
def plan_then_grow(*args, **kwargs):
    inputs = planned(*args, **kwargs)
    with open(os.environ["SOAK_GROWING"], "a") as f:
        f.write(os.environ["SOAK_GROWING_REST"])
    return inputs
job.plan_inputs = plan_then_grow
"""


@dataclass
class Delivered:
    """What the test knows of one file's content, independently of the job."""

    lines: int  # data lines
    bad_rows: set[int] = field(default_factory=set)  # rejected one by one
    whole: bool = False  # rejected whole: every line unread
    kinds: set[str] = field(default_factory=set)  # the file-level faults it carries

    @property
    def rejected(self) -> int:
        return self.lines if self.whole else len(self.bad_rows)


@dataclass
class Night:
    number: int
    date: str
    model: str
    fault: str | None = None
    new_files: int = 0
    code: int | None = None
    given: set[tuple[str, str]] = field(default_factory=set)  # (path, sha256) present after the night
    note: str = ""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def second_run(tiny_run, tmp_path_factory, mnist_arrays) -> Path:
    """A second model: tiny_run's fitted one more epoch on other images, exported as training does."""
    import tf_keras as keras

    from mnist_ray.train.export import export_onnx

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-2"
    shutil.copytree(tiny_run, run_dir)
    keras.utils.set_random_seed(1)
    model = artifacts.load_model(run_dir)
    model.fit(mnist_arrays["x_train"][3000:6000], mnist_arrays["y_train"][3000:6000], epochs=1, batch_size=64,
              verbose=0)
    model.save(run_dir / artifacts.MODEL_FILE)
    metadata = artifacts.read_json(run_dir / artifacts.METADATA_FILE)
    metadata["onnx"] = export_onnx(model, run_dir / artifacts.ONNX_FILE, mnist_arrays["x_test"][:200])
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata)
    assert artifacts.model_id(run_dir) != artifacts.model_id(tiny_run)
    return run_dir


class Upstream:
    """Delivers each night's files into ``incoming`` and keeps a week of them."""

    def __init__(self, incoming: Path, mnist_arrays, rng: np.random.Generator) -> None:
        self.incoming, self.rng = incoming, rng
        self.images, self.labels = mnist_arrays["x_test"], mnist_arrays["y_test"]
        self.next_image = 0
        self.delivered: dict[tuple[str, str], Delivered] = {}  # (path, sha256) → facts
        self.archive: dict[str, tuple[bytes, int]] = {}  # path → (content, night delivered)
        self.arrived: dict[str, int] = {}  # path → night it (last) arrived
        self.events: Counter[str] = Counter()  # file-level faults delivered

    def night(self, number: int, *, growing: bool) -> tuple[int, tuple[Path, str] | None]:
        """Deliver night ``number``'s files; returns their count and, with ``growing``, the file left
        half-written and the text the writer appends later."""
        for name, night in list(self.arrived.items()):
            if night <= number - RETENTION_NIGHTS:
                (self.incoming / name).unlink()
                del self.arrived[name]
        count = int(self.rng.integers(2, 5))
        for k in range(count):
            self.new_file(f"n{number:02d}-{k}.csv", number)
        if self.archive and self.rng.random() < 0.5:
            self.copy(number)
            count += 1
        half = None
        if growing:
            half = self.growing_file(f"n{number:02d}-growing.csv", number)
            count += 1
        return count, half

    def take(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        first = self.next_image % (len(self.images) - rows)
        self.next_image += rows
        return self.images[first:first + rows], self.labels[first:first + rows]

    def new_file(self, name: str, number: int) -> None:
        path = self.incoming / name
        rows = int(self.rng.integers(20, 60))
        write_kaggle_csv(path, *self.take(rows))
        facts = Delivered(rows)
        roll = self.rng.random()
        if roll < 0.25:
            bad = self.rng.choice(np.arange(1, rows + 1), int(self.rng.integers(1, 4)), replace=False)
            for row in sorted(bad):
                set_csv_cell(path, int(row), "pixel7", str(self.rng.choice(["300", "x", "-1"])))
                facts.bad_rows.add(int(row))
            facts.kinds.add(BAD_ROWS)
        elif roll < 0.33:
            rewrite_csv(path, append_column("colour", "1"))
            facts.whole = True
            facts.kinds.add(WHOLE)
        self.record(path, number, facts)

    def copy(self, number: int) -> None:
        """An exact copy of an older file: re-delivered at its own path, or under a new name."""
        name = str(self.rng.choice(sorted(self.archive)))
        data, _ = self.archive[name]
        facts = self.delivered[(str(self.incoming / name), hashlib.sha256(data).hexdigest())]
        if self.rng.random() < 0.5:
            path, kind = self.incoming / name, SAME_PATH
        else:
            path, kind = self.incoming / f"n{number:02d}-copy-of-{name}", NEW_PATH
        path.write_bytes(data)
        copied = Delivered(facts.lines, set(facts.bad_rows), facts.whole, facts.kinds - {SAME_PATH, NEW_PATH})
        copied.kinds.add(kind)
        self.record(path, number, copied)

    def growing_file(self, name: str, number: int) -> tuple[Path, str]:
        path = self.incoming / name
        rows = int(self.rng.integers(30, 60))
        write_kaggle_csv(path, *self.take(rows))
        text = path.read_text()
        cut = text.index("\n", len(text) // 2) + 1  # whole lines: the first half is a valid CSV too
        path.write_text(text[:cut])
        self.record(path, number, Delivered(rows, kinds={GROWING}), content=text.encode())
        return path, text[cut:]

    def record(self, path: Path, number: int, facts: Delivered, content: bytes | None = None) -> None:
        self.events.update(facts.kinds)
        data = content if content is not None else path.read_bytes()
        self.delivered[(str(path), hashlib.sha256(data).hexdigest())] = facts
        self.archive[path.name] = (data, number)
        self.arrived[path.name] = number

    def present(self) -> set[tuple[str, str]]:
        return {(str(self.incoming / name), sha256(self.incoming / name)) for name in self.arrived}


def run_night(night: Night, run_dir: Path, incoming: Path, output: Path, rng: np.random.Generator,
              typical_s: float, growing: tuple[Path, str] | None) -> subprocess.CompletedProcess:
    """One night's job as a process, stopped as ``night.fault`` says."""
    args = ["--model", str(run_dir), "--input", str(incoming), "--output", str(output), "--date", night.date,
            "--executor", "local"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    fault = HOOKED.get(night.fault, "")
    if growing:
        fault += GROW_AFTER_HASHING
        env |= {"SOAK_GROWING": str(growing[0]), "SOAK_GROWING_REST": growing[1]}
    if fault:
        code = f"import os, signal, sys\nsys.path.insert(0, {str(REPO)!r})\n{fault}\n" + (
            "from mnist_ray.cli import score_main\nsys.exit(score_main(sys.argv[1:]))\n")
        command = [sys.executable, "-c", code, *args]
    else:
        command = [sys.executable, str(REPO / "jobs" / "score.py"), *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    if night.fault in SIGNALLED:
        # Anywhere in a night: Python's start, the imports, hashing, scoring, publishing, the report.
        delay = float(rng.uniform(0.05, 1.0)) * typical_s
        try:
            proc.wait(timeout=delay)
            night.note = f"ended before its signal was due ({delay:.1f}s)"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM if night.fault.startswith("SIGTERM") else signal.SIGKILL)
            night.note = f"signalled after {delay:.1f}s"
    out, err = proc.communicate(timeout=NIGHT_TIMEOUT_S)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def plan_faults(rng: np.random.Generator) -> tuple[dict[int, str], int]:
    """Which nights are stopped and how, and the night the growing file arrives.

    A stopped night is followed by a clean one, whose recovery is checked; the last night of
    each model runs clean (a new model scores anew: what the old one left is not its to finish).
    """
    kinds = [kind for kind in (*SIGNALLED, *HOOKED) for _ in range(FAULTS_EACH)]
    candidates = [n for n in range(2, NIGHTS) if n != NEW_MODEL_NIGHT - 1]
    chosen: list[int] = []
    while len(chosen) < len(kinds):
        night = int(rng.choice(candidates))
        if all(abs(night - other) > 1 for other in chosen):
            chosen.append(night)
    faults = dict(zip(sorted(chosen), (str(kind) for kind in rng.permutation(kinds)), strict=True))
    growing = int(rng.choice([n for n in candidates if n not in faults]))
    return faults, growing


def test_a_month_of_nights_scores_every_input_once(tiny_run, second_run, tmp_path, mnist_arrays,
                                                    record_property):
    rng = np.random.default_rng(SEED)
    incoming, output = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    upstream = Upstream(incoming, mnist_arrays, rng)
    faults, growing_night = plan_faults(rng)
    models = {tiny_run: artifacts.model_id(tiny_run), second_run: artifacts.model_id(second_run)}
    nights, clean_seconds = [], []
    for number in range(1, NIGHTS + 1):
        run_dir = tiny_run if number < NEW_MODEL_NIGHT else second_run
        date = (FIRST_NIGHT + datetime.timedelta(days=number - 1)).isoformat()
        night = Night(number, date, models[run_dir], faults.get(number))
        night.new_files, growing = upstream.night(number, growing=number == growing_night)
        typical = statistics.median(clean_seconds) if clean_seconds else 5.0
        started = time.monotonic()
        result = run_night(night, run_dir, incoming, output, rng, typical, growing)
        night.code = result.returncode
        log = f"night {number}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        if night.fault is None and growing is None:
            clean_seconds.append(time.monotonic() - started)
            assert result.returncode in (0, 3), log
        if growing is not None:
            assert result.returncode == 1 and "changed while being scored" in result.stderr, log
        if night.fault in SIGNALLED:
            left = [p.name for p in (output / "_staging").iterdir()] if (output / "_staging").is_dir() else []
            journal = any((output / "_staging" / name / "_PUBLISH.json").exists() for name in left)
            night.note += ("; left a journal" if journal else "; left staging" if left else "; left nothing")
        check_recovery(nights[-1] if nights else None, result.stdout)
        night.given = upstream.present()
        nights.append(night)
    assert nights[-1].code in (0, 3) and not list((output / "_staging").iterdir())

    started = time.monotonic()
    assert audit(output) == []
    audit_seconds = time.monotonic() - started
    table, problems = account(nights, upstream, output)
    lines = format_table(table)
    print(f"\n{len(nights)} nights, {len(scoring_output.read_manifest(output))} manifest entries; the audit "
          f"took {audit_seconds:.2f}s\n" + "\n".join(lines))
    print("\n".join(f"night {n.number:2d} {n.date} model {n.model} {n.new_files} new file(s): exit {n.code}"
                    f"{'  ' + n.fault if n.fault else ''} {n.note}" for n in nights))
    record_property("faults", "\n".join(lines))
    assert problems == []
    assert {row[0]: row[1] for row in table}[GROWING] == 1
    for kind, _, lost, duplicated in table:
        assert (lost, duplicated) == (0, 0), kind


def check_recovery(previous: Night | None, stdout: str) -> None:
    """A night after a hooked SIGKILL recovered what it left, and said so."""
    if previous is None or previous.fault not in HOOKED:
        return
    assert previous.code == -signal.SIGKILL, previous
    said = ("removed the unpublished batch" if "staging" in previous.fault else
            "finished publishing batch")
    assert said in stdout, stdout[-2000:]
    previous.note = f"next night: {said}"


def account(nights: list[Night], upstream: Upstream, output: Path) -> tuple[list[tuple[str, int, int, int]],
                                                                           list[str]]:
    """Every (content, model) given to a night against the manifest and the parts.

    Returns the faults table, (kind, count, rows lost, rows duplicated), the rows counted over the
    inputs each fault touched (a stopped night: the files first given to it), and the problems:
    inputs not published exactly once, or whose counts are not the ones delivered.
    """
    entries: dict[tuple[str, str], list[dict]] = {}
    for e in scoring_output.read_manifest(output):
        entries.setdefault((e["sha256"], e["model_id"]), []).append(e)
    first_given: dict[tuple[str, str], Night] = {}
    paths: dict[str, set[str]] = {}  # content → every path it was delivered under
    for n in nights:
        for path, sha in n.given:
            first_given.setdefault((sha, n.model), n)
            paths.setdefault(sha, set()).add(path)
    problems = [f"{pair} was published {len(entries.get(pair, []))} times, not once"
                for pair in first_given if len(entries.get(pair, [])) != 1]
    problems += [f"{pair} was published but never given" for pair in entries if pair not in first_given]
    counts = {kind: [0, 0, 0] for kind in (*SIGNALLED, *HOOKED, *sorted(upstream.events), NEW_MODEL, ALL)}
    for n in nights:
        if n.fault:
            counts[n.fault][0] += 1
    for kind, events in upstream.events.items():
        counts[kind][0] = events
    counts[NEW_MODEL][0], counts[ALL][0] = 1, len(first_given)
    for (sha, model), night in first_given.items():
        deliveries = [upstream.delivered[(path, sha)] for path in sorted(paths[sha])]
        facts = deliveries[0]  # copies hold the same lines; only their kinds differ
        published = entries.get((sha, model), [])
        problems += [f"{sha[:12]} by {model}: the manifest counts {e['rejected']} rejected, not "
                     f"{facts.rejected}" for e in published if e["rejected"] != facts.rejected]
        lost, duplicated = rows_lost_and_duplicated(output, published, facts)
        kinds = set().union(*(d.kinds for d in deliveries)) | {ALL}
        kinds |= {night.fault} if night.fault else set()
        kinds |= {NEW_MODEL} if night.model != nights[0].model else set()
        for kind in kinds:
            counts[kind][1] += lost
            counts[kind][2] += duplicated
    return [(kind, *values) for kind, values in counts.items()], problems


def rows_lost_and_duplicated(output: Path, entries: list[dict], facts: Delivered) -> tuple[int, int]:
    """Of one input's data lines, how many no published part accounts for, and how many it accounts
    for more than once. A line is accounted for by its row (a prediction, or a reject with its row
    number) or, for a file rejected whole, by the count of lines its file reject says were not read."""
    rows: list[int] = []
    unread = 0
    for e in entries:
        for kind in (scoring_output.PREDICTIONS, scoring_output.REJECTS):
            for part in e[kind]:
                rows += pc.drop_null(pq.read_table(output / part, columns=["row"])["row"]).to_pylist()
        unread += unread_lines(e["file_error"]) if e["file_error"] else 0
    if facts.whole:
        return max(0, facts.lines - unread), max(0, unread - facts.lines) + len(rows)
    return facts.lines - len(set(rows) & set(range(1, facts.lines + 1))), len(rows) - len(set(rows))


def format_table(table: list[tuple[str, int, int, int]]) -> list[str]:
    width = max(len(kind) for kind, *_ in table)
    lines = [f"{'fault':<{width}}  {'count':>5}  {'rows lost':>9}  {'rows duplicated':>15}"]
    lines += [f"{kind:<{width}}  {count:>5}  {lost:>9}  {duplicated:>15}"
              for kind, count, lost, duplicated in table]
    return lines
