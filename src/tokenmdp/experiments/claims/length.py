"""The verdicts on C4 (length: under GRPO's ``1/|o|`` weighting incorrect responses grow longer, not under
``dr_grpo`` or ``isft+``; judged from the runs' ``length/incorrect`` slopes, the exact tier's length shift reported
beside them) and C5 (the expectation view, exact tier only: which presets' expected updates point along
``grad J``). :func:`tokenmdp.experiments.claims.evaluate_claims` collects them with C1-C3; the shared helpers and
thresholds are :mod:`tokenmdp.experiments.claims.common`.
"""

from __future__ import annotations

import math

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.claims.common import (C4_RUN_TOKENS, C4_SLOPE_MARGIN, C5_COSINE_CONTRADICT, C5_COSINE_TOL,
                                                C5_IDENTITIES, claim_record, combine_verdicts, finished_runs, fmt_g,
                                                fmt_seeds, nested_get, paired_runs, reference_algo)
from tokenmdp.experiments.runs import Collection, RunData
from tokenmdp.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED, direction_verdict, ls_slope, paired_difference


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


def claim_c4(col: Collection, exact: dict | None) -> dict:
    ref, note = reference_algo(col)
    labels = {"grpo": "grpo or grpo_nokl"}
    algos = [ref, "dr_grpo", "isft+"]
    missing: list[str] = []
    trends = {a: {s: length_trend(r) for s, r in finished_runs(col, a).items()} for a in algos}
    tests: dict = {}
    steps = [nested_get(r.config, "run", "steps") for r in finished_runs(col, ref).values()]
    horizon = max((int(x) for x in steps if isinstance(x, int) and x > 0), default=0)
    margin = C4_RUN_TOKENS / horizon if horizon else C4_SLOPE_MARGIN
    for other in (None, "dr_grpo", "isft+"):
        seeds, miss, _ = paired_runs(col, [ref] if other is None else [ref, other], labels)
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
        tests[name] = {"seeds": seeds, **d.to_dict(), "verdict": direction_verdict(d, 1, margin)}
    # the exact tier's change of E[length | incorrect] under its dynamics: predicted > 0 for grpo_nokl, <= 0 for
    # dr_grpo (reported beside the runs' verdict; on an MDP this small it is a property of the MDP, not a theorem)
    shift = nested_get(exact, "identities", "len_incorrect_shift")
    exact_out = None
    if isinstance(shift, dict):
        g, dr = shift.get("grpo_nokl"), shift.get("dr_grpo")
        ok = isinstance(g, (int, float)) and isinstance(dr, (int, float))
        exact_out = {"grpo_nokl": g, "dr_grpo": dr, "agrees": (g > 0 and dr <= 0) if ok else None,
                     "grpo_nokl_larger": (g > dr) if ok else None,
                     "slope_at_start": nested_get(exact, "identities", "len_incorrect_slope")}
    measured = {"reference": ref, "reference_note": note, "unit": "tokens per step", "margin": margin,
                "runs": {a: {f"seed-{s}": t for s, t in trends[a].items()} for a in algos}, "tests": tests,
                "exact_len_incorrect_shift": exact_out}
    means = {a: [t["slope"] for t in trends[a].values() if math.isfinite(t["slope"])] for a in algos}
    texts = ["length/incorrect slope (tokens/step): " + ", ".join(
        f"{a} {sum(v) / len(v):+.2f}" for a, v in means.items() if v)] if any(means.values()) else []
    texts += [f"{name} = {t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}] ({t['verdict']})"
              if math.isfinite(t["low"]) else f"{name} = {t['mean']:+.2f} (1 seed)" for name, t in tests.items()]
    if tests:
        texts.append(f"n={max(t['n'] for t in tests.values())} seeds")
    if exact_out:
        texts.append(f"exact tier E[len | incorrect] shift: grpo_nokl {fmt_g(exact_out['grpo_nokl'])}, dr_grpo "
                     f"{fmt_g(exact_out['dr_grpo'])} (signs as predicted: {'yes' if exact_out['agrees'] else 'no'}; "
                     f"grpo_nokl larger: {'yes' if exact_out['grpo_nokl_larger'] else 'no'})")
    power = ("detectable slope differences at 80% power: " + ", ".join(
        f"{name} {t['mdd']:.2f}" for name, t in tests.items())) if tests else None
    return claim_record(
        "C4, length: under GRPO's per-sequence 1/|o| weighting incorrect responses grow longer; not under ISFT+, "
        "nor under Dr. GRPO's constant divisor",
        f"slope of length/incorrect: {ref} > 0, {ref} - dr_grpo > 0, {ref} - isft+ > 0 (paired over seeds)",
        algos, ["exact tier"], measured, "; ".join(texts), combine_verdicts([t["verdict"] for t in tests.values()]),
        power, missing)


# --- C5: the expectation view ------------------------------------------------------------------------------------


def claim_c5(exact: dict | None) -> dict:
    ident = nested_get(exact, "identities") or {}
    cosines = {k: float(ident[k]) for k in C5_IDENTITIES if isinstance(ident.get(k), (int, float))}
    presets = nested_get(exact, "presets") or {}
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
                "presets": table, "differ_from_grad_J": [n for n, _ in differ], "skipped": nested_get(exact, "skipped"),
                "grad_J_norm": nested_get(exact, "grad_J_norm"), "group_size": nested_get(exact, "group_size"),
                "tolerance": C5_COSINE_TOL}
    texts = []
    if cosines:
        texts.append("cosine with grad J: " + ", ".join(
            f"{C5_IDENTITIES[k]} " + ("1" if g == 0 else f"1 - {fmt_g(g)}" if g > 0 else f"1 + {fmt_g(-g)}")
            for k, g in gaps.items()))
    if differ:
        texts.append("differ: " + ", ".join(
            f"{n} cos {p['cosine']:.4f}" + (f" (norm ×{p['norm_ratio']:.3g})"
                                            if isinstance(p["norm_ratio"], (int, float)) else "")
            for n, p in differ))
    elif table:
        texts.append("every preset's expected update is along grad J")
    return claim_record(
        "C5, the expectation view: with a 0/1 reward, REINFORCE, ISFT+ and ISFT- point the same way in expectation",
        "exact tier: isft+ / isft- with a sequence-sum loss and dr_grpo have cosine 1 with grad J; length and std "
        "normalisers bend the others", ["exact tier"], [], measured, "; ".join(texts), verdict,
        "exact enumeration: no sampling noise" if cosines else None, missing)
