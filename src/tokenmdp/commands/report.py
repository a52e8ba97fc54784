"""`tokenmdp report RUN_DIR [RUN_DIR ...] [--out DIR]`: rebuild or merge reports from run / comparison folders."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from tokenmdp.commands._common import console, emit_json


def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders, comparison folders, or folders holding them."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where the report goes (default: the one folder given)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary rows as JSON."),
) -> None:
    """Build summary.csv, summary.md, plots/ and a self-contained report.html from run folders.

    Several folders (for example comparisons made on different days or machines) are merged: runs of the same
    algorithm are pooled as seeds, and the base model's evaluations are pooled too.
    """
    from tokenmdp.experiments.report import build_report, markdown_table, summary_rows
    from tokenmdp.experiments.runs import collect

    folder = build_report(run_dirs, out)
    col = collect(run_dirs)
    rows = summary_rows(col)
    if as_json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        emit_json({"out": str(folder), "report": str(folder / "report.html"), "summary": clean})
        return
    console.print(markdown_table(col, rows), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'report.html'}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
