"""Run-folder logging: ``metrics.jsonl`` (one JSON object a step) and ``samples.parquet``.

Both survive a resume: lines and rows of steps after the resumed checkpoint (written before a crash) are dropped,
so a resumed run's files read as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenmdp.atomic import write_error
from tokenmdp.errors import WriteError

SAMPLE_COLUMNS = ["prompt", "completion", "reward", "correct", "length", "step", "group", "algo", "seed"]
SAMPLE_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("reward", pa.float64()),
        ("correct", pa.bool_()),
        ("length", pa.int64()),
        ("step", pa.int64()),
        ("group", pa.int64()),
        ("algo", pa.string()),
        ("seed", pa.int64()),
    ]
)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors and numpy values to Python, NaN and inf to None."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_error(path: Path, exc: OSError, what: str) -> WriteError:
    return write_error(f"{what} to {path}", getattr(exc, "errno", None), getattr(exc, "strerror", None) or str(exc),
                       "the checkpoints already written are intact",
                       "free space and run again (--resume continues the run from the last checkpoint)")


class MetricsLogger:
    """Appends one JSON line per step to ``metrics.jsonl`` (flushed, so a crash keeps finished steps)."""

    def __init__(self, path: Path, *, resume_step: int | None = None, trackers=None):
        self.path = Path(path)
        self.trackers = trackers  # the run's tokenmdp.train.trackers.Trackers, or None
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)  # a kill here keeps the old file whole
        elif self.path.exists():
            self.path.unlink()

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Write ``{"step": step, **metrics}`` as one line; returns the cleaned record."""
        record = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        except OSError as exc:  # a full disk: no half line is left behind, the checkpoints are intact
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise _write_error(self.path, exc, f"step {step}'s metrics") from exc
        if self.trackers is not None:  # a tokenmdp.train.trackers.Trackers
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.trackers.log(numeric, step=step)
        return record


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a crash: drop it


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, left by a crash, is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


class SampleLogger:
    """Collects sampled responses and rewrites ``samples.parquet`` (atomically) on :meth:`flush`."""

    def __init__(self, path: Path, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.columns: dict[str, list] = {name: [] for name in SAMPLE_COLUMNS}
        if not enabled:  # another process writes the file (or nobody): leave it alone
            return
        if resume_step is not None and self.path.exists():
            table = pq.read_table(self.path)
            for name in SAMPLE_COLUMNS:
                values = table.column(name).to_pylist()
                steps = table.column("step").to_pylist()
                self.columns[name] = [v for v, s in zip(values, steps) if s <= resume_step]
        elif self.path.exists():
            self.path.unlink()

    def add(self, rows: dict[str, list]) -> None:
        """Append columns of equal length (names of :data:`SAMPLE_COLUMNS`)."""
        if not self.enabled:
            return
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1 or set(rows) != set(SAMPLE_COLUMNS):
            raise ValueError(f"sample rows need equal-length columns {SAMPLE_COLUMNS}, got {sorted(rows)}")
        for name in SAMPLE_COLUMNS:
            self.columns[name].extend(rows[name])

    def __len__(self) -> int:
        return len(self.columns["step"])

    def rows_of_step(self, step: int) -> dict[str, list]:
        """The columns of the rows logged at ``step`` (the last ones added)."""
        steps = self.columns["step"]
        first = len(steps)
        while first > 0 and steps[first - 1] == step:
            first -= 1
        return {name: values[first:] for name, values in self.columns.items()}

    def flush(self) -> None:
        """Write every collected row to ``samples.parquet`` (temp file, then rename)."""
        if not self.enabled:
            return
        table = pa.Table.from_pydict(self.columns, schema=SAMPLE_SCHEMA)
        tmp = self.path.with_suffix(".parquet.tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk: the previous samples.parquet is intact
            tmp.unlink(missing_ok=True)
            raise _write_error(self.path, exc, "the sampled responses") from exc
