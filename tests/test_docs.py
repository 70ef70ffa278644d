"""The documentation stays true: its links resolve, and every job's flag table matches the job's parser.

Fast: reads Markdown and builds the argparse parsers (mnist_ray.cli imports no Ray, no TensorFlow).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mnist_ray import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
         REPO / "benchmarks" / "README.md", REPO / "cluster" / "README.md"]
# A page with two jobs lists both jobs' flags in its tables (no flag may be in both parsers).
FLAG_TABLES = {
    "docs/training.md": cli.train_parser,
    "docs/tuning.md": cli.tune_parser,
    "docs/scoring.md": (cli.score_parser, cli.audit_parser),
    "docs/reports.md": cli.report_parser,
    "docs/onnx.md": cli.export_onnx_parser,
    "docs/serving.md": cli.serve_parser,
    "docs/lifecycle.md": cli.promote_parser,
}
README_MAX_LINES = 260

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TABLE_HEADER = re.compile(r"^\| (flag|argument) \| default \| meaning \|$")
NUMBERS = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?( -?\d+(\.\d+)?([eE][-+]?\d+)?)*")
WORD = re.compile(r"`([\w.-]+)`")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = anchor = slug(match.group(1))
            n = 0
            while anchor in found:  # GitHub numbers repeated headings: x, x-1, x-2
                n += 1
                anchor = f"{base}-{n}"
            found.add(anchor)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def parser_entries(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """What a flag table lists: long options (``--x / --no-x`` as one entry) and positional arguments."""
    entries = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        longs = [option for option in action.option_strings if option.startswith("--")]
        entries[" / ".join(longs) if longs else action.metavar or action.dest] = action
    return entries


def doc_entries(page: str) -> dict[str, str]:
    """The rows of the page's flag tables: entry (``--x``, ``--x / --no-x``, ``NAME``) → default cell."""
    rows, in_table = {}, False
    for line in (REPO / page).read_text().splitlines():
        if TABLE_HEADER.match(line):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("| ---"):
            first, default = [cell.strip() for cell in line.strip("|").split(" | ")][:2]
            names = [code.split()[0] for code in re.findall(r"`([^`]+)`", first)]
            rows[" / ".join(names)] = default
    return rows


def documented_value(cell: str) -> list | None:
    """The plain value a default cell names (numbers, ``on``/``off``, one word in backticks), else None."""
    if NUMBERS.fullmatch(cell):
        return [float(number) for number in cell.split()]
    if cell in ("on", "off"):
        return [cell == "on"]
    if match := WORD.fullmatch(cell):
        return [match.group(1)]
    return None


def same(documented: list, default) -> bool:
    actual = default if isinstance(default, list) else [default]
    if documented and isinstance(documented[0], float):
        return all(isinstance(a, (int, float)) for a in actual) and [float(a) for a in actual] == documented
    return actual == documented


@pytest.mark.parametrize("page", FLAG_TABLES)
def test_flag_tables_match_the_parsers(page):
    parsers = FLAG_TABLES[page] if isinstance(FLAG_TABLES[page], tuple) else (FLAG_TABLES[page],)
    entries = [parser_entries(parser()) for parser in parsers]
    shared = set.intersection(*(set(e) for e in entries)) if len(entries) > 1 else set()
    assert not shared, f"{page}: {sorted(shared)} in more than one of its parsers: give each its own page"
    documented, actual = doc_entries(page), {k: v for e in entries for k, v in e.items()}
    missing, extra = sorted(actual.keys() - documented.keys()), sorted(documented.keys() - actual.keys())
    assert not missing and not extra, f"{page}: missing from the flag table {missing}; not the job's {extra}"
    wrong = []
    for entry, cell in documented.items():
        value, default = documented_value(cell), actual[entry].default
        if value is not None and not same(value, default):
            wrong.append(f"{entry}: the table says {cell!r}, the parser {default!r}")
    assert not wrong, f"{page}: " + "; ".join(wrong)


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the depth into docs/"
