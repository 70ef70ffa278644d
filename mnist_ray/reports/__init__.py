"""Reports people look at: one per training run and one per scoring batch, from saved artifacts only.

Each is ``report.html`` (self-contained: pictures embedded, no network, no
scripts), ``report.md`` and the pictures as ``report/*.png``, written into the
run or batch directory; ``jobs/report.py DIR`` renders one again at any time.

* :mod:`~mnist_ray.reports.figures` — the matplotlib pictures;
* :mod:`~mnist_ray.reports.monitoring` — class shift, low confidence, rejects by reason;
* :mod:`~mnist_ray.reports.sections` — what runs and labelled batches share;
* :mod:`~mnist_ray.reports.run_report`, :mod:`~mnist_ray.reports.batch_report` — the two pages;
* :mod:`~mnist_ray.reports.page` — HTML and Markdown from the same blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_ray import artifacts
from mnist_ray.errors import MissingInput
from mnist_ray.score import output as scoring_output


def render_report(path: str | Path) -> tuple[Path, list[str]]:
    """Render the report of a run directory or a scoring batch directory, whichever ``path`` is.

    Returns the HTML's path and warnings for the log. Raises ``MissingInput``
    naming what is missing when ``path`` is neither.
    """
    directory = Path(path).resolve()
    if (directory / artifacts.CONFIG_FILE).is_file():
        if not (directory / artifacts.METADATA_FILE).is_file():
            raise MissingInput(
                f"{path}: a training run that has not finished (no {artifacts.METADATA_FILE})"
            )
        from mnist_ray.reports.run_report import render_run_report

        return render_run_report(directory)
    if (directory / scoring_output.SUMMARY_FILE).is_file():
        if not (directory / scoring_output.SUCCESS).is_file():
            raise MissingInput(
                f"{path}: a scoring batch that was not published (no {scoring_output.SUCCESS})"
            )
        from mnist_ray.reports.batch_report import render_batch_report

        return render_batch_report(directory)
    hint = ""
    if (directory / scoring_output.BATCHES).is_dir():
        batches = sorted(p.name for p in (directory / scoring_output.BATCHES).iterdir() if p.is_dir())
        newest = f" (the newest: {directory / scoring_output.BATCHES / batches[-1]})" if batches else ""
        hint = f"; it is a scoring output directory: pass one of its batches/<batch_id>{newest}"
    raise MissingInput(
        f"{path}: neither a training run directory (no {artifacts.CONFIG_FILE}) nor a scoring batch "
        f"directory (no {scoring_output.SUMMARY_FILE}){hint}"
    )


def render_and_print(path: str | Path) -> Path:
    """:func:`render_report`, printing its warnings and where the report is."""
    report, warnings = render_report(path)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    print(f"report: {report}", flush=True)
    return report


def write_report(path: Path) -> None:
    """Render the report of a run or batch the job has just finished, saying where it is.

    A failure is a warning, not a failed job: the run or batch is complete and
    correct without its report, which ``jobs/report.py`` can render again later.
    """
    try:
        render_and_print(path)
    except Exception as exc:  # whatever broke in drawing, the job's results stand
        print(f"warning: the report was not written ({type(exc).__name__}: {exc}); "
              f"render it with: python jobs/report.py {path}", file=sys.stderr, flush=True)
