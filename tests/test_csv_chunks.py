"""The shared chunk parser of Kaggle CSVs (mnist_ray.data.csv_rules): what scoring quarantines, row by row."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import pytest

from mnist_ray.data.csv_files import MAX_LINE_BYTES, LongLine, line_chunks, resolve_csv_paths
from mnist_ray.data.csv_reader import CsvChunks, read_training_csv
from mnist_ray.data.csv_rules import BLANK_LINE, RAW_TEXT_CHARS, parse_chunk, parse_header, truncate_text
from mnist_ray.data.schema import DataValidationError
from tests.helpers import rewrite_csv, set_csv_cell, write_kaggle_csv

PIXELS = [f"pixel{k}" for k in range(784)]


@pytest.fixture(scope="module")
def sample(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    return mnist_arrays["x_test"][:12], mnist_arrays["y_test"][:12]


def chunks_of(path: Path, **options) -> tuple[CsvChunks, dict[str, np.ndarray], list]:
    """Read a whole file the way scoring does: (reader, valid rows concatenated, all rejects)."""
    reader = CsvChunks(str(path), require_label=False, read_id=True, **options)
    parts, rejects = [], []
    for valid, bad in reader:
        parts.append(valid)
        rejects += bad
    keys = parts[0].keys() if parts else ["row"]
    valid = {k: np.concatenate([p[k] for p in parts]) for k in keys} if parts else {"row": np.empty(0)}
    return reader, valid, rejects


def by_row(rejects: list) -> dict[int, object]:
    rows = [r.row for r in rejects]
    assert len(rows) == len(set(rows)), "a row was rejected twice"
    return {r.row: r for r in rejects}


# --- layouts -------------------------------------------------------------------------------------


def test_header_layouts():
    header = ",".join(["ImageId", "label", *PIXELS]).encode()
    layout = parse_header(b"\xef\xbb\xbf" + header + b"\r\n1,2", "f.csv", require_label=False, read_id=True)
    assert layout.has_label and layout.id_column == "ImageId"
    assert [c for c, _, _ in layout.checks()][:2] == ["label", "pixel0"]  # ids are text, not checked numbers
    training = parse_header(header, "f.csv", require_label=True, read_id=False)
    assert training.id_column is None  # training ignores ids
    quoted = ",".join(f'"{c}"' for c in PIXELS).encode()
    assert not parse_header(quoted, "f.csv", require_label=False, read_id=True).has_label


@pytest.mark.parametrize(
    ("first_bytes", "message"),
    [
        (b"", "file is empty"),
        (b"\n\n  \n", "file is empty"),
        (b"\x1f\x8b\x08\x00rest", "gzip-compressed but its name does not end in .gz"),
        (b"label,pixel0\x00\x01", "binary content"),
        (b"\xff\xfelabel,pixel0\n", "not UTF-8"),
        (b"label;" + ";".join(PIXELS).encode(), "missing column(s) pixel0"),
        (",".join(["label", *PIXELS, "pixel3"]).encode(), "duplicated column"),
        (",".join(["colour", *PIXELS]).encode(), "unexpected column(s) 'colour'"),
        (",".join(["ImageId", "id", *PIXELS]).encode(), "has both 'ImageId' and 'id'"),
    ],
    ids=["empty", "blank-lines", "gzip-misnamed", "binary", "not-utf8", "semicolons", "duplicate", "unknown",
         "two-ids"],
)
def test_unreadable_headers(first_bytes, message):
    with pytest.raises(DataValidationError) as info:
        parse_header(first_bytes, "/d/x.csv", require_label=False, read_id=True)
    assert message in str(info.value)
    assert str(info.value).startswith("/d/x.csv")


def test_a_file_separated_by_semicolons_gets_a_hint():
    header = ";".join(["label", *PIXELS]).encode()
    with pytest.raises(DataValidationError, match=r"header has no commas: is the file separated by ';'\?"):
        parse_header(header, "t.csv", require_label=True, read_id=False)


def test_csv_names_match_in_any_case(tmp_path):
    for name in ("a.CSV", "b.Csv.GZ", "c.csv", "notes.txt"):
        (tmp_path / name).write_text("x\n")
    assert [Path(p).name for p in resolve_csv_paths([str(tmp_path)])] == ["a.CSV", "b.Csv.GZ", "c.csv"]


def test_scoring_file_needs_pixels_not_labels():
    layout = parse_header(",".join(PIXELS).encode(), "t.csv", require_label=False, read_id=True)
    assert not layout.has_label and layout.id_column is None
    with pytest.raises(DataValidationError, match="a file to score has 'pixel0'..'pixel783'"):
        parse_header(b"label,pixel0", "t.csv", require_label=False, read_id=True)


# --- valid rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("id_column", [None, "ImageId", "id"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_valid_rows_round_trip(tmp_path, sample, id_column, with_labels):
    images, labels = sample
    path = write_kaggle_csv(tmp_path / "t.csv", images, labels if with_labels else None,
                            id_column=id_column, shuffle_columns=True)
    reader, valid, rejects = chunks_of(path)
    assert rejects == []
    np.testing.assert_array_equal(valid["image"], images)
    assert valid["image"].dtype == np.uint8 and valid["image"].shape == (12, 28, 28)
    np.testing.assert_array_equal(valid["row"], np.arange(1, 13))
    assert ("label" in valid) == with_labels and ("image_id" in valid) == (id_column is not None)
    if with_labels:
        np.testing.assert_array_equal(valid["label"], labels)
    if id_column:
        assert valid["image_id"].tolist() == [str(k) for k in range(1, 13)]  # ids are text
    assert reader.data_lines == 12


def test_parse_chunk_numbers_rows_from_first_line(sample):
    layout = parse_header(",".join(PIXELS).encode(), "t.csv", require_label=False, read_id=True)
    lines = [",".join(map(str, img.reshape(-1).tolist())) for img in sample[0][:3]]
    valid, rejects = parse_chunk(("\n".join(lines)).encode(), layout, first_line=101)  # no final newline
    assert rejects == []
    np.testing.assert_array_equal(valid["row"], [100, 101, 102])  # data row = line - 1
    np.testing.assert_array_equal(valid["image"], sample[0][:3])


def test_quoted_integers_crlf_bom_and_no_final_newline(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "t.csv", *sample)

    def quote_some(rows):
        rows[2][5] = f'"{rows[2][5]}"'
        rows[3][0] = f'"{rows[3][0]}"'

    rewrite_csv(path, quote_some)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n").removesuffix(b"\r\n"))
    _, valid, rejects = chunks_of(path)
    assert rejects == []
    np.testing.assert_array_equal(valid["image"], sample[0])
    np.testing.assert_array_equal(valid["label"], sample[1])


# --- one reject per bad row, with its reason ---------------------------------------------------------


def test_every_kind_of_bad_row_is_rejected_with_its_reason(tmp_path, sample):
    images, labels = sample
    path = write_kaggle_csv(tmp_path / "bad.csv", images, labels)
    set_csv_cell(path, 1, "pixel37", "300")
    set_csv_cell(path, 2, "pixel5", "7.5")
    set_csv_cell(path, 3, "pixel9", "-1")
    set_csv_cell(path, 4, "label", "10")
    set_csv_cell(path, 5, "pixel100", "")
    set_csv_cell(path, 6, "pixel1", "abc")
    set_csv_cell(path, 7, "pixel2", "99999999999999999999999")

    def structure(rows):
        del rows[8][500:]  # too few values
        rows[9].append("0")  # too many
        rows[10] = [""]  # blank line

    rewrite_csv(path, structure)
    _, valid, rejects = chunks_of(path)
    reasons = {row: r.reason for row, r in by_row(rejects).items()}
    assert reasons == {
        1: "pixel37 is 300, outside 0..255",
        2: "pixel5 is '7.5', not an integer",
        3: "pixel9 is -1, outside 0..255",
        4: "label is 10, outside 0..9",
        5: "pixel100 is empty",
        6: "pixel1 is 'abc', not an integer",
        7: "pixel2 is '99999999999999999999999', not a plain integer in range (digits only, at most 18)",
        8: "has 500 values, expected 785 (one per header column; line 9 of the file)",
        9: "has 786 values, expected 785 (one per header column; line 10 of the file)",
        10: BLANK_LINE,
    }
    np.testing.assert_array_equal(valid["row"], [11, 12])
    np.testing.assert_array_equal(valid["image"], images[10:])
    text = path.read_text().split("\n")
    for r in rejects:
        assert r.raw == text[r.row], r.row  # the line itself (row + 1 is its line; header is line 1)


def test_rows_with_several_problems_are_rejected_once(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "bad.csv", *sample)
    set_csv_cell(path, 2, "pixel5", "x")
    set_csv_cell(path, 2, "pixel6", "300")
    set_csv_cell(path, 2, "label", "")
    _, valid, rejects = chunks_of(path)
    # The first problem in checking order (label, then pixel0, pixel1, ...) is the reason.
    assert [(r.row, r.reason) for r in rejects] == [(2, "label is empty")]
    assert len(valid["row"]) == 11


def test_ids_are_any_text_up_to_their_bound(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "ids.csv", sample[0], id_column="ImageId")
    set_csv_cell(path, 3, "ImageId", "-4")
    set_csv_cell(path, 4, "ImageId", " img-0004 ")
    set_csv_cell(path, 5, "ImageId", '"scan 5/ü"')
    set_csv_cell(path, 6, "ImageId", "")
    set_csv_cell(path, 7, "ImageId", "x" * 257)
    _, valid, rejects = chunks_of(path)
    assert {r.row: r.reason for r in rejects} == {
        7: f"ImageId is '{'x' * 56}..., longer than the 256 characters an id may have (257)"
    }
    ids = dict(zip(valid["row"].tolist(), valid["image_id"].tolist(), strict=True))
    assert (ids[3], ids[4], ids[5], ids[6]) == ("-4", "img-0004", "scan 5/ü", "")
    assert ids[1] == "1" and 7 not in ids


def test_odd_lines_keep_row_numbers_exact(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "odd.csv", *sample)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:40] + b"\r" + lines[2][40:]  # a lone CR inside a line
    lines[3] = b"   "  # whitespace only
    lines[4] = lines[4].replace(b",0,", b',"0,0",', 1)  # a quoted comma: one value too few
    lines[5] = lines[5][:30] + b"\xff\xfe" + lines[5][30:]  # not UTF-8
    lines[6] = b"\r"  # a blank CRLF line
    path.write_bytes(b"\n".join(lines))
    _, valid, rejects = chunks_of(path)
    reasons = {row: r.reason for row, r in by_row(rejects).items()}
    assert reasons[2] == "contains a carriage return (\\r) inside the line"
    assert reasons[3].startswith("has 1 values, expected 785")
    assert reasons[4].startswith("has 786 values")  # quotes do not protect a comma inside a pixel
    assert "not an integer" in reasons[5] and "\\xff" in by_row(rejects)[5].raw
    assert reasons[6] == BLANK_LINE
    np.testing.assert_array_equal(valid["row"], [1, 7, 8, 9, 10, 11, 12])
    np.testing.assert_array_equal(valid["image"], sample[0][[0, 6, 7, 8, 9, 10, 11]])


def test_a_line_too_long_is_rejected_unread(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "long.csv", *sample)
    lines = path.read_bytes().split(b"\n")
    lines[3] = b"1," * (MAX_LINE_BYTES // 2 + 10)
    path.write_bytes(b"\n".join(lines))
    reader, valid, rejects = chunks_of(path)
    assert [r.row for r in rejects] == [3]
    assert "longer than" in rejects[0].reason
    assert len(rejects[0].raw) < RAW_TEXT_CHARS + 40
    np.testing.assert_array_equal(valid["row"], [1, 2, *range(4, 13)])
    assert reader.data_lines == 12


# --- streaming: chunks, gzip, digests ----------------------------------------------------------------


def test_rows_are_numbered_across_chunks(tmp_path, mnist_arrays):
    images, labels = mnist_arrays["x_test"][:300], mnist_arrays["y_test"][:300]
    path = write_kaggle_csv(tmp_path / "many.csv", images, labels)
    set_csv_cell(path, 123, "pixel400", "256")
    set_csv_cell(path, 250, "label", "11")
    reader = CsvChunks(str(path), require_label=False, read_id=True, chunk_bytes=50_000)
    parts = list(reader)
    assert len(parts) > 5
    rows = np.concatenate([valid["row"] for valid, _ in parts])
    rejected = sorted(r.row for _, bad in parts for r in bad)
    assert rejected == [123, 250]
    np.testing.assert_array_equal(np.sort(np.concatenate([rows, rejected])), np.arange(1, 301))
    kept = np.concatenate([valid["image"] for valid, _ in parts])
    np.testing.assert_array_equal(kept, np.delete(images, [122, 249], axis=0))
    assert reader.data_lines == 300 and reader.read_to_end
    data = path.read_bytes()
    assert (reader.size, reader.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_gzip_stream_digest_is_of_the_compressed_file(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "t.csv.gz", *sample, gz=True)
    reader, valid, rejects = chunks_of(path)
    assert len(valid["row"]) == 12 and rejects == []
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_concatenated_gzip_members_are_one_file(tmp_path, sample):
    plain = write_kaggle_csv(tmp_path / "t.csv", *sample).read_bytes()
    cut = plain.index(b"\n", len(plain) // 2) + 1
    path = tmp_path / "two.csv.gz"
    path.write_bytes(gzip.compress(plain[:cut]) + gzip.compress(plain[cut:]))
    _, valid, rejects = chunks_of(path)
    assert rejects == [] and len(valid["row"]) == 12


@pytest.mark.parametrize("chunk_bytes", [20_000, None], ids=["small-chunks", "default-chunks"])
def test_truncated_gzip_keeps_every_whole_line_before_the_damage(tmp_path, mnist_arrays, chunk_bytes):
    images = mnist_arrays["x_test"][:200]
    data = write_kaggle_csv(tmp_path / "t.csv.gz", images, gz=True).read_bytes()
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    readable = zlib.decompressobj(wbits=31).decompress(path.read_bytes())
    whole_rows = readable.count(b"\n") - 1  # the header is a line too
    options = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
    reader = CsvChunks(str(path), require_label=False, read_id=True, **options)
    parts = []
    with pytest.raises(DataValidationError, match="truncated"):
        for valid, _ in reader:
            parts.append(valid)
    assert 0 < whole_rows < 200
    assert np.concatenate([p["row"] for p in parts]).tolist() == list(range(1, whole_rows + 1))
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), images[:whole_rows])
    assert reader.data_lines == whole_rows


def test_corrupt_gzip_is_a_file_problem(tmp_path, sample):
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 100)
    with pytest.raises(DataValidationError, match="gzip"):
        list(CsvChunks(str(path), require_label=False, read_id=True))


def test_line_chunks_are_whole_lines_of_bounded_size():
    lines = [f"{i}," * (i % 7 + 1) for i in range(2000)]
    data = "\n".join(lines).encode() + b"\n"
    blocks = (data[i : i + 333] for i in range(0, len(data), 333))
    pieces = list(line_chunks(blocks, chunk_bytes=1000))
    assert b"".join(p for _, p in pieces) == data
    assert all(p.endswith(b"\n") and len(p) < 1000 + 333 for _, p in pieces)
    starts = [line for line, _ in pieces]
    assert starts[0] == 1
    assert starts[1:] == [1 + sum(p.count(b"\n") for _, p in pieces[:k]) for k in range(1, len(pieces))]


def test_line_chunks_isolate_a_long_line():
    long = b"9" * (MAX_LINE_BYTES + 10_000)  # still unfinished after MAX_LINE_BYTES: cut short
    data = b"a\nb\n" + long + b"\nc\n"
    blocks = (data[i : i + 4096] for i in range(0, len(data), 4096))
    pieces = list(line_chunks(blocks, chunk_bytes=1 << 30))
    assert [(line, type(p).__name__) for line, p in pieces] == [(1, "bytes"), (3, "LongLine"), (4, "bytes")]
    assert pieces[0][1] == b"a\nb\n" and pieces[2][1] == b"c\n"
    assert isinstance(pieces[1][1], LongLine) and pieces[1][1].line == 3


def test_truncate_text():
    assert truncate_text(b"1,2,3") == "1,2,3"
    long = truncate_text(b"7" * (RAW_TEXT_CHARS + 10))
    assert long.startswith("7" * RAW_TEXT_CHARS) and long.endswith(f"[{RAW_TEXT_CHARS + 10:,} bytes in all]")


# --- training uses the same parser -------------------------------------------------------------------


def test_training_skips_blank_lines_and_numbers_rows_by_line(tmp_path, sample):
    path = write_kaggle_csv(tmp_path / "t.csv", *sample)
    lines = path.read_text().split("\n")
    lines.insert(3, "")  # between data rows 2 and 3
    path.write_text("\n".join(lines) + "\n")
    out = read_training_csv(str(path))
    np.testing.assert_array_equal(out["image"], sample[0])
    np.testing.assert_array_equal(out["row"], [1, 2, *range(4, 14)])
    cells = lines[6].split(",")  # line 7: data row 6
    cells[1] = "x"  # pixel0
    lines[6] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match="data row 6, column 'pixel0'"):
        read_training_csv(str(path))
