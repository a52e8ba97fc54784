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
tier. Thresholds are the constants of :mod:`tokenmdp.experiments.claims.common`, each with its reason. Only run
folders (and the exact tier's dict) are read; no model code.

This module holds C1, C2 and :func:`evaluate_claims`; C3 is :mod:`tokenmdp.experiments.claims.collapse`, C4 and C5
:mod:`tokenmdp.experiments.claims.length`, the
shared readers, formatting and thresholds :mod:`tokenmdp.experiments.claims.common` (the public names of all
five importable from :mod:`tokenmdp.experiments.claims`),
and the tables and ``claims.json`` :mod:`tokenmdp.experiments.claims.render`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.claims.common import (
    C1_COSINE_TOL,
    C1_CURVE_ATOL,
    C1_EXACT_ATOL,
    C1_EXACT_RTOL,
    C1_FLIP_SAMPLES,
    C1_PARAM_RTOL,
    EQUIV_MARGIN,
    PRIMARY_METRIC,
    SECONDARY_METRIC,
    claim_record,
    combine_verdicts,
    fmt_g,
    fmt_interval,
    fmt_points,
    nested_get,
    paired_runs,
    reference_algo,
    run_metric,
)
from tokenmdp.experiments.claims.collapse import claim_c3
from tokenmdp.experiments.claims.length import claim_c4, claim_c5
from tokenmdp.experiments.runs import Collection, RunData
from tokenmdp.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    PairedDiff,
    direction_verdict,
    equivalence_verdict,
    paired_difference,
)


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


def first_divergence(a, b, keys=("reward/mean", "length/mean")) -> tuple[int | None, float]:
    """The first step at which the per-step training curves ``keys`` of two runs differ (beyond
    :data:`C1_CURVE_ATOL`), and how much ``reward/mean`` moved there; (None, 0) when they never differ."""
    steps = [s for s in a.index if s in b.index and s > 0]
    for step in sorted(steps):
        diffs = [abs(float(a.at[step, k]) - float(b.at[step, k])) for k in keys if k in a.columns and k in b.columns
                 and math.isfinite(float(a.at[step, k])) and math.isfinite(float(b.at[step, k]))]
        if any(d > C1_CURVE_ATOL for d in diffs):
            reward = (abs(float(a.at[step, "reward/mean"]) - float(b.at[step, "reward/mean"]))
                      if "reward/mean" in a.columns and "reward/mean" in b.columns else math.nan)
            return int(step), reward
    return None, 0.0


def changed_samples(a: RunData, b: RunData, step: int) -> int | None:
    """How many of step ``step``'s completions differ between two runs (their ``samples.parquet``, rows in batch
    order); None when either run logged no samples."""
    import pandas as pd

    try:
        sa, sb = (pd.read_parquet(r.path / "samples.parquet", columns=["step", "completion"]) for r in (a, b))
    except (OSError, ValueError, KeyError):
        return None
    ca = sa.loc[sa["step"] == step, "completion"].tolist()
    cb = sb.loc[sb["step"] == step, "completion"].tolist()
    if len(ca) != len(cb):
        return max(len(ca), len(cb))
    return sum(x != y for x, y in zip(ca, cb))


def _batch_size(run: RunData) -> int | None:
    p, g = nested_get(run.config, "rollout", "prompts_per_step"), nested_get(run.config, "rollout", "group_size")
    return int(p) * int(g) if isinstance(p, int) and isinstance(g, int) else None


def _c1_seed(a: RunData, b: RunData) -> dict:
    params = param_difference(a.path / "final", b.path / "final")
    curves = {k: _curve_diff(a.metrics, b.metrics, k) for k in C1_CURVES}
    finals = {k: {"grpo_nokl": run_metric(a, k), "isft+-adv": run_metric(b, k)} for k in (PRIMARY_METRIC,
                                                                                            SECONDARY_METRIC)}
    lr = nested_get(a.config, "optim", "lr")
    if params and isinstance(lr, (int, float)) and lr > 0:
        params["max_abs_diff_in_lr"] = params["max_abs_diff"] / lr
    known = [v for v in curves.values() if v is not None]
    same = all(v <= C1_CURVE_ATOL for v in known) if known else None
    step, moved = first_divergence(a.metrics, b.metrics) if not (a.metrics.empty or b.metrics.empty) else (None, 0.0)
    batch = _batch_size(a)
    changed = changed_samples(a, b, step) if step is not None else 0
    if changed is None:  # no samples logged: judge by the mean reward's move (at most one sample's worth)
        flip = step is not None and step > 1 and batch is not None and moved <= C1_FLIP_SAMPLES / batch + 1e-9
    else:
        flip = step is not None and step > 1 and changed <= C1_FLIP_SAMPLES
    cos = None
    if "equiv/cosine_on_policy" in a.metrics.columns:
        vals = a.metrics["equiv/cosine_on_policy"]
        norms = [c for c in ("equiv/grad_norm_grpo", "equiv/grad_norm_isft") if c in a.metrics.columns]
        if len(norms) == 2:  # a step whose measured rows all sit in groups that agree has two zero gradients:
            vals = vals[(a.metrics[norms[0]] != 0) | (a.metrics[norms[1]] != 0)]  # no angle (logged as 0)
        vals = vals.dropna()
        cos = float(vals.min()) if len(vals) else None
    cos_ok = cos is None or cos >= 1 - C1_COSINE_TOL
    rel = params["rel"] if params else None
    # separated after bit-equal steps while every step's gradients stayed equal (C1_FLIP_SAMPLES' note)
    rounding = bool(same is False and not flip and step is not None and step > 1 and cos is not None and cos_ok)
    if same and (rel is None or rel <= C1_PARAM_RTOL) and cos_ok:
        verdict = SUPPORTED
    elif same is False and (flip or rounding) and cos_ok:
        verdict = SUPPORTED  # the same steps until a float-level difference changed the samples
    elif same is False or not cos_ok:  # separated from the start, or by more than one sample, or bent steps
        verdict = CONTRADICTED
    else:
        verdict = INCONCLUSIVE
    return {"params": params, "curve_max_abs_diff": curves, "final": finals, "curves_equal": same,
            "first_divergence_step": step, "reward_moved_at_divergence": moved, "batch_size": batch,
            "samples_changed_at_divergence": changed,
            "one_sample_flip": flip, "rounding_separation": rounding, "min_equiv_cosine": cos, "verdict": verdict}


def _c1(col: Collection, exact: dict | None) -> dict:
    seeds, missing, runs = paired_runs(col, ["grpo_nokl", "isft+-adv"])
    ident = nested_get(exact, "identities", "isft+-adv_vs_grpo_nokl_max_abs_diff")
    ident_rel = nested_get(exact, "identities", "isft+-adv_vs_grpo_nokl_rel_diff")
    per_seed = {f"seed-{s}": _c1_seed(runs["grpo_nokl"][s], runs["isft+-adv"][s]) for s in seeds} if not missing \
        else {}
    measured = {"seeds": seeds, "per_seed": per_seed, "exact_max_abs_diff": ident, "exact_rel_diff": ident_rel,
                "param_rtol": C1_PARAM_RTOL, "curve_atol": C1_CURVE_ATOL, "exact_rtol": C1_EXACT_RTOL,
                "exact_atol": C1_EXACT_ATOL}
    verdict = combine_verdicts([r["verdict"] for r in per_seed.values()])
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
        parts.append(f"max |θ(isft+-adv) - θ(grpo_nokl)| = {fmt_g(worst['max_abs_diff'])} (relative "
                     f"{fmt_g(worst['rel'])}, tolerance {C1_PARAM_RTOL:.0e})")
    elif per_seed:
        parts.append("final parameters not found (final/*.safetensors)")
    flips = {k: r["first_divergence_step"] for k, r in per_seed.items() if r["first_divergence_step"] is not None}
    if curves and not flips:
        parts.append(f"curves (reward, length, held-out) differ by at most {fmt_g(max(curves))}")
    for k, step in flips.items():
        r = per_seed[k]
        n = r.get("samples_changed_at_divergence")
        how = ("one sample changed (a float-level flip)" if r["one_sample_flip"] else
               f"{n} samples differ (float rounding amplified by the optimizer: the per-step gradients stay equal)"
               if r.get("rounding_separation") else f"{n} samples differ" if n is not None else "the batches differ")
        parts.append(f"{k}: bit-equal steps 1-{step - 1}, then {how} at step {step}" if step > 1 else
                     f"{k}: the runs differ from step 1 ({how})")
    cosines = [r["min_equiv_cosine"] for r in per_seed.values() if r["min_equiv_cosine"] is not None]
    if cosines:
        parts.append(f"per-step cosine of the GRPO and weighted-SFT gradients on GRPO's batches >= "
                     f"1 - {fmt_g(1 - min(cosines))}")
    gaps = [r["final"][PRIMARY_METRIC]["isft+-adv"] - r["final"][PRIMARY_METRIC]["grpo_nokl"] for r in
            per_seed.values()]
    gaps = [g for g in gaps if math.isfinite(g)]
    if gaps:
        parts.append(f"held-out {PRIMARY_METRIC} gap up to {fmt_points(max(gaps, key=abs))} points")
    if per_seed:
        parts.append(f"n={len(per_seed)} seeds")
    if isinstance(ident, (int, float)) or isinstance(ident_rel, (int, float)):
        parts.append(f"exact tier: steps differ by {fmt_g(ident)}" + (f" (relative {fmt_g(ident_rel)})"
                                                                   if isinstance(ident_rel, (int, float)) else ""))
    else:
        parts.append("exact tier not given")
    return claim_record(
        "C1, the reduction: with no KL and one on-policy update, GRPO and advantage/length-weighted ISFT+- take the "
        "same step", "grpo_nokl and isft+-adv runs with the same seed follow the same trajectory (equal final "
        "parameters and curves, or bit-equal until float rounding changes one sample)", ["grpo_nokl", "isft+-adv"],
        ["exact tier"], measured, "; ".join(parts), verdict,
        "deterministic comparison (seeded sampling: equal steps give equal samples), not a statistical test",
        missing)


# --- C2: the comparison ------------------------------------------------------------------------------------------


def _paired_runs(ra: dict, rb: dict, seeds: list, key: str) -> PairedDiff | None:
    a = [run_metric(ra[s], key) for s in seeds]
    b = [run_metric(rb[s], key) for s in seeds]
    try:
        return paired_difference(a, b)
    except TokenMDPError:
        return None


def _c2_part(col: Collection, other: str, ref: str, labels: dict, reading: str) -> tuple[dict, PairedDiff | None,
                                                                                     list[str]]:
    """One paired comparison ``other - ref`` of the held-out metrics, read as "reaches" (equivalence within
    :data:`EQUIV_MARGIN`) or "below" (one-sided, :func:`direction_verdict`)."""
    seeds, missing, runs = paired_runs(col, [other, ref], labels)
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
    ref, note = reference_algo(col)
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
            texts.append(f"{name} = {fmt_points(d.mean)} points {fmt_interval(d)}, p={fmt_g(d.p_value)}, detectable "
                         f"{fmt_points(d.mdd, False)} ({part['reading']}: {part['verdict']})")
            powers.append(f"{fmt_points(d.mdd, False)} points ({name}, n={d.n})")
    n = max((len(p["seeds"]) for p in parts.values()), default=0)
    summary = "; ".join(texts) + (f"; n={n} seeds, {PRIMARY_METRIC}, margin {100 * EQUIV_MARGIN:g} points"
                                  if texts else "")
    measured = {"reference": ref, "reference_note": note, "metric": PRIMARY_METRIC, "margin": EQUIV_MARGIN,
                **parts}
    power = ("detectable at 80% power, 5% two-sided: " + ", ".join(powers)
             + f"; 'reaches' needs the 95% interval inside ±{100 * EQUIV_MARGIN:g} points") if powers else None
    return claim_record(
        "C2, the comparison: ISFT+- reaches GRPO's accuracy; ISFT+ (positives only) is somewhat below",
        f"paired over seeds, held-out {PRIMARY_METRIC}: isft+- - {ref} within ±{100 * EQUIV_MARGIN:g} points; "
        f"isft+ - {ref} below 0", [ref, "isft+-", "isft+"], [], measured, summary,
        combine_verdicts([p["verdict"] for p in parts.values()]), power, missing)


# --- the whole set, and its outputs ------------------------------------------------------------------------------


def evaluate_claims(col: Collection, exact: dict | None = None, *, strict: bool = False) -> dict:
    """``{"C1": {...}, ..., "C5": {...}}`` (see the module docstring). ``strict=True``: a claim that runs given
    cannot measure is an error naming every such claim and what it lacks, instead of a ``not measured`` verdict."""
    claims = {"C1": _c1(col, exact), "C2": _c2(col), "C3": claim_c3(col), "C4": claim_c4(col, exact),
              "C5": claim_c5(exact)}
    if strict:
        lacking = [f"{cid} needs {', '.join(c['missing'])}" for cid, c in claims.items() if c["missing"]]
        if lacking:
            raise TokenMDPError("claims that cannot be computed from the runs given: " + "; ".join(lacking))
    return claims


__all__ = ["C1_CURVES", "changed_samples", "evaluate_claims", "first_divergence", "param_difference"]
