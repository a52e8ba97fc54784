"""Verdicts on the claims of "RL in Name Only?" (arXiv 2505.13697), computed from a comparison's run folders (a
:class:`~tokenmdp.experiments.runs.Collection`) and, optionally, the exact tier's result dict.

Each claim comes back as ``{"claim", "prediction", "measured", "summary", "verdict", "power", "needs", "optional",
"missing"}``: ``verdict`` is ``supported``, ``contradicted``, ``inconclusive at this power`` or, when runs it needs
are absent, ``not measured`` (``missing`` names them, e.g. ``"isft- (seeds 0-2)"``; ``strict=True`` raises one
:class:`TokenMDPError` naming every such claim instead).

* C1, the reduction: with no KL and one on-policy update, ``grpo_nokl`` and ``isft+-adv`` take the same step, so
  with the same seed they follow the same trajectory (sampling is seeded: equal parameters give equal samples).
* C2, the comparison: ``isft+-`` reaches GRPO's held-out accuracy; ``isft+`` is somewhat below (paired over seeds:
  every algorithm of a seed trained on the same prompts).
* C3, negatives alone collapse: ``isft-`` falls far below the base model.
* C4, length: under GRPO's ``1/|o|`` weighting incorrect responses grow longer, not under ``dr_grpo`` or ``isft+``.
* C5, the expectation view (exact tier only): ISFT+ and ISFT- with a sequence-sum loss and Dr. GRPO point along
  ``grad J``; where and by how much every preset's expected update differs from it.

C1 and C4 judge from the runs; the exact tier's figures are reported beside them (a C1 exact step difference
beyond float tolerance overrides to ``contradicted``) but cannot stand in for missing runs. C5 needs the exact
tier. Thresholds are the module constants below, each with its reason. Only run folders (and the exact tier's
dict) are read; no model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.runs import Collection, RunData
from tokenmdp.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    PairedDiff,
    bootstrap_ci,
    direction_verdict,
    equivalence_verdict,
    ls_slope,
    mean_ci,
    paired_difference,
)

NOT_MEASURED = "not measured"
CLAIM_IDS = ("C1", "C2", "C3", "C4", "C5")

# --- thresholds (module constants: each one is a choice, and the reason sits beside it) ---------------------------

# C1: the two losses are the same function computed in a different order, so float32 rounding makes their gradients
# differ by ~1e-7 relative; Adam's step is ~lr per element whatever the gradient's size, so trajectories that saw
# different samples differ by ~lr per step (20 steps of 1e-4: 2e-3 of a largest parameter ~1), while rounding alone
# stays orders of magnitude below 1e-4 of the largest parameter.
C1_PARAM_RTOL = 1e-4
# C1: the per-step curves are means of the same samples' rewards and lengths when the steps are equal (bit-equal in
# practice); a single different sample moves ``reward/mean`` by 1/B (>= 1e-3 for any batch up to 1,000 samples).
C1_CURVE_ATOL = 1e-6
# C1: the exact tier's two expected steps agree up to the float32 cast of the advantages (relative ~1e-7, its
# docstring); 1e-5 of the step's norm leaves a factor 100 for that, and any real difference of the steps is O(1).
# Its absolute difference is judged against 1e-6 only when the relative one is absent (steps of norm ~1).
C1_EXACT_RTOL = 1e-5
C1_EXACT_ATOL = 1e-6
# C2, C3: "reaches" means within 2 accuracy points: the paper's GRPO vs F-ISFT+- gaps are 0.1-1.9 points in three of
# its four settings, and 2 points is about one binomial standard error of an accuracy near 50% on 500 held-out
# problems (sqrt(0.25 / 500) = 2.2 points), so a smaller gap is within one evaluation's noise.
EQUIV_MARGIN = 0.02
# C2, C3: the held-out metric judged: sampled pass@1 averages k samples a problem (less noisy than the one greedy
# answer) at the sampling temperature the algorithms trained with; greedy accuracy is reported beside it.
PRIMARY_METRIC = "sampled/pass@1"
SECONDARY_METRIC = "greedy/pass@1"
# C3: "collapse" is read as the upper end of isft-'s 95% interval below half the base model's accuracy (the paper
# reports 0.00%; half the base is far below any seed-to-seed spread of the other algorithms).
C3_COLLAPSE_FRACTION = 0.5
# C4: a slope difference below 0.05 tokens a step is under one token over the default 20-step comparison: no
# practical length effect, so an interval wholly below it contradicts "grows longer".
C4_SLOPE_MARGIN = 0.05
# C5: exact enumeration has no sampling noise: an identity holds to rounding (1e-6 is float32-safe); a cosine more
# than 1e-3 from 1 is a real difference of direction; between the two is left open.
C5_COSINE_TOL = 1e-6
C5_COSINE_CONTRADICT = 1e-3

C5_IDENTITIES = {"isft+_seqsum_cosine": "isft+ (sequence sum)", "isft-_seqsum_cosine": "isft- (sequence sum)",
                 "dr_grpo_cosine": "dr_grpo"}


# --- reading the collection --------------------------------------------------------------------------------------


def _finished(col: Collection, algo: str) -> dict:
    return {r.seed: r for r in col.runs_of(algo, finished=True)}


def _expected_seeds(col: Collection) -> list:
    """The seeds the comparisons asked for (a list, or a count: seeds 0..n-1) and those of the runs present."""
    seeds = set()
    for info in col.compares:
        asked = (info.get("settings") or {}).get("seeds", [])
        seeds |= set(range(asked)) if isinstance(asked, int) else {s for s in asked if isinstance(s, int)}
    seeds |= {r.seed for r in col.runs if r.seed is not None}
    return sorted(seeds)


def fmt_seeds(seeds) -> str:
    """``[0, 1, 2]`` -> ``"seeds 0-2"``, ``[3]`` -> ``"seed 3"``, ``[0, 2]`` -> ``"seeds 0, 2"``."""
    seeds = sorted(s for s in seeds if s is not None)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(str(s) for s in seeds)


def _pair(col: Collection, algos: list[str], labels: dict | None = None) -> tuple[list, list[str], dict]:
    """Seeds every one of ``algos`` has a finished run of, what is missing when there is none, and the runs."""
    runs = {a: _finished(col, a) for a in algos}
    expected = _expected_seeds(col)
    missing = []
    for a in algos:
        if not runs[a]:
            name = (labels or {}).get(a, a)
            missing.append(f"{name} ({fmt_seeds(expected)})" if expected else name)
    common = sorted(set.intersection(*(set(r) for r in runs.values())), key=lambda s: (s is None, s or 0))
    if not missing and not common:
        union = set().union(*(set(r) for r in runs.values()))
        missing = [f"{a} ({fmt_seeds(union - set(runs[a]))})" for a in algos if union - set(runs[a])]
    return common, missing, runs


def _reference(col: Collection) -> tuple[str, str | None]:
    if _finished(col, "grpo") or not _finished(col, "grpo_nokl"):
        return "grpo", None
    return "grpo_nokl", "no grpo runs: grpo_nokl (GRPO without the KL term) stands in"


def _eval_value(run: RunData, key: str) -> float:
    ev = run.eval or {}
    v = ev.get("metrics", ev).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _base_value(col: Collection, key: str) -> float:
    vals = [float(v) for e in col.base_evals for v in [e.get("metrics", e).get(key)] if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else math.nan


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# --- formatting --------------------------------------------------------------------------------------------------


def _pts(x: float, signed: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "inf" if x == math.inf else "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _interval(d: PairedDiff, scale: float = 100.0, digits: int = 1) -> str:
    if not d.has_interval:
        return "[no interval: 1 seed]"
    return f"[{d.low * scale:+.{digits}f}, {d.high * scale:+.{digits}f}]"


def _g(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2g}"


def _record(claim: str, prediction: str, needs: list[str], optional: list[str], measured: dict, summary: str,
            verdict: str, power: str | None, missing: list[str]) -> dict:
    if missing:
        verdict = NOT_MEASURED
        summary = f"not measured: missing {', '.join(missing)}" + (f"; {summary}" if summary else "")
    return {"claim": claim, "prediction": prediction, "measured": measured, "summary": summary, "verdict": verdict,
            "power": power, "needs": needs, "optional": optional, "missing": missing}


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return CONTRADICTED if CONTRADICTED in verdicts else INCONCLUSIVE


# --- C1: the reduction -------------------------------------------------------------------------------------------


def _tensor(handle, path: Path, key: str) -> np.ndarray:
    """One tensor as numpy; bfloat16 (which numpy lacks) is widened to float32 from the raw bytes."""
    try:
        return handle.get_tensor(key)
    except TypeError:
        dtype = handle.get_slice(key).get_dtype()
        if dtype != "BF16":
            raise TokenMDPError(f"{path}: tensor {key!r} has dtype {dtype}, which numpy cannot read") from None
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            info = json.loads(fh.read(size))[key]
        begin, end = info["data_offsets"]
        raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=8 + size + begin)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def param_difference(folder_a: Path, folder_b: Path) -> dict | None:
    """Largest ``|a - b|`` over every tensor of the ``*.safetensors`` files of two model folders, the largest
    ``|a|`` and their ratio ``rel``; None when either folder holds no safetensors file."""
    from safetensors import safe_open

    files = [sorted(Path(f).glob("*.safetensors")) for f in (folder_a, folder_b)]
    if not files[0] or not files[1]:
        return None
    handles = []
    for fs in files:
        index = {}
        for f in fs:
            h = safe_open(str(f), framework="np")
            index.update({k: (h, f) for k in h.keys()})
        handles.append(index)
    keys_a, keys_b = set(handles[0]), set(handles[1])
    if keys_a != keys_b:
        return {"max_abs_diff": math.inf, "max_abs_param": math.nan, "rel": math.inf,
                "n_tensors": len(keys_a & keys_b), "mismatch": sorted(keys_a ^ keys_b)[:5]}
    diff, top = 0.0, 0.0
    for key in sorted(keys_a):
        a, b = (_tensor(h[key][0], h[key][1], key) for h in handles)
        if a.shape != b.shape:
            return {"max_abs_diff": math.inf, "max_abs_param": math.nan, "rel": math.inf,
                    "n_tensors": len(keys_a), "mismatch": [f"{key}: shape {a.shape} vs {b.shape}"]}
        if not np.issubdtype(a.dtype, np.floating):
            a, b = a.astype(np.float64), b.astype(np.float64)
        if a.size:
            diff = max(diff, float(np.abs(a - b).max()))
            top = max(top, float(np.abs(a).max()))
    rel = diff / top if top > 0 else (0.0 if diff == 0 else math.inf)
    return {"max_abs_diff": diff, "max_abs_param": top, "rel": rel, "n_tensors": len(keys_a), "mismatch": []}


def _curve_diff(a, b, key: str) -> float | None:
    if a.empty or b.empty or key not in a.columns or key not in b.columns:
        return None
    d = (a[key].astype(float) - b[key].astype(float)).dropna()
    return float(d.abs().max()) if len(d) else None


C1_CURVES = ("reward/mean", "length/mean", "eval/accuracy")


def _c1_seed(a: RunData, b: RunData) -> dict:
    params = param_difference(a.path / "final", b.path / "final")
    curves = {k: _curve_diff(a.metrics, b.metrics, k) for k in C1_CURVES}
    finals = {k: {"grpo_nokl": _eval_value(a, k), "isft+-adv": _eval_value(b, k)} for k in (PRIMARY_METRIC,
                                                                                            SECONDARY_METRIC)}
    lr = _get(a.config, "optim", "lr")
    if params and isinstance(lr, (int, float)) and lr > 0:
        params["max_abs_diff_in_lr"] = params["max_abs_diff"] / lr
    known = [v for v in curves.values() if v is not None]
    same = all(v <= C1_CURVE_ATOL for v in known) if known else None
    rel = params["rel"] if params else None
    if rel is None:
        verdict = {True: SUPPORTED, False: CONTRADICTED, None: INCONCLUSIVE}[same]
    elif rel <= C1_PARAM_RTOL:
        verdict = SUPPORTED if same is not False else INCONCLUSIVE
    else:
        verdict = CONTRADICTED if same is False or (params and params["mismatch"]) else INCONCLUSIVE
    return {"params": params, "curve_max_abs_diff": curves, "final": finals, "curves_equal": same,
            "verdict": verdict}


def _c1(col: Collection, exact: dict | None) -> dict:
    seeds, missing, runs = _pair(col, ["grpo_nokl", "isft+-adv"])
    ident = _get(exact, "identities", "isft+-adv_vs_grpo_nokl_max_abs_diff")
    ident_rel = _get(exact, "identities", "isft+-adv_vs_grpo_nokl_rel_diff")
    per_seed = {f"seed-{s}": _c1_seed(runs["grpo_nokl"][s], runs["isft+-adv"][s]) for s in seeds} if not missing \
        else {}
    measured = {"seeds": seeds, "per_seed": per_seed, "exact_max_abs_diff": ident, "exact_rel_diff": ident_rel,
                "param_rtol": C1_PARAM_RTOL, "curve_atol": C1_CURVE_ATOL, "exact_rtol": C1_EXACT_RTOL,
                "exact_atol": C1_EXACT_ATOL}
    verdict = _combine([r["verdict"] for r in per_seed.values()])
    if isinstance(ident_rel, (int, float)):
        exact_apart = ident_rel > C1_EXACT_RTOL
    else:
        exact_apart = isinstance(ident, (int, float)) and ident > C1_EXACT_ATOL
    measured["exact_equal"] = None if ident is None and ident_rel is None else not exact_apart
    if exact_apart:
        verdict = CONTRADICTED
    params = [r["params"] for r in per_seed.values() if r["params"]]
    curves = [v for r in per_seed.values() for v in r["curve_max_abs_diff"].values() if v is not None]
    parts = []
    if params:
        worst = max(params, key=lambda p: p["rel"])
        parts.append(f"max |θ(isft+-adv) - θ(grpo_nokl)| = {_g(worst['max_abs_diff'])} (relative "
                     f"{_g(worst['rel'])}, tolerance {C1_PARAM_RTOL:.0e})")
    elif per_seed:
        parts.append("final parameters not found (final/*.safetensors)")
    if curves:
        parts.append(f"curves (reward, length, held-out) differ by at most {_g(max(curves))}")
    gaps = [r["final"][PRIMARY_METRIC]["isft+-adv"] - r["final"][PRIMARY_METRIC]["grpo_nokl"] for r in
            per_seed.values()]
    gaps = [g for g in gaps if math.isfinite(g)]
    if gaps:
        parts.append(f"held-out {PRIMARY_METRIC} gap up to {_pts(max(gaps, key=abs))} points")
    if per_seed:
        parts.append(f"n={len(per_seed)} seeds")
    if isinstance(ident, (int, float)) or isinstance(ident_rel, (int, float)):
        parts.append(f"exact tier: steps differ by {_g(ident)}" + (f" (relative {_g(ident_rel)})"
                                                                   if isinstance(ident_rel, (int, float)) else ""))
    else:
        parts.append("exact tier not given")
    return _record(
        "C1, the reduction: with no KL and one on-policy update, GRPO and advantage/length-weighted ISFT+- take the "
        "same step", "grpo_nokl and isft+-adv runs with the same seed follow the same trajectory (equal final "
        "parameters and curves)", ["grpo_nokl", "isft+-adv"], ["exact tier"], measured, "; ".join(parts), verdict,
        "deterministic comparison (seeded sampling: equal steps give equal samples), not a statistical test",
        missing)


# --- C2: the comparison ------------------------------------------------------------------------------------------


def _paired_runs(ra: dict, rb: dict, seeds: list, key: str) -> PairedDiff | None:
    a = [_eval_value(ra[s], key) for s in seeds]
    b = [_eval_value(rb[s], key) for s in seeds]
    try:
        return paired_difference(a, b)
    except TokenMDPError:
        return None


def _c2_part(col: Collection, other: str, ref: str, labels: dict, reading: str) -> tuple[dict, PairedDiff | None,
                                                                                     list[str]]:
    """One paired comparison ``other - ref`` of the held-out metrics, read as "reaches" (equivalence within
    :data:`EQUIV_MARGIN`) or "below" (one-sided, :func:`direction_verdict`)."""
    seeds, missing, runs = _pair(col, [other, ref], labels)
    out: dict = {"seeds": seeds, "verdict": None, "reading": reading}
    if missing:
        return out, None, missing
    diffs = {key: _paired_runs(runs[other], runs[ref], seeds, key) for key in (PRIMARY_METRIC, SECONDARY_METRIC)}
    out.update({key: d.to_dict() if d else None for key, d in diffs.items()})
    d = diffs[PRIMARY_METRIC]
    if d is None:
        return out, None, [f"{PRIMARY_METRIC} in eval.json of {other} and {ref}"]
    out["verdict"] = (equivalence_verdict(d, EQUIV_MARGIN) if reading == "reaches" else
                      direction_verdict(d, -1, EQUIV_MARGIN))
    return out, d, []


def _c2(col: Collection) -> dict:
    ref, note = _reference(col)
    labels = {"grpo": "grpo or grpo_nokl"}
    parts, diffs, missing = {}, {}, []
    for other, reading in (("isft+-", "reaches"), ("isft+", "below")):
        part, diffs[f"{other} - {ref}"], miss = _c2_part(col, other, ref, labels, reading)
        parts[f"{other} - {ref}"] = part
        missing += [m for m in miss if m not in missing]
    texts, powers = [], []
    for name, part in parts.items():
        d = diffs[name]
        if d is not None:
            texts.append(f"{name} = {_pts(d.mean)} points {_interval(d)}, p={_g(d.p_value)}, detectable "
                         f"{_pts(d.mdd, False)} ({part['reading']}: {part['verdict']})")
            powers.append(f"{_pts(d.mdd, False)} points ({name}, n={d.n})")
    n = max((len(p["seeds"]) for p in parts.values()), default=0)
    summary = "; ".join(texts) + (f"; n={n} seeds, {PRIMARY_METRIC}, margin {100 * EQUIV_MARGIN:g} points"
                                  if texts else "")
    measured = {"reference": ref, "reference_note": note, "metric": PRIMARY_METRIC, "margin": EQUIV_MARGIN,
                **parts}
    power = ("detectable at 80% power, 5% two-sided: " + ", ".join(powers)
             + f"; 'reaches' needs the 95% interval inside ±{100 * EQUIV_MARGIN:g} points") if powers else None
    return _record(
        "C2, the comparison: ISFT+- reaches GRPO's accuracy; ISFT+ (positives only) is somewhat below",
        f"paired over seeds, held-out {PRIMARY_METRIC}: isft+- - {ref} within ±{100 * EQUIV_MARGIN:g} points; "
        f"isft+ - {ref} below 0", [ref, "isft+-", "isft+"], [], measured, summary,
        _combine([p["verdict"] for p in parts.values()]), power, missing)


# --- C3: negatives alone collapse --------------------------------------------------------------------------------


def _curve_from_zero(run: RunData, col: Collection) -> list[list[float]]:
    m = run.metrics
    points = []
    if not m.empty and "eval/accuracy" in m.columns:
        points = [[int(s), float(v)] for s, v in m["eval/accuracy"].dropna().items()]
    if not points or points[0][0] != 0:
        greedy = _get(run.config, "run", "eval_greedy") is not False
        base = _base_value(col, SECONDARY_METRIC if greedy else PRIMARY_METRIC)
        if math.isfinite(base):
            points.insert(0, [0, base])
    return points


def _c3(col: Collection) -> dict:
    _, missing, runs = _pair(col, ["isft-"])
    runs = runs["isft-"]
    base = _base_value(col, PRIMARY_METRIC)
    if not col.base_evals or not math.isfinite(base):
        missing.append(f"base_eval.json with {PRIMARY_METRIC} (the base model's held-out evaluation)")
    seeds = sorted(runs, key=lambda s: (s is None, s or 0))
    values = [_eval_value(runs[s], PRIMARY_METRIC) for s in seeds]
    ci = mean_ci(values)
    measured: dict = {"seeds": seeds, "metric": PRIMARY_METRIC, "per_seed": dict(zip([f"seed-{s}" for s in seeds],
                                                                                     values)),
                      "greedy_per_seed": {f"seed-{s}": _eval_value(runs[s], SECONDARY_METRIC) for s in seeds},
                      "mean_ci": ci.to_dict(), "base": base, "base_greedy": _base_value(col, SECONDARY_METRIC),
                      "collapse_below": C3_COLLAPSE_FRACTION * base if math.isfinite(base) else math.nan,
                      "curve": {f"seed-{s}": _curve_from_zero(runs[s], col) for s in seeds},
                      "curve_note": "eval/accuracy of metrics.jsonl; step 0 is the base model (base_eval.json) "
                                    "when the run logged none"}
    if not missing and ci.n == 0:
        missing.append(f"{PRIMARY_METRIC} in the eval.json of isft- runs")
    verdict, summary = INCONCLUSIVE, ""
    if not missing:
        if ci.n >= 2:
            measured["bootstrap"] = bootstrap_ci(values).to_dict()
        if ci.has_interval and ci.high < C3_COLLAPSE_FRACTION * base:
            verdict = SUPPORTED
        elif ci.has_interval and ci.low >= base - EQUIV_MARGIN:
            verdict = CONTRADICTED
        band = f"[{_pts(ci.low, False)}, {_pts(ci.high, False)}]" if ci.has_interval else "(1 seed, no interval)"
        last = [c[-1][1] for c in measured["curve"].values() if c]
        summary = (f"isft- {PRIMARY_METRIC} {_pts(ci.mean, False)}% {band} vs base {_pts(base, False)}%, n={ci.n} "
                   f"seeds (collapse: upper end below {_pts(C3_COLLAPSE_FRACTION * base, False)}%)"
                   + (f"; last held-out curve point {_pts(sum(last) / len(last), False)}% on average" if last
                      else ""))
    power = (f"n={ci.n} seeds, 95% half width {_pts(ci.half_width, False)} points" if ci.has_interval else
             "one seed: no interval") if ci.n else None
    return _record("C3, negatives alone collapse: ISFT- (negatives only) falls to 0% (paper, Countdown)",
                   f"isft- held-out {PRIMARY_METRIC} far below the base model's", ["isft-", "base model evaluation"],
                   [], measured, summary, verdict, power, missing)


# --- C4: length --------------------------------------------------------------------------------------------------


def length_trend(run: RunData) -> dict:
    """``length/incorrect`` of the training samples: least-squares slope per step, and the means of the first and
    the last fifth of the logged steps (at least one step each) with their change."""
    m = run.metrics
    if m.empty or "length/incorrect" not in m.columns:
        return {"slope": math.nan, "first_fifth": math.nan, "last_fifth": math.nan, "change": math.nan}
    v = m["length/incorrect"].astype(float).dropna()
    w = max(1, len(v) // 5)
    first = float(v.iloc[:w].mean()) if len(v) else math.nan
    last = float(v.iloc[-w:].mean()) if len(v) else math.nan
    return {"slope": ls_slope(list(v.index), list(v.values)), "first_fifth": first, "last_fifth": last,
            "change": last - first}


def _c4(col: Collection, exact: dict | None) -> dict:
    ref, note = _reference(col)
    labels = {"grpo": "grpo or grpo_nokl"}
    algos = [ref, "dr_grpo", "isft+"]
    missing: list[str] = []
    trends = {a: {s: length_trend(r) for s, r in _finished(col, a).items()} for a in algos}
    tests: dict = {}
    for other in (None, "dr_grpo", "isft+"):
        seeds, miss, _ = _pair(col, [ref] if other is None else [ref, other], labels)
        missing += [m for m in miss if m not in missing]
        name = f"{ref} slope" if other is None else f"{ref} - {other}"
        if miss:
            continue
        a = [trends[ref][s]["slope"] for s in seeds]
        b = [0.0] * len(seeds) if other is None else [trends[other][s]["slope"] for s in seeds]
        try:
            d = paired_difference(a, b)
        except TokenMDPError:
            miss = f"length/incorrect in metrics.jsonl of {ref}" + (f" and {other}" if other else "")
            miss += f" ({fmt_seeds(seeds)})" if seeds and None not in seeds else ""
            if miss not in missing:
                missing.append(miss)
            continue
        tests[name] = {"seeds": seeds, **d.to_dict(), "verdict": direction_verdict(d, 1, C4_SLOPE_MARGIN)}
    # the exact tier's change of E[length | incorrect] under its dynamics: predicted > 0 for grpo_nokl, <= 0 for
    # dr_grpo (reported beside the runs' verdict; on an MDP this small it is a property of the MDP, not a theorem)
    shift = _get(exact, "identities", "len_incorrect_shift")
    exact_out = None
    if isinstance(shift, dict):
        g, dr = shift.get("grpo_nokl"), shift.get("dr_grpo")
        ok = isinstance(g, (int, float)) and isinstance(dr, (int, float))
        exact_out = {"grpo_nokl": g, "dr_grpo": dr, "agrees": (g > 0 and dr <= 0) if ok else None,
                     "grpo_nokl_larger": (g > dr) if ok else None,
                     "slope_at_start": _get(exact, "identities", "len_incorrect_slope")}
    measured = {"reference": ref, "reference_note": note, "unit": "tokens per step", "margin": C4_SLOPE_MARGIN,
                "runs": {a: {f"seed-{s}": t for s, t in trends[a].items()} for a in algos}, "tests": tests,
                "exact_len_incorrect_shift": exact_out}
    means = {a: [t["slope"] for t in trends[a].values() if math.isfinite(t["slope"])] for a in algos}
    texts = [f"length/incorrect slope (tokens/step): " + ", ".join(
        f"{a} {sum(v) / len(v):+.2f}" for a, v in means.items() if v)] if any(means.values()) else []
    texts += [f"{name} = {t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}] ({t['verdict']})"
              if math.isfinite(t["low"]) else f"{name} = {t['mean']:+.2f} (1 seed)" for name, t in tests.items()]
    if tests:
        texts.append(f"n={max(t['n'] for t in tests.values())} seeds")
    if exact_out:
        texts.append(f"exact tier E[len | incorrect] shift: grpo_nokl {_g(exact_out['grpo_nokl'])}, dr_grpo "
                     f"{_g(exact_out['dr_grpo'])} (signs as predicted: {'yes' if exact_out['agrees'] else 'no'}; "
                     f"grpo_nokl larger: {'yes' if exact_out['grpo_nokl_larger'] else 'no'})")
    power = ("detectable slope differences at 80% power: " + ", ".join(
        f"{name} {t['mdd']:.2f}" for name, t in tests.items())) if tests else None
    return _record(
        "C4, length: under GRPO's per-sequence 1/|o| weighting incorrect responses grow longer; not under ISFT+, "
        "nor under Dr. GRPO's constant divisor",
        f"slope of length/incorrect: {ref} > 0, {ref} - dr_grpo > 0, {ref} - isft+ > 0 (paired over seeds)",
        algos, ["exact tier"], measured, "; ".join(texts), _combine([t["verdict"] for t in tests.values()]), power,
        missing)


# --- C5: the expectation view ------------------------------------------------------------------------------------


def _c5(exact: dict | None) -> dict:
    ident = _get(exact, "identities") or {}
    cosines = {k: float(ident[k]) for k in C5_IDENTITIES if isinstance(ident.get(k), (int, float))}
    presets = _get(exact, "presets") or {}
    table = {name: {k: p.get(k) for k in ("cosine", "norm_ratio", "variance", "description")}
             for name, p in presets.items() if isinstance(p, dict)}
    differ = sorted(((n, p) for n, p in table.items()
                     if isinstance(p["cosine"], (int, float)) and p["cosine"] < 1 - C5_COSINE_TOL),
                    key=lambda item: item[1]["cosine"])
    missing = []
    if exact is None:
        missing.append("exact tier result")
    elif not cosines:
        missing.append("exact tier identities (" + ", ".join(C5_IDENTITIES) + ")")
    gaps = {k: 1.0 - c for k, c in cosines.items()}
    verdict = (SUPPORTED if cosines and all(abs(g) <= C5_COSINE_TOL for g in gaps.values()) else
               CONTRADICTED if any(abs(g) > C5_COSINE_CONTRADICT for g in gaps.values()) else INCONCLUSIVE)
    measured = {"identity_cosines": cosines, "missing_identities": [k for k in C5_IDENTITIES if k not in cosines],
                "presets": table, "differ_from_grad_J": [n for n, _ in differ], "skipped": _get(exact, "skipped"),
                "grad_J_norm": _get(exact, "grad_J_norm"), "group_size": _get(exact, "group_size"),
                "tolerance": C5_COSINE_TOL}
    texts = []
    if cosines:
        texts.append("cosine with grad J: " + ", ".join(
            f"{C5_IDENTITIES[k]} " + ("1" if g == 0 else f"1 - {_g(g)}" if g > 0 else f"1 + {_g(-g)}")
            for k, g in gaps.items()))
    if differ:
        texts.append("differ: " + ", ".join(
            f"{n} cos {p['cosine']:.4f}" + (f" (norm ×{p['norm_ratio']:.3g})"
                                            if isinstance(p["norm_ratio"], (int, float)) else "")
            for n, p in differ))
    elif table:
        texts.append("every preset's expected update is along grad J")
    return _record(
        "C5, the expectation view: with a 0/1 reward, REINFORCE, ISFT+ and ISFT- point the same way in expectation",
        "exact tier: isft+ / isft- with a sequence-sum loss and dr_grpo have cosine 1 with grad J; length and std "
        "normalisers bend the others", ["exact tier"], [], measured, "; ".join(texts), verdict,
        "exact enumeration: no sampling noise" if cosines else None, missing)


# --- the whole set, and its outputs ------------------------------------------------------------------------------


def evaluate_claims(col: Collection, exact: dict | None = None, *, strict: bool = False) -> dict:
    """``{"C1": {...}, ..., "C5": {...}}`` (see the module docstring). ``strict=True``: a claim that runs given
    cannot measure is an error naming every such claim and what it lacks, instead of a ``not measured`` verdict."""
    claims = {"C1": _c1(col, exact), "C2": _c2(col), "C3": _c3(col), "C4": _c4(col, exact), "C5": _c5(exact)}
    if strict:
        lacking = [f"{cid} needs {', '.join(c['missing'])}" for cid, c in claims.items() if c["missing"]]
        if lacking:
            raise TokenMDPError("claims that cannot be computed from the runs given: " + "; ".join(lacking))
    return claims
