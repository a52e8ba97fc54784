"""What every claim of :mod:`tokenmdp.experiments.claims` shares: the verdict words, the thresholds (each with its
reason), reading a :class:`~tokenmdp.experiments.runs.Collection` (finished runs by seed, the seeds asked for, the
held-out and base-model metrics), formatting numbers for the summaries, and the claim record itself
(:func:`claim_record`, :func:`combine_verdicts`). No claim is judged here.
"""

from __future__ import annotations

import math

from tokenmdp.experiments.runs import Collection, RunData
from tokenmdp.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED, PairedDiff

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
# C1: float rounding (the engine's behaviour log-probs against the teacher-forced ones, summation order) leaves the
# two runs' parameters ~1e-6 apart; once in a while that flips one sampled token at a probability boundary, and from
# that step on the two runs train on (one sample) different batches. A separation whose first step moves the step's
# mean reward by at most one sample's worth (1/B), after at least one bit-equal step, is that float effect, not two
# different updates: two different updates separate at step 1 (the first update already differs).
C1_FLIP_SAMPLES = 1
# On a real LLM trained with Adam the same rounding separates the runs by more than one sample: where a coordinate's
# gradient is rounding noise, Adam's first steps move it by about +-lr whatever the noise's size (m / sqrt(v) is its
# sign), so after two bit-equal steps of SmolLM2 + LoRA the parameters differed by 1.6 lr and 20 of 64 samples
# changed at step 3. A separation after at least one bit-equal step, while GRPO's logged per-step cosine with the
# weighted-SFT gradient stays 1 within C1_COSINE_TOL at every step, is read as the same rule taking the same steps
# (``rounding_separation``): the cosine, not the sample count, is then the evidence that the updates are equal.
# C1: GRPO's logged per-step cosine with the weighted-SFT gradient on its own batch (equiv/cosine_on_policy) must be
# 1 up to float rounding at every step for the steps to be the same.
C1_COSINE_TOL = 1e-6
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
# C3's third reading: ISFT- above the collapse line that has levelled off also contradicts "collapses". It needs a
# held-out curve with at least this many points in the second half of every run (4: a slope with 2 degrees of
# freedom; the 12- and 60-step presets log 2-3, the 200-step c3c4-long 5), and then asks whether the final
# accuracy's lower end, continued for another run at the steepest late slope the interval over seeds allows,
# would still be above the line
C3_LATE_POINTS = 4
# C4: a slope difference that adds up to under one token over the run is no practical length effect, so an
# interval wholly below it contradicts "grows longer": the margin is C4_RUN_TOKENS / steps tokens a step (0.05 for
# the default 20-step comparison, 0.005 at 200 steps); C4_SLOPE_MARGIN when the runs do not say their steps.
C4_RUN_TOKENS = 1.0
C4_SLOPE_MARGIN = 0.05
# C5: exact enumeration has no sampling noise: an identity holds to rounding (1e-6 is float32-safe); a cosine more
# than 1e-3 from 1 is a real difference of direction; between the two is left open.
C5_COSINE_TOL = 1e-6
C5_COSINE_CONTRADICT = 1e-3

C5_IDENTITIES = {"isft+_seqsum_cosine": "isft+ (sequence sum)", "isft-_seqsum_cosine": "isft- (sequence sum)",
                 "dr_grpo_cosine": "dr_grpo"}


# --- reading the collection --------------------------------------------------------------------------------------


def finished_runs(col: Collection, algo: str) -> dict:
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


def paired_runs(col: Collection, algos: list[str], labels: dict | None = None) -> tuple[list, list[str], dict]:
    """Seeds every one of ``algos`` has a finished run of, what is missing when there is none, and the runs."""
    runs = {a: finished_runs(col, a) for a in algos}
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


def reference_algo(col: Collection) -> tuple[str, str | None]:
    if finished_runs(col, "grpo") or not finished_runs(col, "grpo_nokl"):
        return "grpo", None
    return "grpo_nokl", "no grpo runs: grpo_nokl (GRPO without the KL term) stands in"


def run_metric(run: RunData, key: str) -> float:
    ev = run.eval or {}
    v = ev.get("metrics", ev).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def base_metric(col: Collection, key: str) -> float:
    vals = [float(v) for e in col.base_evals for v in [e.get("metrics", e).get(key)] if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else math.nan


def nested_get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# --- formatting --------------------------------------------------------------------------------------------------


def fmt_points(x: float, signed: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "inf" if x == math.inf else "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def fmt_interval(d: PairedDiff, scale: float = 100.0, digits: int = 1) -> str:
    if not d.has_interval:
        return "[no interval: 1 seed]"
    return f"[{d.low * scale:+.{digits}f}, {d.high * scale:+.{digits}f}]"


def fmt_g(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2g}"


def claim_record(claim: str, prediction: str, needs: list[str], optional: list[str], measured: dict, summary: str,
            verdict: str, power: str | None, missing: list[str]) -> dict:
    if missing:
        verdict = NOT_MEASURED
        summary = f"not measured: missing {', '.join(missing)}" + (f"; {summary}" if summary else "")
    return {"claim": claim, "prediction": prediction, "measured": measured, "summary": summary, "verdict": verdict,
            "power": power, "needs": needs, "optional": optional, "missing": missing}


def combine_verdicts(verdicts: list[str]) -> str:
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return CONTRADICTED if CONTRADICTED in verdicts else INCONCLUSIVE
