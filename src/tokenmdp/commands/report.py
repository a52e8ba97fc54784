"""`tokenmdp report RUN_DIR [RUN_DIR ...] [--out DIR]`: rebuild or merge reports from run / comparison folders."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from tokenmdp.commands._common import console, emit_json
from tokenmdp.errors import TokenMDPError


def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders, comparison folders, or folders holding them."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where the report goes (default: the one folder given)."),
    claims: str | None = typer.Option(None, "--claims", help="Claims that must be computable from these folders, "
                                      "e.g. C1,C3 or all (else: one error naming the runs they lack)."),
    stand_in: str | None = typer.Option(None, "--stand-in", help="Arms judged in an algorithm's place, "
                                        "ARM=ALGO[,ARM=ALGO...], e.g. binary-grpo_nokl=grpo_nokl (that algorithm's "
                                        "own runs left out): which verdicts an arm moves."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary rows as JSON."),
) -> None:
    """Build claims.json, summary.csv, summary.md, plots/ and a self-contained report.html from run folders (the
    verdicts on the paper's claims first; the exact tier's exact.json is read from any folder given).

    Several folders (for example comparisons made on different days or machines) are merged: runs of the same
    algorithm are pooled as seeds, and the base model's evaluations are pooled too.
    """
    from tokenmdp.experiments.report import build_report

    from tokenmdp.experiments.claims import CLAIM_IDS

    wanted = [] if not claims else (list(CLAIM_IDS) if claims.strip() == "all"
                                    else [c.strip().upper() for c in claims.split(",") if c.strip()])
    mapping = parse_stand_in(stand_in)
    folder = build_report(run_dirs, out, require=wanted, stand_in=mapping)
    print_summary(folder, run_dirs, as_json, mapping)


def parse_stand_in(text: str | None) -> dict[str, str]:
    """``"a=b,c=d"`` -> ``{"a": "b", "c": "d"}``; one error naming --stand-in for anything else."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        arm, sep, algo = (x.strip() for x in part.partition("="))
        if not sep or not arm or not algo or arm == algo:
            raise TokenMDPError(f"--stand-in: {part.strip()!r} is not ARM=ALGO (two different names)")
        if arm in out:
            raise TokenMDPError(f"--stand-in: {arm!r} is given twice")
        out[arm] = algo
    return out


def print_summary(folder: Path, sources: list, as_json: bool, stand_in: dict[str, str] | None = None) -> None:
    """The summary table of the runs in ``sources`` (markdown, or one JSON document), and where the report is."""
    from tokenmdp.experiments.report import markdown_table, summary_rows
    from tokenmdp.experiments.runs import collect

    col = collect(sources)
    if stand_in:
        col = col.with_stand_ins(stand_in)
    rows = summary_rows(col)
    if as_json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        emit_json({"out": str(folder), "report": str(folder / "report.html"), "summary": clean})
        return
    console.print(markdown_table(col, rows), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'report.html'}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
