"""A report page written twice from the same blocks: ``report.html`` and ``report.md``.

The HTML embeds its pictures as base64 PNGs and needs nothing else (no network,
no scripts), so it opens from disk and can be mailed or attached as one file.
The Markdown, for terminals and code review, links the same pictures as files
under ``report/``.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from matplotlib.figure import Figure

from mnist_ray.artifacts import REPORT_FIGURES, REPORT_HTML, REPORT_MD
from mnist_ray.reports.figures import png_bytes

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #24292f; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #eaeef2; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #57606a; font-size: .9em; }
.flag { background: #ffebe9; border: 1px solid #ff8182; padding: .6em .9em; border-radius: 6px; }
.ok { background: #dafbe1; border: 1px solid #4ac26b; padding: .6em .9em; border-radius: 6px; }
.note { color: #57606a; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 4px; }
"""


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("%", "").replace("-", "").strip().isdigit()


class Page:
    """Headings, paragraphs, tables and figures, in order; ``write`` renders both files."""

    def __init__(self, directory: Path, title: str) -> None:
        self.directory = directory
        self.title = title
        self._html: list[str] = []
        self._md: list[str] = []
        self._figures: dict[str, bytes] = {}

    def heading(self, text: str) -> None:
        self._html.append(f"<h2>{html.escape(text)}</h2>")
        self._md.append(f"## {text}")

    def paragraph(self, text: str, *, kind: str | None = None) -> None:
        """Plain text (escaped in HTML). ``kind``: ``flag`` (a warning box), ``ok`` or ``note`` (muted)."""
        css = f' class="{kind}"' if kind else ""
        self._html.append(f"<p{css}>{html.escape(text)}</p>")
        self._md.append({"flag": f"> **⚠ {text}**", "ok": f"> ✓ {text}"}.get(kind or "", text))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        cells = [[str(c) for c in row] for row in rows]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(
                f'<td class="num">{html.escape(c)}</td>' if _is_number(c) else f"<td>{html.escape(c)}</td>"
                for c in row
            ) + "</tr>"
            for row in cells
        )
        self._html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

        def md_cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(map(md_cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in cells]
        self._md.append("\n".join(lines))

    def markdown_table(self, text: str) -> None:
        """A table given as a Markdown pipe table (e.g. ``evaluation.metrics_table``)."""
        lines = [line.strip().strip("|").split("|") for line in text.strip().splitlines()]
        self.table([c.strip() for c in lines[0]], [[c.strip() for c in line] for line in lines[2:]])

    def figure(self, name: str, fig: Figure, caption: str) -> None:
        """A picture, saved as ``report/<name>.png`` and embedded in the HTML."""
        data = png_bytes(fig)
        self._figures[f"{name}.png"] = data
        encoded = base64.b64encode(data).decode("ascii")
        self._html.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        self._md.append(f"![{name}]({REPORT_FIGURES}/{name}.png)\n\n*{caption}*")

    def write(self) -> Path:
        """Write ``report/*.png``, ``report.md`` and ``report.html``; returns the HTML's path.

        Each file is written under a temporary name and renamed; pictures of an
        earlier rendering that this one no longer draws are removed.
        """
        figures = self.directory / REPORT_FIGURES
        figures.mkdir(exist_ok=True)
        for old in figures.glob("*.png"):
            if old.name not in self._figures:
                old.unlink()
        for name, data in self._figures.items():
            _replace(figures / name, data)
        markdown = f"# {self.title}\n\n" + "\n\n".join(self._md) + "\n"
        _replace(self.directory / REPORT_MD, markdown.encode())
        document = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n" + "\n".join(self._html) + "\n</body></html>\n"
        )
        _replace(self.directory / REPORT_HTML, document.encode())
        return self.directory / REPORT_HTML


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
