"""``report.html``: one self-contained page (inline CSS, images as base64 PNG) that opens from disk."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import re
import time

import yaml

from tokenmdp.experiments.runs import Collection

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;color:#222;
padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .55em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.base td{background:#fafae8}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0}.figs img{max-width:520px}figcaption{font-size:.8em;
color:#555}pre{background:#f7f7f7;padding:.6em;font-size:.78em;overflow-x:auto}.note{color:#555;font-size:.9em}
table.claims td{text-align:left;vertical-align:top}tr.verdict-supported td:last-child{background:#e6f4e6}
tr.verdict-contradicted td:last-child{background:#f8e1e1}tr.verdict-inconclusive td:last-child{background:#fdf3dc}
tr.verdict-not td:last-child{background:#eee}
"""

CAPTIONS = {
    "final_accuracy": "Final held-out accuracy of every algorithm next to the base model; error bars: 95% CI.",
    "reward": "Training reward per step: mean over seeds, band = min..max over seeds.",
    "heldout_accuracy": "Held-out accuracy logged by the trainer during training (its periodic evaluation).",
    "length": "Mean length (tokens) of correct and incorrect training samples per step; band = min..max over seeds.",
    "kl": "KL divergence to the base policy per step (policy/kl_base, run.kl_to_base), else to the reference.",
    "entropy": "Mean per-token entropy of the policy on its samples.",
    "logp": "Mean per-token log-likelihood of the step's correct and incorrect responses under the sampler.",
    "frac_zero_std": "Share of the step's groups whose rewards all agree (TRL's frac_reward_zero_std).",
    "clip": "Share of the response tokens where the clipped branch of the ratio loss was taken.",
    "ratio": "Largest and smallest importance ratio over the step's response tokens.",
    "sim_collapse": "The simulated tier: share of seeds whose P(correct) fell below half the start's, per learning "
                    "rate (Clopper-Pearson 95% bars).",
    "sim_length": "The simulated tier: drift of E[length | incorrect] over the run, per learning rate (mean and "
                  "95% interval over seeds; hollow: the exact path's).",
    "passk": "pass@k against k on the extra evaluations with k >= 8 (--extra-evals): the base dashed.",
    "equivalence": "Cosine between the GRPO gradient and the advantage/length weighted filtered-SFT gradient "
                   "(1 = the reduction of the paper holds exactly on that batch).",
}


def _e(x) -> str:
    return html.escape(str(x))


def _bold(text: str) -> str:
    """Escape ``text`` and turn its markdown ``**bold**`` into ``<b>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _e(text))


def _table(header: list[str], body: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    rows = []
    for i, cells in enumerate(body):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _seconds(x) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def _timings(col: Collection) -> str:
    parts, train_wall = [], {}
    for info in col.compares:
        t = info.get("timings") or {}
        top = [[k, _seconds(v)] for k, v in t.items() if isinstance(v, (int, float))]
        if top:
            parts.append(f"<p class='note'>{_e(info.get('_source', ''))}</p>" + _table(["phase", "time"], top))
        for label, v in t.items():
            if isinstance(v, dict):
                train_wall[(info.get("_source"), label)] = (v.get("train_s"), v.get("train_cpu_s"))
    body = []
    for r in col.runs:
        m = r.metrics
        sums = {k: float(m[k].sum()) if k in m.columns else math.nan for k in ("time/rollout", "time/update")}
        ev_t = (r.eval or {}).get("time_s", math.nan)
        steps = int(m.index.max()) if not m.empty else 0
        wall, cpu = next((v for (src, lab), v in train_wall.items() if lab == r.label and src
                          and str(r.path).startswith(str(src))), (math.nan, math.nan))
        body.append([r.label, str(steps), _seconds(wall), _seconds(cpu), _seconds(sums["time/rollout"]),
                     _seconds(sums["time/update"]), _seconds(ev_t), "yes" if r.done else "no", str(r.path)])
    parts.append(_table(["run", "steps", "training (wall)", "training (CPU)", "rollout", "update", "held-out eval",
                         "DONE", "folder"], body))
    return "".join(parts)


def _settings(col: Collection) -> str:
    parts = []
    for info in col.compares:
        parts.append(f"<p class='note'>comparison {_e(info.get('_source', ''))}, made "
                     f"{_e(info.get('created', '?'))} on {_e(info.get('machine', '?'))}</p>")
        parts.append(f"<pre>{_e(json.dumps(info.get('settings', {}), indent=2, default=str))}</pre>")
    shown = set()
    for r in col.runs:
        if r.algo in shown or not r.config:
            continue
        shown.add(r.algo)
        parts.append(f"<details><summary>config.yaml of {_e(r.label)}</summary>"
                     f"<pre>{_e(yaml.safe_dump(r.config, sort_keys=False))}</pre></details>")
    evs = [e for e in col.base_evals] + [r.eval for r in col.runs if r.eval]
    if evs:
        parts.append("<p>Held-out evaluation settings:</p>"
                     f"<pre>{_e(json.dumps(evs[0].get('settings', {}), indent=2, default=str))}</pre>")
    return "".join(parts)


def figures_html(figures: dict[str, bytes]) -> str:
    """Inline PNG figures with their captions (:data:`CAPTIONS`, else the name)."""
    return "".join(
        f"<figure><img alt='{_e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{_e(CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, png in figures.items()
    )


def render_html(col: Collection, header: list[str], cells: list[list[str]], rows: list[dict],
                figures: dict[str, bytes], reading: list[str], *, claims: str = "", beyond: str = "",
                exact_figures: dict[str, bytes] | None = None) -> str:
    """The whole page: the claims' verdicts (``claims``, an HTML table: the first screen, right under its heading),
    the section beyond the degenerate MDP (``beyond``, HTML with its own heading), the summary table
    (``header`` and ``cells`` of ``rows``), length reading, figures (inline; the exact tier's first), settings,
    timings, run list."""
    table = _table(header, cells, ["base" if r["algo"] == "base" else "" for r in rows])
    figs = figures_html(figures)
    exact_html = (f"<h2>The exact tier</h2><p class='note'>Exact expected updates on an enumerable token MDP "
                  f"(no sampling noise).</p><div class='figs'>{figures_html(exact_figures)}</div>"
                  if exact_figures else "")
    claims_html = (f"<h2>The paper's claims</h2><p class='note'>Predictions of arXiv 2505.13697 (and C5, the "
                   f"expectation view), what these runs measured, and the verdict with its power.</p>{claims}"
                   if claims else "")
    missing = [n for n in CAPTIONS if n not in figures and n != "passk" and not n.startswith("sim_")]  # not curves
    missing_note = (f"<p class='note'>Not logged by these runs: {_e(', '.join(missing))}.</p>" if missing else "")
    reading_html = "".join(f"<li>{_bold(line)}</li>" for line in reading)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tokenmdp report</title><style>{CSS}</style></head><body>
<h1>tokenmdp comparison report</h1>
<p class="note">Generated {_e(time.strftime('%Y-%m-%d %H:%M'))} on {_e(platform.node() or platform.machine())} from
{_e(', '.join(str(s) for s in col.sources))}: {len(col.runs)} runs of {len(col.algos)} algorithms{_left_out(col)}.</p>
{claims_html}
{beyond}
<h2>Held-out results</h2>
<p class="note">Final models on the fixed held-out set: mean ± half width of the 95% Student-t interval over seeds
(accuracies in %, lengths in tokens; one seed gives no interval). The base row is the model before training.</p>
{table}
<h2>Length effect</h2><ul>{reading_html}</ul>
{exact_html}
<h2>Curves</h2><div class="figs">{figs}</div>{missing_note}
<h2>Settings</h2>{_settings(col)}
<h2>Timings</h2>{_timings(col)}
</body></html>
"""


def _left_out(col) -> str:
    """The note on unfinished runs, which the tables and curves leave out."""
    if not col.unfinished:
        return ""
    return "; left out, not finished: " + _e(", ".join(r.label for r in col.unfinished))
