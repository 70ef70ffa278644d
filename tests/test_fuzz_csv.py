"""Fuzzing the input edge: generated hostile CSV files through the code each Ray Data read task runs.

Hypothesis writes files mixing valid rows with every kind of damage (truncated rows, extra
values, empty fields, text, huge numbers, negatives, floats, quotes, unicode, BOMs, CRLF
and lone CRs, blank lines, repeated headers) and checks, in-process and without Ray, that
``scoring.file_records`` accounts for every data line exactly once: scored or rejected with a
reason, never both, never neither, rows numbered exactly 1..N, and never an exception. Which
lines are valid is decided by ``expected_row``, a reference validator that shares no code
with the reader. One real scoring job then runs over a directory of such files on the
session's Ray, to show the same holds end to end and that hostile file names stay inputs.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_ray.data.csv_reader import CsvChunks
from mnist_ray.data.csv_rules import BINARY_SNIFF_BYTES, MAX_ID_CHARS
from mnist_ray.score.records import END_OF_FILE, IMAGE_ROW, REJECTED_FILE, REJECTED_ROW, file_records
from tests.helpers import score

PIXELS = [f"pixel{k}" for k in range(784)]
HEADERS = {
    "pixels": PIXELS,
    "label": ["label", *PIXELS],
    "id_label": ["ImageId", "label", *PIXELS],
    "shuffled": [*PIXELS[:300], "label", *PIXELS[300:600], "id", *PIXELS[600:]],
}
RANGES = {"label": (0, 9)}  # pixels: 0..255
ID_COLUMNS = ("ImageId", "id")  # any text up to MAX_ID_CHARS characters
# Values a column may hold instead of a good one: each breaks the contract or only looks like it might.
HOSTILE_VALUES = [
    "", "-1", "256", "300", "10", "7.0", "7.5", "1e3", "abc", "NaN", "inf", "null", "0x1f", " 12", "12 ",
    "\t5", "+5", "-0", "007", "--5", "5-", "-", '"12"', '" 12"', '"1,2"', '""', '"', 'x"5"',
    "1000000000000000000", "99999999999999999999", "9223372036854775808", "-9223372036854775809",
    "\u22125", "\u0663", "\uff15", "\ufeff5", "é", "\U0001f642", "1\r2", "label", "pixel0",
]
# Deterministic and database-less: the same cases on every machine and in CI.
FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the reference validator -------------------------------------------------------------------


def expected_row(line: bytes, header: list[str]) -> list[int] | None:
    """The values of a data line (without its ``\\n``) if the contract accepts it, else None.

    The documented rules, written independently of mnist_ray.data.csv_rules: one CRLF end allowed;
    no byte-order mark at its start; one value per header column; a value, optionally in double
    quotes, with spaces or tabs around it allowed, is ``-?`` and 1..18 digits: label 0..9,
    pixels 0..255; an id is any text of at most 256 characters.
    """
    line = line.removesuffix(b"\r")
    if not line or b"\r" in line or line.startswith("\ufeff".encode()):
        return None
    fields = line.split(b",")
    if len(fields) != len(header):
        return None
    values = []
    for name, field in zip(header, fields, strict=True):
        quoted = re.fullmatch(rb'"([^",]*)"', field)
        text = (quoted.group(1) if quoted else field).strip(b" \t")
        if name in ID_COLUMNS:
            if len(text.decode("utf-8", "backslashreplace")) > MAX_ID_CHARS:
                return None
            values.append(text)
            continue
        if not re.fullmatch(rb"-?[0-9]{1,18}", text):
            return None
        value = int(text)
        low, high = RANGES.get(name, (0, 255))
        if value < low or (high is not None and value > high):
            return None
        values.append(value)
    return values


def data_lines(content: bytes) -> list[bytes]:
    """The physical lines after the header (a final ``\\n`` ends the last line, it starts none),
    but the blank ones that end the file: as pandas and Spark read it, those are no rows."""
    lines = content.split(b"\n")[1:]
    lines = lines[:-1] if lines and lines[-1] == b"" else lines
    while lines and lines[-1] in (b"", b"\r"):
        lines.pop()
    return lines


# --- generated files -----------------------------------------------------------------------------


def good_values(header: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    values = []
    for name in header:
        if name in ID_COLUMNS:
            values.append(f"img-{rng.integers(10**6)}")
            continue
        low, high = RANGES.get(name, (0, 255))
        values.append(str(int(rng.integers(low, high + 1))))
    return values


@st.composite
def hostile_line(draw, header: list[str]) -> str:
    """One line (without its end): valid, damaged in one of many ways, or arbitrary text."""
    values = good_values(header, draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(
        ["valid", "valid", "valid", "bad values", "truncated", "cut mid-line", "extra values", "blank",
         "spaces", "header again", "bom", "text", "quoted"]
    ))
    columns = st.integers(0, len(header) - 1)
    if kind == "bad values":
        for _ in range(draw(st.integers(1, 3))):
            values[draw(columns)] = draw(st.sampled_from(HOSTILE_VALUES) | st.text(max_size=8))
    elif kind == "truncated":
        values = values[: draw(columns)]
    elif kind == "extra values":
        values += draw(st.lists(st.sampled_from(["0", "", "x", "255"]), min_size=1, max_size=3))
    elif kind == "quoted":
        for k in draw(st.lists(columns, max_size=5)):
            values[k] = f'"{values[k]}"'
    line = ",".join(values)
    if kind == "cut mid-line":
        return line[: draw(st.integers(0, len(line) - 1))]
    return {
        "blank": "", "spaces": draw(st.sampled_from([" ", "\t", " , "])), "header again": ",".join(header),
        "bom": "\ufeff" + line, "text": draw(st.text(max_size=40)),
    }.get(kind, line)


@st.composite
def hostile_file(draw) -> tuple[bytes, list[str]]:
    """(file bytes, header): a valid header, then lines joined by LF, CRLF or a mixture."""
    header = HEADERS[draw(st.sampled_from(sorted(HEADERS)))]
    lines = draw(st.lists(hostile_line(header), max_size=12))
    ends = draw(st.sampled_from(["\n", "\r\n", "mixed"]))
    text = ",".join(header)
    for line in lines:
        text += (draw(st.sampled_from(["\n", "\r\n"])) if ends == "mixed" else ends) + line
    if lines and draw(st.booleans()):
        text += "\n"  # else the last line has no end
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + text).encode("utf-8", "surrogatepass"), header


def concatenated(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}


# --- properties (no Ray) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(case=hostile_file())
def test_every_data_line_is_scored_or_rejected_exactly_once(scratch, case):
    content, header = case
    path = scratch / "fuzz.csv"
    path.write_bytes(content)
    records = concatenated(list(file_records(str(path), 3)))  # raising here fails the test
    kind, rows = records["kind"], records["row"]
    assert (records["file"] == 3).all()
    assert (kind == END_OF_FILE).sum() == 1 and kind[-1] == END_OF_FILE
    lines = data_lines(content)
    if b"\x00" in content[:BINARY_SNIFF_BYTES]:  # a NUL early on: the file is binary, refused whole
        assert kind.tolist() == [REJECTED_FILE, END_OF_FILE] and "binary" in records["reason"][0]
        return
    if not lines:  # a header and nothing else (blank lines aside): a valid, empty file
        assert kind.tolist() == [END_OF_FILE] and rows[-1] == 0
        return
    assert REJECTED_FILE not in kind, records["reason"][kind == REJECTED_FILE]
    scored, rejected = rows[kind == IMAGE_ROW], rows[kind == REJECTED_ROW]
    assert rows[-1] == len(lines)
    # Exactly 1..N, each once: none twice (in either list or both), none missing.
    assert sorted([*scored.tolist(), *rejected.tolist()]) == list(range(1, len(lines) + 1))
    assert all(reason.strip() for reason in records["reason"][kind == REJECTED_ROW])
    expected = {row: expected_row(line, header) for row, line in enumerate(lines, start=1)}
    assert sorted(scored.tolist()) == [row for row, values in expected.items() if values is not None]
    pixels = [header.index(name) for name in PIXELS]
    for row, image in zip(scored.tolist(), records["image"][kind == IMAGE_ROW], strict=True):
        assert image.reshape(-1).tolist() == [expected[row][k] for k in pixels], f"row {row}"


@settings(FUZZ, max_examples=40)  # many tiny chunks: the slower property
@given(case=hostile_file(), chunk_bytes=st.integers(1, 20_000))
def test_the_outcome_of_a_row_does_not_depend_on_its_chunk(scratch, case, chunk_bytes):
    """Read in chunks of any size, a row is accepted or refused for itself alone."""
    content, header = case
    lines = data_lines(content)
    if not lines or b"\x00" in content[:BINARY_SNIFF_BYTES]:
        return
    path = scratch / "chunks.csv"
    path.write_bytes(content)
    reader = CsvChunks(str(path), require_label=False, read_id=True, chunk_bytes=chunk_bytes)
    scored, rejected = [], []
    for valid, rejects in reader:
        scored += valid["row"].tolist()
        rejected += [r.row for r in rejects]
    assert reader.data_lines == len(lines)
    assert sorted(scored + rejected) == list(range(1, len(lines) + 1))
    expected = [row for row, line in enumerate(lines, start=1) if expected_row(line, header) is not None]
    assert sorted(scored) == expected


# --- one real scoring job over hostile files with hostile names (the session's Ray) ---------------

# File names a nightly drop could hold: none may steer where output is written.
HOSTILE_NAMES = [
    "..csv", "a..b.csv", "-rf.csv", "..%2F..%2Fescape.csv", "\\..\\..\\windows.csv", " spaced .csv",
    "日本語 ünïcödé.csv", "x" * 240 + ".csv",
]


def catalogue_lines(header: list[str]) -> list[str]:
    """Every kind of line the fuzzer draws from, once each, deterministically, between good rows."""
    good = [",".join(good_values(header, seed)) for seed in range(3)]
    lines = [good[0]]
    for k, value in enumerate(HOSTILE_VALUES):
        values = good_values(header, 100 + k)
        values[k % len(header)] = value
        lines.append(",".join(values))
    lines += [
        "", " ", ",".join(header), "\ufeff" + good[1], good[1][:50], good[1] + ",0",
        ",".join(f'"{v}"' for v in good[2].split(",")), good[2],
    ]
    return lines


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_scoring_job_over_hostile_files_accounts_for_every_row(ray_session, tiny_run, tmp_path, executor):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    expected: dict[str, tuple[list[bytes], list[str]]] = {}  # path → (data lines, header)
    for k, name in enumerate([*HOSTILE_NAMES, "compressed.csv.gz"]):
        header = HEADERS[sorted(HEADERS)[k % len(HEADERS)]]
        end = "\r\n" if k % 2 else "\n"
        # A last good row of its own: identical files would be scored once (an input is its content).
        lines = [*catalogue_lines(header), ",".join(good_values(header, 1000 + k))]
        text = ("\ufeff" if k % 3 == 0 else "") + end.join([",".join(header), *lines])
        content = text.encode()
        if name.endswith(".gz"):  # a file read through gunzip too
            (inputs / name).write_bytes(gzip.compress(content))
        else:
            (inputs / name).write_bytes(content)
        expected[str(inputs / name)] = (data_lines(content), header)
    header_only = inputs / "header only.csv"
    header_only.write_text(",".join(PIXELS) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    code, stdout = score("--model", str(tiny_run), "--input", str(inputs), "--output", str(output),
                         "--date", "2026-11-22", "--batch-size", "64", "--executor", executor)

    assert code == 3, stdout  # rows were rejected: the documented exit code, not a crash
    # Output names never come from input names: nothing beside the output, nothing named after an input.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, output.name])
    for written in output.rglob("*"):
        assert written.resolve().is_relative_to(output.resolve()), written
        assert not set(written.relative_to(output).parts) & {*HOSTILE_NAMES, header_only.name}, written
    summary = json.loads(next((output / "batches").glob("*/summary.json")).read_text())
    files = {f["path"]: f for f in summary["inputs"]}
    assert set(files) == {*expected, str(header_only)}
    assert (files[str(header_only)]["rows_in"], files[str(header_only)]["status"]) == (0, "empty")
    scored, rejected = pd.read_parquet(output / "predictions"), pd.read_parquet(output / "rejects")
    for path, (lines, header) in expected.items():
        valid = [row for row, line in enumerate(lines, 1) if expected_row(line, header) is not None]
        scored_rows = sorted(scored.loc[scored["source"] == path, "row"].tolist())
        rejected_rows = sorted(rejected.loc[rejected["source"] == path, "row"].tolist())
        assert scored_rows == valid, path
        assert sorted(scored_rows + rejected_rows) == list(range(1, len(lines) + 1)), path
        counts = (files[path]["rows_in"], files[path]["scored"], files[path]["rejected"])
        assert counts == (len(lines), len(valid), len(lines) - len(valid)), path
    assert rejected["reason"].str.strip().str.len().gt(0).all()
    total, lines_in = summary["total"], sum(len(lines) for lines, _ in expected.values())
    assert total["rows_in"] == total["scored"] + total["rejected"] == lines_in


# --- the cases the fuzzer found, kept as plain examples ----------------------------------------------

GOOD = ",".join(["0"] * 784)


@pytest.mark.parametrize("last_line", ["1\r2", "\ufeff" + GOOD])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
def test_an_unparseable_last_line_without_an_end_is_rejected_not_a_crash(scratch, last_line, chunk_bytes):
    path = scratch / "last.csv"
    path.write_bytes(f"{','.join(PIXELS)}\n{GOOD}\n{last_line}".encode())  # was a RuntimeError
    reader = CsvChunks(str(path), require_label=False, read_id=True, chunk_bytes=chunk_bytes)
    outcome = [(valid["row"].tolist(), [r.row for r in rejects]) for valid, rejects in reader]
    assert sorted(row for valid, _ in outcome for row in valid) == [1]
    assert sorted(row for _, rejected in outcome for row in rejected) == [2]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(" 12", True), ("12 ", True), ("\t5", True), ("0x10", False), ("1000000000000000000", False)],
)
def test_values_pyarrow_alone_would_take_follow_the_rules_in_any_company(scratch, value, accepted):
    header = HEADERS["id_label"]
    values = good_values(header, 0)
    values[5] = value  # pixel3
    path = scratch / "alone.csv"
    path.write_text(",".join(header) + "\n" + ",".join(values) + "\n")  # alone in its chunk
    records = concatenated(list(file_records(str(path), 0)))
    expected = IMAGE_ROW if accepted else REJECTED_ROW
    assert records["kind"].tolist() == [expected, END_OF_FILE], value
    if accepted:  # without the spaces around it
        assert records["image"][0].reshape(-1)[3] == int(value)
