"""The claims' verdicts as a reader sees them: a markdown table (``summary.md``, the README), an HTML table (the
first screen of ``report.html``) and ``claims.json``. The verdicts themselves are :mod:`tokenmdp.experiments.claims`.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_markdown(claims: dict) -> str:
    """A markdown table: claim, prediction, measured (the summary line), verdict."""
    lines = ["| claim | prediction | measured | verdict |", "|---|---|---|---|"]
    for c in claims.values():
        lines.append(f"| {_md(c['claim'])} | {_md(c['prediction'])} | {_md(c['summary'])} | **{_md(c['verdict'])}** |")
    return "\n".join(lines)


def claims_html(claims: dict) -> str:
    """An HTML table fragment (every text escaped); rows carry ``class="verdict-<word>"`` for styling."""
    rows = []
    for cid, c in claims.items():
        cls = "verdict-" + c["verdict"].split()[0]
        power = f"<br><small>{html.escape(c['power'])}</small>" if c.get("power") else ""
        rows.append(f'<tr class="{cls}" id="claim-{html.escape(cid)}"><td>{html.escape(c["claim"])}</td>'
                    f"<td>{html.escape(c['prediction'])}</td><td>{html.escape(c['summary'])}{power}</td>"
                    f"<td><strong>{html.escape(c['verdict'])}</strong></td></tr>")
    return ('<table class="claims">\n<thead><tr><th>claim</th><th>prediction</th><th>measured</th><th>verdict</th>'
            "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def write_claims(claims: dict, path: str | Path) -> Path:
    """``claims.json``: the claims as evaluated, NaN and infinities written as null (the summary keeps "inf")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(claims), indent=2, allow_nan=False) + "\n")
    return path
