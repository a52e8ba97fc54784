"""Progress display shared by every long command: rich bars on stderr, or plain lines where stderr is no terminal.

Rich hides its bars when stderr is not a terminal (a log file, ``make demo | tee``); :func:`plain_log` gives the
long jobs a line-by-line fallback there, so that a run of many minutes is never silent. The two consoles
(:data:`console` on stdout, :data:`err_console` on stderr) live here, at the ground of the house, so that every
layer may print through them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def progress_bar(enabled: bool = True):
    """A rich progress bar on stderr: description, bar, done/total, an ``info`` field, elapsed and time left."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("left"),
                    TimeRemainingColumn(), console=err_console, disable=not enabled)


def plain_log(enabled: bool = True) -> Callable[[str], None] | None:
    """A function printing one line on stderr when progress is ``enabled`` and stderr is not a terminal (where
    the bars do not show); else None."""
    if not enabled or err_console.is_terminal:
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)


__all__ = ["console", "err_console", "plain_log", "progress_bar"]
