"""The output audit (jobs/audit.py): a clean output audits clean; every damage is one precise line.

The outputs are real: small CSV files scored by the scoring job in this process (``--executor
local``, no Ray) over two nights, with a rerun that replaces parts, a file with bad rows and one
rejected whole. Each test damages a copy as an incident would (a part deleted, truncated or
copied, rows duplicated, a marker lost, a job killed mid-batch) and checks the audit's lines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnist_ray.cli import audit_main
from mnist_ray.errors import InputError
from mnist_ray.score import output as scoring_output
from mnist_ray.score.audit import audit, expected_rows
from tests.helpers import (
    KILL_BEFORE_PUBLISHING,
    KILL_WHILE_PUBLISHING,
    REPO,
    append_column,
    rewrite_csv,
    score,
    score_and_die,
    set_csv_cell,
    write_kaggle_csv,
)

NIGHT_1, NIGHT_2 = "2026-11-20", "2026-11-21"


@pytest.fixture(scope="module")
def incoming(tmp_path_factory, mnist_arrays) -> Path:
    """Four inputs: good (20 rows), two bad rows of 12, rejected whole (3 lines unread), header only."""
    root = tmp_path_factory.mktemp("incoming")
    x, y = mnist_arrays["x_test"], mnist_arrays["y_test"]
    write_kaggle_csv(root / "good.csv", x[:20], y[:20])
    write_kaggle_csv(root / "bad_rows.csv", x[20:32], y[20:32])
    set_csv_cell(root / "bad_rows.csv", 2, "pixel7", "300")
    set_csv_cell(root / "bad_rows.csv", 5, "label", "x")
    rewrite_csv(write_kaggle_csv(root / "unknown_column.csv", x[:3], y[:3]), append_column("colour", "1"))
    write_kaggle_csv(root / "header_only.csv", x[:0], y[:0])
    write_kaggle_csv(root / "later.csv", x[40:55], y[40:55])
    return root


def run(tiny_run: Path, output: Path, date: str, *inputs: Path, force: bool = False) -> int:
    code, stdout = score("--model", str(tiny_run), "--input", *map(str, inputs), "--output", str(output),
                         "--date", date, "--executor", "local", *(["--force"] if force else []))
    assert code in (0, 3), stdout
    return code


@pytest.fixture(scope="module")
def scored(tiny_run, incoming, tmp_path_factory) -> Path:
    """Two nights on one output: night 1 scores four inputs; a forced rerun of good.csv in night 1's
    partition replaces its parts; night 2 scores a new input."""
    output = tmp_path_factory.mktemp("audit") / "out"
    run(tiny_run, output, NIGHT_1, *(incoming / n for n in ("good.csv", "bad_rows.csv", "unknown_column.csv",
                                                           "header_only.csv")))
    run(tiny_run, output, NIGHT_1, incoming / "good.csv", force=True)
    run(tiny_run, output, NIGHT_2, incoming / "later.csv")
    return output


@pytest.fixture
def output(scored, tmp_path) -> Path:
    """A copy of the scored output to damage."""
    shutil.copytree(scored, tmp_path / "out")
    return tmp_path / "out"


def entry_of(output: Path, name: str) -> dict:
    """The live (latest) manifest entry of the input called ``name``."""
    return [e for e in scoring_output.read_manifest(output) if Path(e["path"]).name == name][-1]


def line_of(output: Path, entry: dict) -> int:
    """The manifest line number (from 1) of ``entry``."""
    return scoring_output.read_manifest(output).index(entry) + 1


def test_a_clean_output_audits_clean_and_its_counts_follow_the_rule(scored, incoming):
    assert audit(scored) == []
    # The rule the audit checks, on the entries this output really has.
    assert expected_rows(entry_of(scored, "good.csv")) == (20, 0, 0)
    assert expected_rows(entry_of(scored, "bad_rows.csv")) == (10, 2, 0)
    unknown = entry_of(scored, "unknown_column.csv")
    assert (unknown["status"], unknown["rejected"]) == ("rejected", 3)
    assert expected_rows(unknown) == (0, 0, 1)  # three lines unread: one row-less reject for the file
    assert expected_rows(entry_of(scored, "header_only.csv")) == (0, 0, 0)
    first, rerun = [e for e in scoring_output.read_manifest(scored) if Path(e["path"]).name == "good.csv"]
    assert rerun["replaces"] == [first["batch_id"]]


def test_a_deleted_part_is_reported_with_the_command_that_restores_it(output):
    entry = entry_of(output, "bad_rows.csv")
    (part,) = entry["predictions"]
    (output / part).unlink()
    (line,) = audit(output)
    assert line.startswith(f"{part} is missing: _manifest.jsonl line {line_of(output, entry)} names it for "
                           f"{entry['path']} "
                           f"(batch {entry['batch_id']}"), line
    assert f"jobs/score.py --input {entry['path']} --date {NIGHT_1} --force" in line


def test_a_stray_part_is_reported(output):
    (part,) = entry_of(output, "later.csv")["predictions"]
    stray = Path(part).with_name("part-copied-by-hand.parquet").as_posix()
    shutil.copy(output / part, output / stray)
    assert audit(output) == [f"{stray}: no manifest entry names it, yet readers of predictions/ see its "
                             "rows: move it out of the output directory"]


def test_a_replaced_part_left_on_disk_is_reported(output, scored):
    first, rerun = [e for e in scoring_output.read_manifest(scored) if Path(e["path"]).name == "good.csv"]
    (old,) = first["predictions"]
    assert not (output / old).exists()  # the rerun deleted it; bring it back as a failed delete leaves it
    shutil.copy(output / rerun["predictions"][0], output / old)
    (line,) = audit(output)
    assert line.startswith(f"{old}: a part of {first['path']} (batch {first['batch_id']}") and (
        f"which batch {rerun['batch_id']} replaced" in line and "delete it" in line), line


def test_rows_copied_into_another_inputs_part_are_reported_as_duplicates(output):
    good, bad = entry_of(output, "good.csv"), entry_of(output, "bad_rows.csv")
    (good_part,), (bad_part,) = good["predictions"], bad["predictions"]
    copied = pq.read_table(output / good_part).slice(0, 3)
    pq.write_table(pa.concat_tables([pq.read_table(output / bad_part), copied]), output / bad_part)
    problems = audit(output)
    assert len(problems) == 3, problems
    foreign, counts, duplicated = problems
    assert foreign.startswith(f"{bad_part} holds 3 rows of {good['path']} by {good['model_id']}, not only of "
                              f"{bad['path']}"), foreign
    assert counts.startswith(f"{bad['path']} (batch {bad['batch_id']}") and (
        "its parts hold 13 predictions" in counts and "the manifest says 10" in counts), counts
    assert duplicated == (
        f"3 row(s) of {good['path']} (rows 1, 2, 3) appear more than once for model {good['model_id']} in "
        f"date={NIGHT_1}: in {', '.join(sorted([good_part, bad_part]))}; readers count them twice: keep one "
        "part's copy")


def test_rows_repeated_within_a_part_are_reported(output):
    entry = entry_of(output, "later.csv")
    (part,) = entry["predictions"]
    table = pq.read_table(output / part)
    pq.write_table(pa.concat_tables([table, table.slice(6, 8)]), output / part)
    counts, duplicated = audit(output)
    assert "its parts hold 23 predictions" in counts and "the manifest says 15" in counts, counts
    assert duplicated.startswith(f"8 row(s) of {entry['path']} (rows 7, 8, 9, 10, 11 and 3 more) appear more "
                                 f"than once for model {entry['model_id']} in date={NIGHT_2}: in {part};")


def test_a_truncated_part_is_reported_whether_cut_short_or_rewritten_short(output):
    bad = entry_of(output, "bad_rows.csv")
    (part,) = bad["rejects"]
    data = (output / part).read_bytes()
    (output / part).write_bytes(data[: len(data) // 2])
    (line,) = audit(output)
    assert line.startswith(f"{part} is not a readable Parquet file (") and bad["path"] in line, line

    (output / part).write_bytes(data)
    later = entry_of(output, "later.csv")
    (short,) = later["predictions"]
    pq.write_table(pq.read_table(output / short).slice(0, 9), output / short)
    (line,) = audit(output)
    assert line.startswith(f"{later['path']} (batch {later['batch_id']}") and (
        "its parts hold 9 predictions and 0 + 0 rejects" in line and "the manifest says 15 and 0 + 0" in line)


def test_a_lost_success_marker_or_summary_is_reported(output):
    later = entry_of(output, "later.csv")["batch_id"]
    (output / "batches" / later / "_SUCCESS").unlink()
    assert audit(output) == [
        f"batches/{later}/_SUCCESS is missing, but the manifest lists 1 input(s) of batch {later}: readers "
        "of batches/ take it as unfinished; if its summary is complete, create the _SUCCESS file"]
    (output / "batches" / later / "_SUCCESS").touch()
    (output / "batches" / later / "summary.json").unlink()
    (line,) = audit(output)
    assert line.startswith(f"batches/{later} has _SUCCESS but no summary.json"), line


def test_a_damaged_manifest_line_is_reported(output):
    number = line_of(output, entry := entry_of(output, "bad_rows.csv"))
    lines = (output / "_manifest.jsonl").read_text().splitlines()
    lines[number - 1] = lines[number - 1][:40]
    (output / "_manifest.jsonl").write_text("\n".join(lines) + "\n")
    problems = audit(output)
    assert problems[0].startswith(f"_manifest.jsonl line {number} is not JSON"), problems
    # Its parts are now named by nothing: said too, since readers still see their rows.
    assert problems[1:] == [f"{part}: no manifest entry names it, yet readers of {part.split('/')[0]}/ see "
                            "its rows: move it out of the output directory"
                            for part in sorted(entry["predictions"] + entry["rejects"])]


@pytest.mark.slow  # two jobs run as processes
def test_killed_jobs_leave_staging_or_a_journal_the_audit_reports_and_the_next_run_clears(
    output, tiny_run, incoming, tmp_path, mnist_arrays
):
    x, y = mnist_arrays["x_test"][60:70], mnist_arrays["y_test"][60:70]
    fresh = write_kaggle_csv(tmp_path / "fresh.csv", x, y)
    args = ["--model", str(tiny_run), "--input", str(fresh), str(incoming / "bad_rows.csv"), "--output",
            str(output), "--date", NIGHT_2, "--executor", "local", "--force"]
    killed = score_and_die(KILL_BEFORE_PUBLISHING, args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (staged,) = (output / "_staging").iterdir()
    assert audit(output) == [f"_staging/{staged.name}: an unpublished batch (no _PUBLISH.json): nothing of "
                             "it is visible; the next scoring run removes it and scores its inputs again"]

    killed = score_and_die(KILL_WHILE_PUBLISHING, args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (half,) = (output / "_staging").iterdir()
    # Half its parts are in place and the manifest does not name them yet: the audit says what the
    # next run does, not "missing" and "stray" parts that the journal accounts for.
    assert audit(output) == [f"_staging/{half.name}: a batch committed but not fully published (its "
                             "_PUBLISH.json is there): the next scoring run finishes publishing it"]
    assert not (output / "batches" / half.name).exists()  # its summary and _SUCCESS come last
    # A journal applied that far but hand-damaged since is still audited as the next run will leave it.
    journal = json.loads((half / "_PUBLISH.json").read_text())
    moved = next(p for p in journal["moves"] if p.startswith("predictions/") and (output / p).exists())
    (output / moved).unlink()
    journal_line, missing = audit(output)
    assert missing.startswith(f"{moved} is missing: the journal of batch {half.name} names it"), missing

    run(tiny_run, output, NIGHT_2, fresh, incoming / "bad_rows.csv", force=True)
    problems = audit(output)  # recovery finished the batch without the deleted part; the rerun replaced it
    assert problems == [], problems


def test_a_running_job_is_the_only_line(output):
    with scoring_output.locked(output):
        (line,) = audit(output)
    assert line.endswith("holds _lock, so the output is changing: audit it once that job has ended"), line
    assert audit(output) == []


def test_the_command_exits_0_1_2_with_a_line_per_problem(scored, output, tmp_path, capsys):
    assert audit_main([str(scored)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == f"{scored}: consistent (6 manifest entries, 3 batches)\n"

    (part,) = entry_of(output, "later.csv")["predictions"]
    (output / part).unlink()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "audit.py"), str(output)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == audit(output) and len(result.stdout.splitlines()) == 1
    assert result.stderr == f"{output}: 1 problem(s)\n"

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        audit_main(["--no-such-flag"])
    capsys.readouterr()
    assert audit_main([str(tmp_path / "empty")]) == 2
    assert "is not a scoring output directory" in capsys.readouterr().err
    with pytest.raises(InputError, match="no such directory"):
        audit(tmp_path / "nowhere")
