"""Beyond the degenerate MDP: does the paper's reduction survive an environment or per-step credit?

The reduction of GRPO to filtered SFT (arXiv 2505.13697) rests on two assumptions: the state is the concatenation
of the policy's tokens, and the reward is spread evenly over them. The comparison presets ``env-calculator`` (a
tool writes each step's value), ``env-two-llm`` (a frozen base answers after the policy's hint) and
``process-credit`` (Countdown's step verifier) break one each. This module reads such a comparison and measures,
per arm, against the arm on the plain token MDP (the *reference*: the first arm without an environment or process
credit, ``grpo_nokl`` in the presets):

(each arm is compared with the plain arm of its own algorithm when there is one, e.g. ``process-ppo`` with
``ppo``):

* **equivalence**: ``equiv/cosine_on_policy`` (the cosine between the policy-gradient step and the weighted
  filtered-SFT step on the same batch, logged every step by :func:`tokenmdp.train.equivalence.gradient_cosines`):
  its mean over steps per seed, the mean and 95% t interval over seeds, and its minimum over every logged step.
  "holds" when the minimum is at least :data:`HOLDS` (1 up to float rounding), else "broken" with the numbers;
* **length of incorrect responses** over training (the policy's own tokens: observations are not counted): the
  least-squares slope of ``length/incorrect`` per step, per seed, mean and interval, and the paired difference
  with the reference over seeds;
* **held-out accuracy** (sampled pass@1 of the final models, through the arm's environment when it has one):
  mean and interval over seeds; the paired difference with the reference over the seeds both have (t interval,
  p, the minimum detectable difference at 80% power) and over problems (each problem's pass@1 averaged over those
  seeds, a paired t over the held-out problems); with the base model alone (one evaluation) over problems only;
* **CPU minutes** of training per run (the comparison's ``train_cpu_s``: the two-LLM arm is compared with
  training the base directly "for the same CPU minutes");
* **hints** (two-LLM arms): the generator's most frequent first lines, from the final models' held-out samples
  and from the first and last training steps' samples (``samples.parquet``), and on Countdown their kinds of
  step (:func:`tokenmdp.tasks.countdown.classify_step`; problems read from the compact prompt or the problem id,
  so other templates get no kinds).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from tokenmdp.experiments.runs import BASE_RECORDS_FILE, EVAL_RECORDS_FILE, Collection, RunData
from tokenmdp.stats import mean_ci, paired_difference, ls_slope

HOLDS = 0.999  # the on-policy cosine of an update equal to filtered SFT's: 1 up to float rounding
KEY = "sampled/pass@1"
TOP_HINTS = 5


def _config(run: RunData) -> dict:
    return run.config or {}


def arm_kind(run: RunData) -> dict:
    """What an arm changes: its algorithm, environment kind, credit assignment and returns (from the run's config)."""
    cfg = _config(run)
    algo = cfg.get("algo") or {}
    # a run folder's config.yaml holds the algorithm's overrides beside its name; a config file, under overrides
    over = {**(algo.get("overrides") or {}), **{k: v for k, v in algo.items() if k not in ("name", "overrides")}}
    env = ((cfg.get("task") or {}).get("env") or {}).get("kind", "none")
    return {"algo": algo.get("name", run.algo), "env": env or "none", "credit": over.get("credit", "preset"),
            "returns": over.get("returns", "sequence"), "process_final": over.get("process_final")}


def _plain(kind: dict) -> bool:
    return kind["env"] == "none" and kind["credit"] != "process"


def _finished_by_arm(col: Collection) -> dict[str, dict[int, RunData]]:
    return {a: {r.seed: r for r in col.runs_of(a, finished=True)} for a in col.algos}


def _cpu_minutes(col: Collection, arm: str, seeds) -> float:
    """Mean training CPU minutes of the arm's runs that were trained (not reused) by the comparison."""
    vals = []
    for info in col.compares:
        for seed in seeds:
            t = (info.get("timings") or {}).get(f"{arm}/seed-{seed}")
            if isinstance(t, dict) and t.get("train_s") is not None and isinstance(t.get("train_cpu_s"), (int, float)):
                vals.append(t["train_cpu_s"] / 60.0)
    return sum(vals) / len(vals) if vals else math.nan


def _read_records(path: Path) -> list[dict]:
    """The per-problem records of an evaluation (``eval_records.jsonl``), [] when there are none."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _records(run: RunData) -> dict[str, float]:
    """Each held-out problem's sampled pass@1 of the run's final model."""
    return {str(r["id"]): float(r["pass@1"]) for r in _read_records(Path(run.path) / EVAL_RECORDS_FILE)}


def _base_records(col: Collection) -> dict[str, float]:
    for info in col.compares:
        records = _read_records(Path(info.get("_source", "")) / BASE_RECORDS_FILE)
        if records:
            return {str(r["id"]): float(r["pass@1"]) for r in records}
    return {}


def _per_problem(runs: dict[int, RunData]) -> dict[str, float]:
    """Each problem's pass@1 averaged over the seeds."""
    sums: dict[str, list[float]] = {}
    for run in runs.values():
        for pid, v in _records(run).items():
            sums.setdefault(pid, []).append(v)
    return {pid: sum(v) / len(v) for pid, v in sums.items()}


def _over_problems(a: dict[str, float], b: dict[str, float]) -> dict | None:
    ids = sorted(set(a) & set(b))
    if len(ids) < 2:
        return None
    d = paired_difference([a[i] for i in ids], [b[i] for i in ids])
    return d.to_dict()


def _eval(run: RunData, key: str = KEY) -> float:
    v = ((run.eval or {}).get("metrics") or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def _metric_series(run: RunData, key: str) -> list[tuple[int, float]]:
    m = run.metrics
    if m.empty or key not in m.columns:
        return []
    v = m[key].dropna()
    return [(int(s), float(x)) for s, x in zip(v.index, v.values) if int(s) > 0]


def _cosines(run: RunData) -> list[tuple[int, float]]:
    """The logged on-policy cosines of the steps that had a gradient (a step whose groups all scored alike has
    none: both gradients are 0 and the logged cosine, 0, says nothing)."""
    norms = dict(_metric_series(run, "equiv/grad_norm_grpo"))
    return [(s, v) for s, v in _metric_series(run, "equiv/cosine_on_policy") if norms.get(s, 1.0) > 0]


def _hints(texts: list[str]) -> list[tuple[str, int]]:
    firsts = [t.split("\n", 1)[0] for t in texts]
    return Counter(firsts).most_common(TOP_HINTS)


def _classes(rows: list[tuple[str, str, bool]]) -> dict[str, dict] | None:
    """Countdown hints (first lines) by :func:`tokenmdp.tasks.countdown.classify_step`: each class's share of the
    samples and the accuracy of the episodes that began with it; None when no problem could be read."""
    from tokenmdp.tasks.countdown import STEP_CLASSES, classify_step, parse_question

    seen: dict[str, list[bool]] = {c: [] for c in STEP_CLASSES}
    for where, text, correct in rows:
        problem = parse_question(where)
        if problem is None:
            continue
        seen[classify_step(text.split("\n", 1)[0], *problem)].append(bool(correct))
    total = sum(len(v) for v in seen.values())
    if not total:
        return None
    return {c: {"share": len(v) / total, "accuracy": (sum(v) / len(v)) if v else None, "n": len(v)}
            for c, v in seen.items()}


def hint_table(runs: dict[int, RunData]) -> dict[str, Any]:
    """The generator's hints (first lines): the most frequent, and (Countdown) what kind of step they are and how
    often the base then answers correctly, in the held-out samples of the final models and in the training samples
    of the first and the last step (pooled over seeds)."""
    import pyarrow.parquet as pq

    held: list[tuple[str, str, bool]] = []
    first: list[tuple[str, str, bool]] = []
    last: list[tuple[str, str, bool]] = []
    for run in runs.values():
        for rec in _read_records(Path(run.path) / EVAL_RECORDS_FILE):
            held += [(str(rec["id"]), s["completion"], s["correct"]) for s in rec.get("samples", [])]
        sp = Path(run.path) / "samples.parquet"
        if sp.is_file():
            t = pq.read_table(sp, columns=["step", "prompt", "completion", "correct"]).to_pydict()
            steps = sorted(set(t["step"]))
            rows = list(zip(t["step"], t["prompt"], t["completion"], t["correct"]))
            if steps:
                first += [(p, c, ok) for s, p, c, ok in rows if s == steps[0]]
                last += [(p, c, ok) for s, p, c, ok in rows if s == steps[-1]]
    texts = lambda rows: [c for _, c, _ in rows]  # noqa: E731
    return {"heldout": _hints(texts(held)), "first_step": _hints(texts(first)), "last_step": _hints(texts(last)),
            "n_heldout": len(held), "distinct_heldout": len({c.split("\n", 1)[0] for _, c, _ in held}),
            "classes": {"heldout": _classes(held), "first_step": _classes(first), "last_step": _classes(last)}}


def _grpo_peer(arm: str, kinds: dict[str, dict]) -> str | None:
    """For a non-GRPO arm that changes the MDP (an environment or process credit): the GRPO arm of the same
    change, to measure the paper's comparison (filtered SFT against GRPO) inside that formulation."""
    kind = kinds[arm]
    if _plain(kind) or kind["algo"] in ("grpo", "grpo_nokl"):
        return None
    same = ("env", "credit", "returns", "process_final")
    return next((a for a, k in kinds.items() if a != arm and k["algo"] in ("grpo_nokl", "grpo")
                 and all(k.get(f) == kind.get(f) for f in same)), None)


def analyse(col: Collection) -> dict[str, Any]:
    """The measurements of the module docstring for every arm of ``col`` (empty when it has only plain arms)."""
    runs = _finished_by_arm(col)
    kinds = {a: arm_kind(next(iter(r.values()))) for a, r in runs.items() if r}
    if not kinds or all(_plain(k) for k in kinds.values()):
        return {}
    reference = next((a for a, k in kinds.items() if _plain(k)), None)
    base_problems = _base_records(col)
    base_value = next((float(e.get("metrics", e).get(KEY)) for e in col.base_evals
                       if isinstance(e.get("metrics", e).get(KEY), (int, float))), math.nan)
    out: dict[str, Any] = {"reference": reference, "holds_at": HOLDS, "base": {KEY: base_value}, "arms": {}}
    plain = [a for a in runs if a in kinds and _plain(kinds[a])]
    order = plain + [a for a in runs if a not in plain]  # each arm's reference is measured before it
    for arm in order:
        by_seed = runs[arm]
        if arm not in kinds:
            continue
        seeds = sorted(by_seed)
        row: dict[str, Any] = {"kind": kinds[arm], "seeds": seeds}
        cos = {s: _cosines(r) for s, r in by_seed.items()}
        if any(cos.values()):
            per_seed = [sum(v for _, v in c) / len(c) for c in cos.values() if c]
            every = [v for c in cos.values() for _, v in c]
            ci = mean_ci(per_seed)
            row["cosine"] = {"mean": ci.mean, "half_width": ci.half_width, "min": min(every), "steps": len(every),
                             "holds": min(every) >= HOLDS}
        slopes = {}
        for s, r in by_seed.items():
            series = _metric_series(r, "length/incorrect")
            if len(series) >= 2:
                slopes[s] = ls_slope([x for x, _ in series], [y for _, y in series])
        if slopes:
            ci = mean_ci(list(slopes.values()))
            row["length_slope"] = {"mean": ci.mean, "half_width": ci.half_width, "per_seed": slopes}
        acc = {s: _eval(r) for s, r in by_seed.items()}
        ci = mean_ci(list(acc.values()))
        row["heldout"] = {"mean": ci.mean, "half_width": ci.half_width, "per_seed": acc}
        row["train_cpu_min"] = _cpu_minutes(col, arm, seeds)
        problems = _per_problem(by_seed)
        row["vs_base"] = {"over_problems": _over_problems(problems, base_problems)}
        own = next((a for a, k in kinds.items() if _plain(k) and k["algo"] == kinds[arm]["algo"]), reference)
        row["reference"] = own
        if own is not None and arm != own:
            ref = runs[own]
            common = [s for s in seeds if s in ref]
            if common:
                row["vs_reference"] = {
                    "over_seeds": paired_difference([acc[s] for s in common], [_eval(ref[s]) for s in common]
                                                    ).to_dict(),
                    "over_problems": _over_problems(_per_problem({s: by_seed[s] for s in common}),
                                                    _per_problem({s: ref[s] for s in common})),
                }
                ref_slopes = out["arms"].get(own, {}).get("length_slope", {}).get("per_seed", {})
                both = [s for s in common if s in slopes and s in ref_slopes]
                if both:
                    row["length_slope"]["vs_reference"] = paired_difference(
                        [slopes[s] for s in both], [ref_slopes[s] for s in both]).to_dict()
        peer = _grpo_peer(arm, kinds)
        if peer is not None:
            common = [s for s in seeds if s in runs[peer]]
            if common:  # the paper's comparison inside the same formulation: filtered SFT against GRPO there
                row["vs_grpo_same_mdp"] = {
                    "arm": peer,
                    "over_seeds": paired_difference([acc[s] for s in common],
                                                    [_eval(runs[peer][s]) for s in common]).to_dict(),
                    "over_problems": _over_problems(_per_problem({s: by_seed[s] for s in common}),
                                                    _per_problem({s: runs[peer][s] for s in common})),
                }
        if kinds[arm]["env"].startswith("two_llm"):
            row["hints"] = hint_table(by_seed)
        out["arms"][arm] = row
    return out



__all__ = ["analyse", "arm_kind", "hint_table", "HOLDS", "KEY"]
