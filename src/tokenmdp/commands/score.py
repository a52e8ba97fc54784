"""`tokenmdp score`: score a file of completions with a task's verifier.

Each input line (JSONL, or Parquet rows) holds the problem's fields plus ``completion``: either the task's
``problem_to_dict`` form (``id``, ``question``, ``answer``, ``metadata``) or the raw fields of the data set
(Countdown ``{"nums", "target"}``, GSM8K ``{"question", "answer": "... #### 18"}``). The output repeats each line
with ``reward``, ``correct``, ``formatted``, ``reason`` (and, for tasks with a step verifier, ``steps_correct`` /
``steps_total``) added.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tokenmdp.commands._common import console, emit_json, err_console
from tokenmdp.commands.tasks import OPTION_HELP, TASKS, parse_options
from tokenmdp.errors import TokenMDPError

PROGRESS_MIN_LINES = 2000


def register(app: typer.Typer) -> None:
    app.command("score")(score_cmd)


def score_records(task, records, *, skip_bad: bool = False, on_line=None) -> tuple[list[dict], list[str]]:
    """Score ``(where, record)`` pairs; returns the scored records and the error messages of skipped lines."""
    scored, bad = [], []
    for where, rec in records:
        try:
            if isinstance(rec, TokenMDPError):
                raise rec
            if not isinstance(rec, dict):
                raise TokenMDPError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            completion = rec.get("completion")
            if not isinstance(completion, str):
                raise TokenMDPError(f"{where}: missing or non-string field 'completion'")
            problem = task.problem_from_dict(rec, where=where)
        except TokenMDPError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
        else:
            s = task.score(problem, completion)
            out = {**rec, "reward": s.reward, "correct": s.correct, "formatted": s.formatted, "reason": s.reason}
            steps = task.score_steps(problem, completion)
            if steps:
                out["steps_correct"] = sum(st.correct for st in steps)
                out["steps_total"] = len(steps)
            scored.append(out)
        if on_line is not None:
            on_line()
    return scored, bad


def summarize(scored: list[dict], bad: list[str]) -> dict[str, Any]:
    """Counts and rates: ``accuracy`` = correct / scored, ``format_rate`` = formatted / scored."""
    n = len(scored)
    correct = sum(r["correct"] for r in scored)
    formatted = sum(r["formatted"] for r in scored)
    return {
        "lines": n + len(bad),
        "scored": n,
        "skipped": len(bad),
        "correct": correct,
        "formatted": formatted,
        "accuracy": correct / n if n else 0.0,
        "format_rate": formatted / n if n else 0.0,
        "mean_reward": sum(r["reward"] for r in scored) / n if n else 0.0,
    }


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path, index=False)
        return
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_input(path: Path):
    """Yield ``(where, record)``; a JSONL line that is not JSON yields a TokenMDPError as its record."""
    from tokenmdp.tasks.task import read_records

    if path.suffix.lower() in (".parquet", ".pq"):
        yield from ((f"{path}:{ln}", rec) for ln, rec in read_records(path))
        return
    with path.open(encoding="utf-8") as fh:
        for ln, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{ln}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{ln}", TokenMDPError(f"{path}:{ln}: not valid JSON ({exc.msg})")


def _count_lines(path: Path) -> int:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def score_cmd(
    task_name: str = typer.Option(..., "--task", help=f"{TASKS}, or 'package.module:Class'."),
    input_path: Path = typer.Option(..., "--input", help="JSONL (or Parquet) file: problem fields + 'completion'."),
    output: Path = typer.Option(None, "--output", help="Write the scored lines here (.jsonl or .parquet)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Count and skip malformed lines instead of stopping."),
    option: list[str] = typer.Option(None, "--option", "-o", help=OPTION_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
) -> None:
    """Score a file of completions with the task's verifier; print accuracy, format rate and counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rich.markup import escape

    from tokenmdp.tasks import get_task

    task = get_task(task_name, **parse_options(option))
    if not input_path.exists():
        raise TokenMDPError(f"--input file not found: {input_path}")
    total = _count_lines(input_path)
    records = read_input(input_path)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=total < PROGRESS_MIN_LINES) as bar:
        job = bar.add_task("score", total=total)
        scored, bad = score_records(task, records, skip_bad=skip_bad, on_line=lambda: bar.advance(job))
    if output is not None:
        _write(output, scored)
    summary = {"task": task.name, "input": str(input_path), "output": None if output is None else str(output),
               **summarize(scored, bad), "bad_lines": bad[:20]}
    if json_out:
        emit_json(summary)
        return
    console.print(
        f"[bold]{task.name}[/bold]: {summary['scored']} scored, accuracy {summary['accuracy']:.4f} "
        f"({summary['correct']}), format rate {summary['format_rate']:.4f} ({summary['formatted']}), "
        f"mean reward {summary['mean_reward']:.4f}"
    )
    if bad:
        console.print(f"skipped {len(bad)} malformed line(s); first: {escape(bad[0])}")
    if output is not None:
        console.print(f"wrote {escape(str(output))}")
