"""The report of a comparison: ``summary.csv``, ``summary.md``, ``plots/*.png`` and a self-contained
``report.html`` built from run folders and comparison folders (read only; see :mod:`tokenmdp.experiments.runs`).

Every algorithm gets the mean and the 95% Student-t confidence interval over its seeds
(:func:`tokenmdp.stats.mean_ci`) of the held-out metrics of its final model, next to the base model.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.beyond import analyse
from tokenmdp.experiments.beyond.render import beyond_html, beyond_markdown, exact_two_llm_markdown
from tokenmdp.experiments.claims import evaluate_claims
from tokenmdp.experiments.claims.render import claims_html, claims_markdown, write_claims
from tokenmdp.experiments.report.plots import all_figures
from tokenmdp.experiments.report.html import figures_html, render_html
from tokenmdp.experiments.report.variants import passk_figure, variant_analysis, variants_html, variants_markdown
from tokenmdp.experiments.runs import Collection, collect, read_json
from tokenmdp.experiments.simulated.sweep import sweep_markdown
from tokenmdp.stats import mean_ci

# (key in eval.json "metrics" or a derived training key, column label, kind)
SUMMARY_METRICS: list[tuple[str, str, str]] = [
    ("greedy/pass@1", "greedy acc", "pct"),
    ("sampled/pass@1", "sampled pass@1", "pct"),
    ("pass@k", "pass@k", "pct"),
    ("majority@k", "majority@k", "pct"),
    ("best_of_k", "best-of-k", "pct"),
    ("sampled/format_rate", "format rate", "pct"),
    ("sampled/length_correct", "len correct", "tok"),
    ("sampled/length_incorrect", "len incorrect", "tok"),
    ("train/final_reward", "final train reward", "num"),
]
BAR_METRICS = [("greedy/pass@1", "greedy"), ("sampled/pass@1", "sampled pass@1"), ("pass@k", "pass@k")]
BASE = "base"


def _eval_metrics(ev: dict | None) -> dict:
    if not ev:
        return {}
    return ev.get("metrics", ev)


def final_reward(metrics) -> float:
    """Mean of ``reward/mean`` over the last fifth of the logged steps (at least one step); NaN when absent."""
    if metrics.empty or "reward/mean" not in metrics.columns:
        return math.nan
    values = metrics["reward/mean"].dropna()
    if values.empty:
        return math.nan
    tail = max(1, len(values) // 5)
    return float(values.iloc[-tail:].mean())


def run_values(run) -> dict[str, float]:
    """The summary metrics of one run: its held-out evaluation plus derived training figures."""
    values = {k: float(v) for k, v in _eval_metrics(run.eval).items() if isinstance(v, (int, float))}
    values["train/final_reward"] = final_reward(run.metrics)
    return values


def _k_of(col: Collection) -> int | None:
    for ev in [r.eval for r in col.runs] + col.base_evals:
        if ev and isinstance((ev.get("settings") or {}).get("k"), int):
            return ev["settings"]["k"]
    return None


def summary_rows(col: Collection) -> list[dict]:
    """One row per algorithm (the base model first): ``<key>_mean``, ``_low``, ``_high``, ``_half_width``, ``_n``."""
    groups: list[tuple[str, list[dict], list]] = []
    if col.base_evals:
        groups.append((BASE, [{k: float(v) for k, v in _eval_metrics(e).items() if isinstance(v, (int, float))}
                              for e in col.base_evals], []))
    for algo in col.algos:
        runs = col.runs_of(algo, finished=True)
        if not runs:
            continue
        groups.append((algo, [run_values(r) for r in runs], [r.seed for r in runs]))
    rows = []
    for algo, values, seeds in groups:
        row: dict = {"algo": algo, "runs": len(values), "seeds": " ".join(str(s) for s in seeds)}
        for key, _, _ in SUMMARY_METRICS:
            ci = mean_ci([v.get(key, math.nan) for v in values])
            row[f"{key}_mean"] = ci.mean
            row[f"{key}_low"] = ci.low if ci.low is not None else math.nan
            row[f"{key}_high"] = ci.high if ci.high is not None else math.nan
            row[f"{key}_half_width"] = ci.half_width if ci.half_width is not None else math.nan
            row[f"{key}_n"] = ci.n
        rows.append(row)
    return rows


def format_cell(row: dict, key: str, kind: str) -> str:
    """The table text of one metric: percent with one decimal (``pct``), tokens with one decimal (``tok``), or a
    number with three decimals; ``± half width`` when there is an interval. ``0.4125 ± 0.031`` -> ``41.2 ± 3.1``."""
    mean, half = row[f"{key}_mean"], row[f"{key}_half_width"]
    if not math.isfinite(mean):
        return "n/a"
    scale, digits = {"pct": (100.0, 1), "tok": (1.0, 1)}.get(kind, (1.0, 3))
    text = f"{mean * scale:.{digits}f}"
    if math.isfinite(half):
        text += f" ± {half * scale:.{digits}f}"
    return text


def column_labels(col: Collection) -> list[str]:
    k = _k_of(col)
    return [label.replace("@k", f"@{k}").replace("-k", f"-{k}") if k else label for _, label, _ in SUMMARY_METRICS]


def table_cells(rows: list[dict]) -> list[list[str]]:
    return [[r["algo"], str(r["runs"])] + [format_cell(r, k, kind) for k, _, kind in SUMMARY_METRICS] for r in rows]


def write_csv(rows: list[dict], path: Path) -> None:
    """``summary.csv``: one row per algorithm, full precision (fractions for accuracies, tokens for lengths)."""
    fields = ["algo", "runs", "seeds"] + [f"{k}_{s}" for k, _, _ in SUMMARY_METRICS
                                          for s in ("mean", "low", "high", "half_width", "n")]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({f: ("" if isinstance(row[f], float) and math.isnan(row[f]) else row[f]) for f in fields})


def markdown_table(col: Collection, rows: list[dict]) -> str:
    header = ["algorithm", "runs"] + column_labels(col)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(rows)]
    return "\n".join(lines)


def _mean(row: dict | None, key: str) -> float:
    return row[f"{key}_mean"] if row else math.nan


def _trend(col: Collection, algo: str) -> tuple[float, float]:
    """Mean ``length/incorrect`` of the training samples over the first and the last fifth of the steps."""
    firsts, lasts = [], []
    for run in col.runs_of(algo, finished=True):
        m = run.metrics
        if m.empty or "length/incorrect" not in m.columns:
            continue
        v = m["length/incorrect"].dropna()
        if len(v):
            w = max(1, len(v) // 5)
            firsts.append(v.iloc[:w].mean())
            lasts.append(v.iloc[-w:].mean())
    return (sum(firsts) / len(firsts), sum(lasts) / len(lasts)) if firsts else (math.nan, math.nan)


def length_reading(col: Collection, rows: list[dict]) -> list[str]:
    """A short generated reading of the length effect: do wrong answers grow longer under GRPO than under
    dr_grpo and filtered iterative SFT? (The paper's argument: GRPO's 1/|o| pushes long wrong answers down less.)"""
    by_algo = {r["algo"]: r for r in rows}
    key = "sampled/length_incorrect"
    out = []
    base = by_algo.get(BASE)
    for algo in [a for a in col.algos]:
        first, last = _trend(col, algo)
        row = by_algo[algo]
        parts = [f"**{algo}**:"]
        if math.isfinite(first):
            parts.append(f"incorrect training samples went from {first:.1f} to {last:.1f} tokens "
                         f"(first vs last fifth of the steps, {last - first:+.1f});")
        if math.isfinite(_mean(row, key)):
            parts.append(f"held-out incorrect answers average {format_cell(row, key, 'tok')} tokens")
            if base and math.isfinite(_mean(base, key)):
                parts.append(f"against {_mean(base, key):.1f} for the base model")
        out.append(" ".join(parts).rstrip(";") + ".")
    ref = "grpo" if "grpo" in by_algo else "grpo_nokl"  # GRPO with its KL, else without it
    grpo = by_algo.get(ref)
    others = [a for a in ("dr_grpo", "isft+", "isft+-", "isft-") if a in by_algo]
    if grpo is None or not others:
        out.append("The GRPO-versus-(dr_grpo, isft) length comparison needs grpo (or grpo_nokl) and at least one of "
                   "dr_grpo or isft in the report.")
        return out
    for other in others:
        row = by_algo[other]
        diff = _mean(grpo, key) - _mean(row, key)
        if not math.isfinite(diff):
            continue
        overlap = _intervals_overlap(grpo, row, key)
        verdict = ("the 95% intervals overlap, so this run does not separate them" if overlap is True else
                   "the 95% intervals do not overlap" if overlap is False else
                   "with one seed there is no interval, so this is not evidence either way")
        size = ("as long as" if abs(diff) < 0.05 else
                f"{abs(diff):.1f} tokens {'longer' if diff > 0 else 'shorter'} than")
        out.append(f"Wrong answers under {ref} are {size} under {other} on the held-out set; {verdict}.")
        (g0, g1), (o0, o1) = _trend(col, ref), _trend(col, other)
        if math.isfinite(g0) and math.isfinite(o0):
            out.append(f"During training, incorrect samples changed by {g1 - g0:+.1f} tokens under {ref} and "
                       f"{o1 - o0:+.1f} under {other}.")
    out.append(f"The paper's argument predicts longer wrong answers under {ref} (its per-sequence 1/|o| weight pushes "
               "each token of a long wrong answer down less) than under dr_grpo's constant divisor; isft+ never pushes "
               "wrong answers down at all.")
    return out


def _intervals_overlap(a: dict, b: dict, key: str) -> bool | None:
    lo_a, hi_a, lo_b, hi_b = (a[f"{key}_low"], a[f"{key}_high"], b[f"{key}_low"], b[f"{key}_high"])
    if not all(math.isfinite(x) for x in (lo_a, hi_a, lo_b, hi_b)):
        return None
    return not (hi_a < lo_b or hi_b < lo_a)


EXACT_FILES = ("exact.json", "exact/exact.json")


def _find_json(paths: list[Path], names: tuple[str, ...]) -> tuple[dict | None, Path | None]:
    """The first of ``names`` found under one of ``paths``, read, and its folder; (None, None) when none is."""
    for p in paths:
        for name in names:
            file = Path(p).expanduser() / name
            if file.is_file():
                return read_json(file), file.parent
    return None, None


def find_exact(paths: list[Path]) -> tuple[dict | None, Path | None]:
    """The exact tier's result saved in one of ``paths`` (``exact.json`` or ``exact/exact.json``), and its
    folder; (None, None) when none holds one."""
    return _find_json(paths, EXACT_FILES)


SIM_FILES = ("sim.json", "sim/sim.json")


def find_sim(paths: list[Path]) -> tuple[dict | None, Path | None]:
    """The simulated tier's sweep saved in one of ``paths`` (``sim.json`` or ``sim/sim.json``) and its folder;
    (None, None) when none holds one."""
    return _find_json(paths, SIM_FILES)


def sim_section(doc: dict | None) -> str:
    """The simulated tier's markdown for the report (its summary one heading level down); "" without one."""
    if not doc:
        return ""
    text = sweep_markdown(doc).replace("\n## G = ", "\n### G = ")
    return text.replace("# The simulated tier", "## The simulated tier", 1)


def build_report(run_dirs, out: str | Path | None = None, *, require: list[str] | tuple = (),
                 stand_in: dict[str, str] | None = None) -> Path:
    """Build ``claims.json``, ``summary.csv``, ``summary.md``, ``plots/*.png`` and ``report.html`` in ``out`` from
    run folders or comparison folders (a path or a list of them; the exact tier's ``exact.json`` is picked up
    from any of them). ``out`` defaults to the single folder given. ``require``: claim ids (``"C1"``, ...) that
    must be computable from the folders given, else one error naming the runs they lack. ``stand_in``: arms that
    take an algorithm's place (:meth:`Collection.with_stand_ins`). Returns ``out``."""
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    col = collect(paths)
    if stand_in:
        col = col.with_stand_ins(stand_in)
    if out is None:
        if len(paths) != 1:
            raise TokenMDPError("several folders given: choose where the merged report goes with --out")
        out = paths[0]
    exact, exact_dir = find_exact(paths)
    claims = evaluate_claims(col, exact)
    unknown = [c for c in require if c not in claims]
    if unknown:
        raise TokenMDPError(f"--claims: unknown claim(s) {', '.join(unknown)}; the claims are {', '.join(claims)}")
    lacking = [f"{c} needs {', '.join(claims[c]['missing'])}" for c in require if claims[c]["missing"]]
    if lacking:
        raise TokenMDPError("claims that cannot be computed from the runs given: " + "; ".join(lacking))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_claims(claims, out / "claims.json")
    beyond = analyse(col)
    if beyond:
        (out / "beyond.json").write_text(json.dumps(beyond, indent=2, default=str) + "\n")
    else:
        (out / "beyond.json").unlink(missing_ok=True)  # an earlier report's, for runs no longer given
    rows = summary_rows(col)
    write_csv(rows, out / "summary.csv")
    reading = length_reading(col, rows)
    md = ["# tokenmdp comparison summary", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')} from "
          + ", ".join(str(s) for s in col.sources) + ".", ""]
    if stand_in:
        md += ["Stand-ins: " + "; ".join(f"`{a}` judged as `{b}`" for a, b in stand_in.items())
               + " (the algorithm's own runs left out).", ""]
    exact_env = exact_two_llm_markdown(exact)
    md += ["## The paper's claims", "", claims_markdown(claims), ""]  # the verdicts first, as on the page
    variants = variant_analysis(col, claims)
    if variants:
        (out / "variants.json").write_text(json.dumps(variants, indent=2, default=str) + "\n")
        md += [variants_markdown(variants)]
    else:
        (out / "variants.json").unlink(missing_ok=True)
    if beyond or exact_env:
        md += ["## Beyond the degenerate MDP", ""] + [t + "\n" for t in (beyond_markdown(beyond), exact_env) if t]
    sim, sim_dir = find_sim(paths)
    sim_md = sim_section(sim)
    if sim_md:
        md += [sim_md, ""]
    md += ["## Held-out results", "",
          "Held-out metrics of the final models: mean ± half width of the 95% Student-t interval over seeds "
          "(accuracies in %, lengths in tokens).", ""]
    if col.unfinished:
        md += ["Left out (not finished: no DONE, no held-out evaluation): "
               + ", ".join(r.label for r in col.unfinished) + ".", ""]
    md += [markdown_table(col, rows), "", "## Length effect", ""]
    md += [f"- {line}" for line in reading]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    k = _k_of(col)
    bars = [(key, label.replace("@k", f"@{k}") if k else label) for key, label in BAR_METRICS]
    figures = all_figures(col, rows, bars)
    passk = passk_figure(variants)
    if passk is not None:
        figures["passk"] = passk
    (out / "plots").mkdir(exist_ok=True)
    for name, png in figures.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    exact_figures = {}
    if exact_dir is not None and (exact_dir / "plots").is_dir():
        exact_figures = {f"exact_{p.stem}": p.read_bytes() for p in sorted((exact_dir / "plots").glob("*.png"))}
    sim_html = beyond_html(sim_md.split("\n", 1)[-1], "The simulated tier") if sim_md else ""
    if sim_dir is not None and (sim_dir / "plots").is_dir():
        sim_figs = {p.stem: p.read_bytes() for p in sorted((sim_dir / "plots").glob("sim_*.png"))}
        sim_html += f"<div class='figs'>{figures_html(sim_figs)}</div>" if sim_figs else ""
    header = ["algorithm", "runs"] + column_labels(col)
    beyond_text = "\n\n".join(t for t in (beyond_markdown(beyond), exact_env) if t)
    page = render_html(col, header, table_cells(rows), rows, figures, reading,
                       claims=claims_html(claims) + variants_html(variants),
                       beyond=beyond_html(beyond_text) + sim_html,
                       exact_figures=exact_figures)
    (out / "report.html").write_text(page)
    return out
