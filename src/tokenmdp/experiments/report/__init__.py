"""The report of a comparison: :mod:`.build` writes ``summary.csv``, ``summary.md``, the plots and ``report.html``
(:func:`build_report`), :mod:`.plots` draws the figures and :mod:`.html` lays out the page."""

from __future__ import annotations

from tokenmdp.experiments.report.build import (BAR_METRICS, SUMMARY_METRICS, build_report, format_cell,
                                               markdown_table, summary_rows)

__all__ = ["BAR_METRICS", "SUMMARY_METRICS", "build_report", "format_cell", "markdown_table", "summary_rows"]
