"""The verdict on C3 (negatives alone collapse: ``isft-`` falls far below the base model), with its three readings
(docs/math.md 4.5): collapsed (the interval's upper end below half the base's), not declined (its lower end within
:data:`EQUIV_MARGIN` of the base), or declined and levelled off above the collapse line (:func:`late_trend` over
the second half of the held-out curve). :func:`tokenmdp.experiments.claims.evaluate_claims` collects it with the
others; the thresholds are :mod:`tokenmdp.experiments.claims.common`."""

from __future__ import annotations

import math

from tokenmdp.experiments.claims.common import (C3_COLLAPSE_FRACTION, C3_LATE_POINTS, EQUIV_MARGIN, PRIMARY_METRIC,
                                                SECONDARY_METRIC, base_metric, claim_record, fmt_points, nested_get,
                                                paired_runs, run_metric)
from tokenmdp.experiments.runs import Collection, RunData
from tokenmdp.stats import (CONTRADICTED, INCONCLUSIVE, SUPPORTED, bootstrap_ci, ls_slope, mean_ci,
                            min_detectable_difference)


# --- C3: negatives alone collapse --------------------------------------------------------------------------------


def _curve_from_zero(run: RunData, col: Collection) -> list[list[float]]:
    m = run.metrics
    points = []
    if not m.empty and "eval/accuracy" in m.columns:
        points = [[int(s), float(v)] for s, v in m["eval/accuracy"].dropna().items()]
    if not points or points[0][0] != 0:
        greedy = nested_get(run.config, "run", "eval_greedy") is not False
        base = base_metric(col, SECONDARY_METRIC if greedy else PRIMARY_METRIC)
        if math.isfinite(base):
            points.insert(0, [0, base])
    return points


def late_trend(curve: list[list[float]], horizon: int) -> float:
    """Least-squares slope (accuracy per step) of a held-out curve's points at steps >= ``horizon / 2``; NaN with
    fewer than :data:`C3_LATE_POINTS` of them."""
    late = [(s, v) for s, v in curve if s >= horizon / 2]
    if len(late) < C3_LATE_POINTS:
        return math.nan
    return ls_slope([s for s, _ in late], [v for _, v in late])


def _c3_levels_off(ci, curves: dict, horizon: int, collapse: float) -> tuple[bool, dict | None]:
    """C3's third reading (common.py, C3_LATE_POINTS): whether ISFT-, above the collapse line, has levelled off.
    ``(levels_off, late)``: the late slopes over seeds (per 100 steps) and the lower end of the final accuracy
    continued for another ``horizon`` steps at the steepest slope the interval allows."""
    slopes = [late_trend(c, horizon) for c in curves.values()]
    sci = mean_ci([x for x in slopes if math.isfinite(x)])
    if not (sci.has_interval and ci.has_interval) or sci.n < len(slopes):
        return False, None
    projected = ci.low + min(0.0, sci.low) * horizon
    late = {"points_per_100_steps": {"mean": 1e4 * sci.mean, "low": 1e4 * sci.low, "high": 1e4 * sci.high},
            "horizon": horizon, "projected_low": projected, "note": "greedy held-out curve (eval/accuracy) from "
            "half the run on; the final sampled accuracy's lower end continued at the interval's steepest slope"}
    return ci.low > collapse and projected > collapse, late


def isft_minus_arms(col: Collection) -> dict[str, dict]:
    """``{name: {seed: run}}``: the finished runs of ``isft-`` and of every named arm that trains it (another
    learning rate, for example: ``compare --preset c3-lr-sweep``), plain ``isft-`` first."""
    arms: dict[str, dict] = {}
    for r in sorted(col.runs, key=lambda r: r.algo != "isft-"):
        if r.finished and (r.algo == "isft-" or nested_get(r.config, "algo", "name") == "isft-"):
            arms.setdefault(r.algo, {})[r.seed] = r
    return arms


def _collapse_step(curve: list[list[float]], line: float) -> int | None:
    """The first step of a held-out curve below ``line`` (None: never)."""
    return next((int(s) for s, v in curve if v < line), None)


def _judge(name: str, runs: dict, col: Collection, base: float) -> tuple[str, dict, str]:
    """C3's readings for the runs of one ISFT- arm: ``(verdict, measured, summary)``."""
    seeds = sorted(runs, key=lambda s: (s is None, s or 0))
    values = [run_metric(runs[s], PRIMARY_METRIC) for s in seeds]
    ci = mean_ci(values)
    collapse = C3_COLLAPSE_FRACTION * base
    base_greedy = base_metric(col, SECONDARY_METRIC)
    measured: dict = {"seeds": seeds, "metric": PRIMARY_METRIC, "per_seed": dict(zip([f"seed-{s}" for s in seeds],
                                                                                     values)),
                      "greedy_per_seed": {f"seed-{s}": run_metric(runs[s], SECONDARY_METRIC) for s in seeds},
                      "mean_ci": ci.to_dict(), "base": base, "base_greedy": base_greedy,
                      "collapse_below": collapse,
                      "curve": {f"seed-{s}": _curve_from_zero(runs[s], col) for s in seeds},
                      "curve_note": "eval/accuracy of metrics.jsonl; step 0 is the base model (base_eval.json) "
                                    "when the run logged none",
                      "lr": nested_get(runs[seeds[0]].config, "optim", "lr") if seeds else None}
    # the first held-out curve point below half the base's accuracy on the curve's own metric, per seed
    measured["collapse_step"] = {
        f"seed-{s}": _collapse_step(measured["curve"][f"seed-{s}"], C3_COLLAPSE_FRACTION * (
            base if nested_get(runs[s].config, "run", "eval_greedy") is False else base_greedy)) for s in seeds}
    if ci.has_interval:  # the smallest shift of the mean accuracy (from any fixed level) 5% / 80% t tests detect
        measured["mdd"] = min_detectable_difference(ci.std, ci.n)
    if ci.n >= 2:
        measured["bootstrap"] = bootstrap_ci(values).to_dict()
    horizon = max((int(nested_get(runs[s].config, "run", "steps") or 0) for s in seeds), default=0)
    levels_off, late = _c3_levels_off(ci, measured["curve"], horizon, collapse)
    if late is not None:
        measured["late_trend"] = late
    verdict = INCONCLUSIVE
    if ci.has_interval and ci.high < collapse:
        verdict = SUPPORTED
    elif ci.has_interval and ci.low >= base - EQUIV_MARGIN:
        verdict = CONTRADICTED
    elif levels_off:
        verdict = CONTRADICTED
    band = (f"[{fmt_points(ci.low, False)}, {fmt_points(ci.high, False)}]" if ci.has_interval
            else "(1 seed, no interval)")
    last = [c[-1][1] for c in measured["curve"].values() if c]
    summary = (f"{name} {PRIMARY_METRIC} {fmt_points(ci.mean, False)}% {band} vs base {fmt_points(base, False)}%, "
               f"n={ci.n} seeds (collapse: upper end below {fmt_points(collapse, False)}%)"
               + (f"; last held-out curve point {fmt_points(sum(last) / len(last), False)}% on average" if last
                  else ""))
    if late is not None:
        sl = late["points_per_100_steps"]
        worst = fmt_points(late["projected_low"], False)
        summary += (f"; late held-out slope {sl['mean']:+.1f} [{sl['low']:+.1f}, {sl['high']:+.1f}] points per "
                    f"100 steps, so after another {horizon} steps at worst {worst}% "
                    f"({'levels off above' if levels_off else 'may reach'} the collapse line)")
    return verdict, measured, summary


def claim_c3(col: Collection) -> dict:
    """C3 judged on ``isft-`` (its runs' readings in ``measured``) and on every arm that trains ISFT- otherwise
    (``measured["arms"]``, one verdict each with its learning rate); the claim is supported when any of them
    collapses, the conditions said in the summary, else it takes the plain arm's verdict."""
    arms = isft_minus_arms(col)
    missing = [] if arms else paired_runs(col, ["isft-"])[1]
    base = base_metric(col, PRIMARY_METRIC)
    if not col.base_evals or not math.isfinite(base):
        missing.append(f"base_eval.json with {PRIMARY_METRIC} (the base model's held-out evaluation)")
    primary = next(iter(arms), "isft-")
    judged = {name: _judge(name, runs, col, base) for name, runs in (arms or {primary: {}}).items()}
    measured = judged[primary][1]
    ci = measured.get("mean_ci", {})
    n = ci.get("n", 0)
    if not missing and not n:
        missing.append(f"{PRIMARY_METRIC} in the eval.json of isft- runs")
    verdict, summary = INCONCLUSIVE, ""
    if not missing:
        verdict, _, summary = judged[primary]
        if len(judged) > 1:
            measured["arms"] = {name: {"lr": m["lr"], "n": m["mean_ci"]["n"], "mean_ci": m["mean_ci"],
                                       "collapse_step": m["collapse_step"], "verdict": v,
                                       **({"late_trend": m["late_trend"]} if "late_trend" in m else {})}
                                for name, (v, m, _) in judged.items()}
            parts = []
            for name, (v, m, _) in judged.items():
                mc, steps = m["mean_ci"], [x for x in m["collapse_step"].values() if x is not None]
                band = (f" [{fmt_points(mc['low'], False)}, {fmt_points(mc['high'], False)}]"
                        if mc.get("half_width") is not None and math.isfinite(mc["half_width"]) else "")
                when = (f", its held-out curve below half the base's by step {max(steps)} in {len(steps)} of "
                        f"{len(m['collapse_step'])} seeds" if steps else "")
                lr = f" (lr {m['lr']:g})" if isinstance(m["lr"], (int, float)) else ""
                parts.append(f"{name}{lr} {fmt_points(mc['mean'], False)}%{band}: {v}{when}")
            summary += "; by arm: " + "; ".join(parts)
            if verdict != SUPPORTED and any(v == SUPPORTED for v, _, _ in judged.values()):
                verdict = SUPPORTED
    power = None
    if n:
        power = (f"n={n} seeds, 95% half width {fmt_points(ci['half_width'], False)} points, detectable difference "
                 f"{fmt_points(measured['mdd'], False)} points at 80% power" if "mdd" in measured else
                 "one seed: no interval")
    return claim_record("C3, negatives alone collapse: ISFT- (negatives only) falls to 0% (paper, Countdown)",
                        f"isft- held-out {PRIMARY_METRIC} far below the base model's",
                        ["isft-", "base model evaluation"], [], measured, summary, verdict, power, missing)


__all__ = ["claim_c3", "isft_minus_arms", "late_trend"]
