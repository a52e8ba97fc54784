"""The paper's claims (C1-C5) judged from fake run folders with known numbers, every figure checked by hand."""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.claims import (
    C1_PARAM_RTOL,
    NOT_MEASURED,
    evaluate_claims,
    fmt_seeds,
    length_trend,
    param_difference,
)
from tokenmdp.experiments.claims.render import claims_html, claims_markdown, write_claims
from tokenmdp.experiments.runs import Collection, collect, load_run
from tokenmdp.stats import CONTRADICTED, INCONCLUSIVE, SUPPORTED

T975_2 = 4.302652729911275  # t_{0.975, 2}: three seeds
SEEDS = (0, 1, 2)


def _params(seed: int, bump: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(4, 3, generator=g) - 0.5
    w[0, 0] = 2.0  # the largest parameter: |2|
    b = torch.rand(3, generator=g) - 0.5
    b[1] += bump
    return {"layer.weight": w, "layer.bias": b}


def make_run(root, algo: str, seed: int, *, sampled: float = 0.3, greedy: float | None = None,
             length_incorrect=None, reward=None, curve: dict | None = None, params: dict | None = None,
             steps: int = 5, trains: str | None = None, lr: float = 1e-4) -> None:
    """A finished run folder as a comparison leaves it: config.yaml, metrics.jsonl, eval.json, DONE, final/
    (``trains``: the algorithm of a named arm ``algo``)."""
    d = root / "runs" / algo / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"algo": {"name": trains or algo}, "optim": {"lr": lr},
                                                   "run": {"seed": seed, "steps": steps, "eval_greedy": True}}))
    lines = []
    for step in range(1, steps + 1):
        row = {"step": step, "reward/mean": (reward or [0.25] * steps)[step - 1], "length/mean": 20.0 + step}
        if length_incorrect is not None:
            row["length/incorrect"] = length_incorrect[step - 1]
        if curve and step in curve:
            row["eval/accuracy"] = curve[step]
        lines.append(json.dumps(row))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = {"sampled/pass@1": sampled, "greedy/pass@1": sampled if greedy is None else greedy, "pass@k": 0.5}
    (d / "eval.json").write_text(json.dumps({"metrics": metrics, "settings": {"k": 4}, "algo": algo, "seed": seed}))
    (d / "DONE").write_text(json.dumps({"steps": steps, "algo": algo, "seed": seed}))
    (d / "final").mkdir()
    save_file(params if params is not None else _params(seed), str(d / "final" / "model.safetensors"))


def make_compare(root, algos, base: dict | None = None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps({"settings": {"algos": list(algos), "seeds": list(SEEDS)}}))
    if base is not None:
        (root / "base_eval.json").write_text(json.dumps({"metrics": base}))
    return root


BASE = {"sampled/pass@1": 0.30, "greedy/pass@1": 0.32}


# --- C1 ----------------------------------------------------------------------------------------------------------


def test_c1_identical_runs_supported(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"], BASE)
    for s in SEEDS:
        for algo in ("grpo_nokl", "isft+-adv"):
            make_run(root, algo, s, curve={3: 0.3, 5: 0.35})
    exact = {"identities": {"isft+-adv_vs_grpo_nokl_max_abs_diff": 2e-16}}
    c1 = evaluate_claims(collect([root]), exact)["C1"]
    assert c1["verdict"] == SUPPORTED and c1["missing"] == []
    seed0 = c1["measured"]["per_seed"]["seed-0"]
    assert seed0["params"]["max_abs_diff"] == 0.0 and seed0["params"]["rel"] == 0.0
    assert seed0["params"]["max_abs_param"] == pytest.approx(2.0) and seed0["params"]["n_tensors"] == 2
    assert seed0["curve_max_abs_diff"] == {"reward/mean": 0.0, "length/mean": 0.0, "eval/accuracy": 0.0}
    assert seed0["final"]["sampled/pass@1"] == {"grpo_nokl": 0.3, "isft+-adv": 0.3}
    assert c1["measured"]["exact_max_abs_diff"] == 2e-16
    assert c1["measured"]["exact_equal"] is True
    assert "n=3 seeds" in c1["summary"] and "exact tier: steps differ by 2e-16" in c1["summary"]


def test_c1_rounding_level_difference_is_within_tolerance(tmp_path):
    # bias[1] moves by 1e-4: relative to the largest parameter |2| that is 5e-5 <= 1e-4; the curves are equal
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"])
    make_run(root, "grpo_nokl", 0)
    make_run(root, "isft+-adv", 0, params=_params(0, bump=1e-4))
    c1 = evaluate_claims(collect([root]))["C1"]
    p = c1["measured"]["per_seed"]["seed-0"]["params"]
    assert p["max_abs_diff"] == pytest.approx(1e-4, rel=1e-3) and p["rel"] == pytest.approx(5e-5, rel=1e-3)
    assert p["max_abs_diff_in_lr"] == pytest.approx(1.0, rel=1e-3)  # one learning-rate step apart
    assert p["rel"] <= C1_PARAM_RTOL and c1["verdict"] == SUPPORTED


def test_c1_separated_trajectories_contradicted(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"])
    for s in SEEDS:
        make_run(root, "grpo_nokl", s, reward=[0.25, 0.25, 0.5, 0.5, 0.5])
        make_run(root, "isft+-adv", s, reward=[0.25, 0.375, 0.5, 0.625, 0.5], params=_params(s, bump=0.01))
    c1 = evaluate_claims(collect([root]))["C1"]
    assert c1["verdict"] == CONTRADICTED
    seed1 = c1["measured"]["per_seed"]["seed-1"]
    assert seed1["params"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-4)
    assert seed1["params"]["rel"] == pytest.approx(0.005, rel=1e-4)
    assert seed1["curve_max_abs_diff"]["reward/mean"] == pytest.approx(0.125)
    assert seed1["curves_equal"] is False


def _separating_pair(root, cosine: list | None) -> None:
    """grpo_nokl and isft+-adv, seed 0: the same samples at steps 1-2, 3 of 8 samples different at step 3 (the
    reward moves by 0.125); ``cosine``: GRPO's logged per-step equiv/cosine_on_policy (None: not logged)."""
    import pandas as pd

    make_run(root, "grpo_nokl", 0, reward=[0.25, 0.25, 0.5, 0.5, 0.5])
    make_run(root, "isft+-adv", 0, reward=[0.25, 0.25, 0.625, 0.5, 0.5], params=_params(0, bump=0.01))
    for algo in ("grpo_nokl", "isft+-adv"):
        d = root / "runs" / algo / "seed-0"
        rows = [{"step": st, "prompt": "p", "completion": f"c{st}-{i}" + ("x" if algo == "isft+-adv" and st >= 3 and
                                                                           i < 3 else "")}
                for st in range(1, 6) for i in range(8)]
        pd.DataFrame(rows).to_parquet(d / "samples.parquet")
        if algo == "grpo_nokl" and cosine is not None:  # a cosine of 0 with both gradients 0: no angle
            lines = [json.loads(x) | {"equiv/cosine_on_policy": c, "equiv/grad_norm_grpo": float(c != 0),
                                      "equiv/grad_norm_isft": float(c != 0)}
                     for x, c in zip((d / "metrics.jsonl").read_text().splitlines(), cosine)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.mark.parametrize("cosine,verdict", [([1 - 1e-13] * 5, SUPPORTED), ([1.0, 1.0, 1.0, 0.99, 1.0], CONTRADICTED),
                                            (None, CONTRADICTED), ([1.0, 1.0, 0.0, 1.0, 1.0], SUPPORTED)],
                         ids=["equal-steps", "bent-step", "no-cosine", "a-step-without-gradient"])
def test_c1_separation_by_rounding_needs_equal_gradients_at_every_step(tmp_path, cosine, verdict):
    """Bit-equal steps, then several samples differ (a real LLM under Adam: rounding noise moves a coordinate by
    about lr): the same rule only when every step's GRPO / weighted-SFT gradient cosine is 1 within tolerance."""
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"])
    _separating_pair(root, cosine)
    c1 = evaluate_claims(collect([root]))["C1"]
    seed0 = c1["measured"]["per_seed"]["seed-0"]
    assert seed0["first_divergence_step"] == 3 and seed0["samples_changed_at_divergence"] == 3
    assert seed0["one_sample_flip"] is False and seed0["rounding_separation"] is (verdict == SUPPORTED)
    assert c1["verdict"] == verdict
    if verdict == SUPPORTED:
        assert "bit-equal steps 1-2, then 3 samples differ (float rounding" in c1["summary"]


def test_c1_inconclusive_and_exact_tier(tmp_path):
    # parameters apart beyond tolerance but the same samples at every step: not clear either way
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"])
    make_run(root, "grpo_nokl", 0)
    make_run(root, "isft+-adv", 0, params=_params(0, bump=0.01))
    col = collect([root])
    assert evaluate_claims(col)["C1"]["verdict"] == INCONCLUSIVE
    # identical runs, but the exact tier says the expected steps differ: contradicted
    root2 = make_compare(tmp_path / "cmp2", ["grpo_nokl", "isft+-adv"])
    make_run(root2, "grpo_nokl", 0)
    make_run(root2, "isft+-adv", 0)
    bad = {"identities": {"isft+-adv_vs_grpo_nokl_max_abs_diff": 1e-3}}
    assert evaluate_claims(collect([root2]), bad)["C1"]["verdict"] == CONTRADICTED
    assert evaluate_claims(collect([root2]))["C1"]["verdict"] == SUPPORTED  # exact tier optional
    # the relative difference wins when given: float32 rounding (1e-7 of the step) is equal, 1e-3 is not
    near = {"identities": {"isft+-adv_vs_grpo_nokl_max_abs_diff": 3e-6, "isft+-adv_vs_grpo_nokl_rel_diff": 1e-7}}
    assert evaluate_claims(collect([root2]), near)["C1"]["verdict"] == SUPPORTED
    far = {"identities": {"isft+-adv_vs_grpo_nokl_max_abs_diff": 3e-6, "isft+-adv_vs_grpo_nokl_rel_diff": 1e-3}}
    assert evaluate_claims(collect([root2]), far)["C1"]["measured"]["exact_equal"] is False
    assert evaluate_claims(collect([root2]), far)["C1"]["verdict"] == CONTRADICTED


def test_param_difference_reads_bf16_and_finds_mismatches(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    save_file({"w": torch.tensor([1.0, -3.0, 0.5], dtype=torch.bfloat16)}, str(a / "model.safetensors"))
    save_file({"w": torch.tensor([1.0, -3.0, 0.75], dtype=torch.bfloat16)}, str(b / "model.safetensors"))
    save_file({"v": torch.tensor([1.0])}, str(c / "model.safetensors"))
    p = param_difference(a, b)
    assert (p["max_abs_diff"], p["max_abs_param"], p["rel"]) == (0.25, 3.0, pytest.approx(0.25 / 3))
    assert param_difference(a, c)["rel"] == math.inf and param_difference(a, c)["mismatch"] == ["v", "w"]
    assert param_difference(a, tmp_path) is None


# --- C2 ----------------------------------------------------------------------------------------------------------


def _c2_root(tmp_path, ref="grpo"):
    root = make_compare(tmp_path / "cmp", [ref, "isft+-", "isft+"], BASE)
    for s, g, pm, p in zip(SEEDS, (0.40, 0.30, 0.50), (0.405, 0.30, 0.495), (0.35, 0.26, 0.44)):
        make_run(root, ref, s, sampled=g, greedy=g + 0.02)
        make_run(root, "isft+-", s, sampled=pm, greedy=pm + 0.02)
        make_run(root, "isft+", s, sampled=p)
    return root


def test_c2_paired_hand_computation(tmp_path):
    c2 = evaluate_claims(collect([_c2_root(tmp_path)]))["C2"]
    assert c2["measured"]["reference"] == "grpo" and c2["measured"]["reference_note"] is None
    # isft+- - grpo: d = [0.005, 0, -0.005], mean 0, sd 0.005, half = 4.302653 * 0.005 / sqrt(3) = 0.01242
    eq = c2["measured"]["isft+- - grpo"]
    half = T975_2 * 0.005 / math.sqrt(3)
    assert half == pytest.approx(0.012421, abs=1e-6)
    d = eq["sampled/pass@1"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.0, abs=1e-12) and d["sd"] == pytest.approx(0.005)
    assert (d["low"], d["high"]) == (pytest.approx(-half), pytest.approx(half))
    assert d["p_value"] == pytest.approx(1.0, abs=1e-9)
    assert eq["verdict"] == SUPPORTED  # [-1.2, +1.2] points inside +-2
    assert eq["greedy/pass@1"]["mean"] == pytest.approx(0.0, abs=1e-12)
    # isft+ - grpo: d = [-0.05, -0.04, -0.06], mean -0.05, sd 0.01, t = -0.05 / (0.01 / sqrt 3) = -8.660
    below = c2["measured"]["isft+ - grpo"]["sampled/pass@1"]
    half = T975_2 * 0.01 / math.sqrt(3)
    t = -0.05 / (0.01 / math.sqrt(3))
    assert (below["mean"], below["low"], below["high"]) == (pytest.approx(-0.05), pytest.approx(-0.05 - half),
                                                           pytest.approx(-0.05 + half))
    assert below["p_value"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-6)  # = 0.01307
    assert below["p_value"] == pytest.approx(0.01307, abs=1e-5)
    assert c2["measured"]["isft+ - grpo"]["verdict"] == SUPPORTED  # wholly below 0: [-7.5, -2.5]
    assert c2["verdict"] == SUPPORTED
    assert "isft+ - grpo = -5.0 points [-7.5, -2.5]" in c2["summary"]
    assert "n=3 seeds" in c2["summary"] and "margin 2 points" in c2["summary"]
    assert "detectable" in c2["power"]


def test_c2_uses_grpo_nokl_without_grpo_and_contradiction(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-", "isft+"])
    for s, g in zip(SEEDS, (0.40, 0.30, 0.50)):
        make_run(root, "grpo_nokl", s, sampled=g)
        make_run(root, "isft+-", s, sampled=g - 0.10 + 0.01 * s)  # d = [-0.10, -0.09, -0.08]: far below
        make_run(root, "isft+", s, sampled=g + 0.005 * (s - 1))  # d = [-0.005, 0, 0.005]
    c2 = evaluate_claims(collect([root]))["C2"]
    assert c2["measured"]["reference"] == "grpo_nokl" and "grpo_nokl" in c2["measured"]["reference_note"]
    assert c2["measured"]["isft+- - grpo_nokl"]["verdict"] == CONTRADICTED  # [-12.5, -5.5]: wholly below -2
    # isft+: 0 +- 4.302653 * 0.005 / sqrt 3 = [-1.24, +1.24] points: not below, and a 2-point drop is ruled out
    assert c2["measured"]["isft+ - grpo_nokl"]["sampled/pass@1"]["low"] == pytest.approx(-0.012421, abs=1e-6)
    assert c2["measured"]["isft+ - grpo_nokl"]["verdict"] == CONTRADICTED
    assert c2["verdict"] == CONTRADICTED


def test_c2_missing_part(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo", "isft+-"])
    for s in SEEDS:
        make_run(root, "grpo", s)
        make_run(root, "isft+-", s)
    c2 = evaluate_claims(collect([root]))["C2"]
    assert c2["verdict"] == NOT_MEASURED and c2["missing"] == ["isft+ (seeds 0-2)"]
    assert c2["measured"]["isft+- - grpo"]["verdict"] == SUPPORTED  # the part that could be measured still is
    assert c2["summary"].startswith("not measured: missing isft+ (seeds 0-2)")


# --- C3 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values,verdict", [
    ((0.0, 0.01, 0.02), SUPPORTED),  # high = 0.01 + 0.0248 = 0.035 < 0.15 (half the base 0.30)
    ((0.31, 0.30, 0.32), CONTRADICTED),  # low = 0.31 - 0.0248 = 0.285 >= 0.30 - 0.02
    ((0.05, 0.25, 0.15), INCONCLUSIVE),  # 0.15 +- 0.248
])
def test_c3_collapse(tmp_path, values, verdict):
    root = make_compare(tmp_path / "cmp", ["isft-"], BASE)
    for s, v in zip(SEEDS, values):
        make_run(root, "isft-", s, sampled=v, curve={2: 0.2, 5: v})
    c3 = evaluate_claims(collect([root]))["C3"]
    assert c3["verdict"] == verdict
    m = c3["measured"]
    assert m["base"] == 0.30 and m["collapse_below"] == pytest.approx(0.15)
    assert m["mean_ci"]["mean"] == pytest.approx(sum(values) / 3)
    assert m["curve"]["seed-1"] == [[0, 0.32], [2, 0.2], [5, values[1]]]  # step 0: the base model's greedy
    assert m["bootstrap"]["n"] == 3


def test_c3_by_learning_rate(tmp_path):
    """An arm that trains ISFT- at another rate is judged on its own; one that collapses supports the claim, with
    the step its greedy curve crossed half the base's greedy accuracy (0.32 / 2 = 0.16)."""
    root = make_compare(tmp_path / "cmp", ["isft-", "isft-lr1e-3"], BASE)
    for s, v, w in zip(SEEDS, (0.22, 0.23, 0.24), (0.0, 0.01, 0.02)):
        make_run(root, "isft-", s, sampled=v, curve={2: 0.25, 5: v})
        make_run(root, "isft-lr1e-3", s, sampled=w, curve={2: 0.1, 5: 0.0}, trains="isft-", lr=1e-3)
    c3 = evaluate_claims(collect([root]))["C3"]
    assert c3["verdict"] == SUPPORTED
    m = c3["measured"]
    assert m["mean_ci"]["mean"] == pytest.approx(0.23) and m["lr"] == 1e-4  # the plain arm's readings first
    arms = m["arms"]
    assert list(arms) == ["isft-", "isft-lr1e-3"]
    assert arms["isft-"]["verdict"] == INCONCLUSIVE and arms["isft-"]["collapse_step"] == {
        "seed-0": None, "seed-1": None, "seed-2": None}
    assert arms["isft-lr1e-3"]["verdict"] == SUPPORTED and arms["isft-lr1e-3"]["lr"] == 1e-3
    assert arms["isft-lr1e-3"]["collapse_step"] == {"seed-0": 2, "seed-1": 2, "seed-2": 2}
    assert "; by arm: isft- (lr 0.0001) 23.0% [20.5, 25.5]: inconclusive at this power; isft-lr1e-3 (lr 0.001) " \
           "1.0% [-1.5, 3.5]: supported, its held-out curve below half the base's by step 2 in 3 of 3 seeds" \
           in c3["summary"]
    assert c3["power"].startswith("n=3 seeds, 95% half width 2.5 points")


def test_c3_hand_figures_and_missing_base(tmp_path):
    root = make_compare(tmp_path / "cmp", ["isft-"], BASE)
    for s, v in zip(SEEDS, (0.0, 0.01, 0.02)):
        make_run(root, "isft-", s, sampled=v)
    c3 = evaluate_claims(collect([root]))["C3"]
    half = T975_2 * 0.01 / math.sqrt(3)
    assert c3["measured"]["mean_ci"]["high"] == pytest.approx(0.01 + half)
    assert c3["summary"].startswith("isft- sampled/pass@1 1.0% [-1.5, 3.5] vs base 30.0%, n=3 seeds")
    # sd 0.01 over 3 seeds: the exact noncentral-t MDD is 3.264 sd (stats.min_detectable_difference)
    assert c3["measured"]["mdd"] == pytest.approx(0.03264, abs=1e-5)
    assert c3["power"] == "n=3 seeds, 95% half width 2.5 points, detectable difference 3.3 points at 80% power"
    root2 = make_compare(tmp_path / "cmp2", ["isft-"])
    make_run(root2, "isft-", 0, sampled=0.0)
    c3 = evaluate_claims(collect([root2]))["C3"]
    assert c3["verdict"] == NOT_MEASURED and "base_eval.json" in c3["missing"][0]


# --- C4 ----------------------------------------------------------------------------------------------------------


def _line(slope: float, steps: int = 5) -> list[float]:
    return [10.0 + slope * k for k in range(1, steps + 1)]


def test_length_trend_by_hand(tmp_path):
    root = tmp_path / "cmp"
    make_run(root, "grpo", 0, length_incorrect=[10, 12, 13, 17, 20, 19, 22, 25, 24, 28], steps=10)
    t = length_trend(load_run(root / "runs" / "grpo" / "seed-0"))
    # x = 1..10 (mean 5.5), sum dx^2 = 82.5; sum dx * y = -45 - 42 - 32.5 - 25.5 - 10 + 9.5 + 33 + 62.5 + 84 + 126
    # = 160 -> slope 1.939394
    assert t["slope"] == pytest.approx(160 / 82.5)
    # fifth = 2 steps: first (10 + 12) / 2 = 11, last (24 + 28) / 2 = 26, change 15
    assert (t["first_fifth"], t["last_fifth"], t["change"]) == (11.0, 26.0, 15.0)


def test_c4_slopes_paired(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo", "dr_grpo", "isft+"])
    for s, g, dr, p in zip(SEEDS, (2.0, 1.5, 2.5), (0.0, -0.3, 0.3), (0.5, 0.1, 0.9)):
        make_run(root, "grpo", s, length_incorrect=_line(g))
        make_run(root, "dr_grpo", s, length_incorrect=_line(dr))
        make_run(root, "isft+", s, length_incorrect=_line(p))
    exact = {"identities": {"len_incorrect_shift": {"grpo_nokl": 1.3, "dr_grpo": -0.2}}}
    c4 = evaluate_claims(collect([root]), exact)["C4"]
    m = c4["measured"]
    assert m["runs"]["grpo"]["seed-1"]["slope"] == pytest.approx(1.5)
    assert m["runs"]["grpo"]["seed-1"]["change"] == pytest.approx(1.5 * 4)  # step 5 vs step 1 (fifth = 1 step)
    # grpo slope [2, 1.5, 2.5]: mean 2, sd 0.5, half 4.302653 * 0.5 / sqrt 3 = 1.2421
    t = m["tests"]["grpo slope"]
    assert (t["mean"], t["low"]) == (pytest.approx(2.0), pytest.approx(2.0 - T975_2 * 0.5 / math.sqrt(3)))
    # grpo - dr_grpo: [2.0, 1.8, 2.2], mean 2, sd 0.2
    t = m["tests"]["grpo - dr_grpo"]
    assert (t["mean"], t["sd"], t["high"]) == (pytest.approx(2.0), pytest.approx(0.2),
                                              pytest.approx(2.0 + T975_2 * 0.2 / math.sqrt(3)))
    # grpo - isft+: [1.5, 1.4, 1.6], mean 1.5, sd 0.1
    t = m["tests"]["grpo - isft+"]
    assert (t["mean"], t["sd"]) == (pytest.approx(1.5), pytest.approx(0.1))
    assert all(t["verdict"] == SUPPORTED for t in m["tests"].values())
    assert c4["verdict"] == SUPPORTED
    assert m["exact_len_incorrect_shift"] == {"grpo_nokl": 1.3, "dr_grpo": -0.2, "agrees": True,
                                              "grpo_nokl_larger": True, "slope_at_start": None}
    assert "signs as predicted: yes" in c4["summary"]
    assert "grpo +2.00, dr_grpo +0.00, isft+ +0.50" in c4["summary"]
    assert "grpo - dr_grpo = +2.00 [+1.50, +2.50]" in c4["summary"]


def test_c4_contradicted_when_lengths_grow_alike(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo", "dr_grpo", "isft+"])
    for s in SEEDS:
        for algo in ("grpo", "dr_grpo", "isft+"):
            make_run(root, algo, s, length_incorrect=_line(1.0 + 0.1 * s))
    c4 = evaluate_claims(collect([root]))["C4"]
    assert c4["measured"]["tests"]["grpo - dr_grpo"]["high"] == 0.0  # equal slopes: the point interval [0, 0]
    assert c4["measured"]["tests"]["grpo - dr_grpo"]["verdict"] == CONTRADICTED
    assert c4["verdict"] == CONTRADICTED
    assert c4["measured"]["exact_len_incorrect_shift"] is None



@pytest.mark.parametrize("steps,verdict", [(20, CONTRADICTED), (200, INCONCLUSIVE)])
def test_c4_margin_is_one_token_over_the_run(tmp_path, steps, verdict):
    """grpo's wrong answers grow 0, 0.01 and 0.02 tokens a step faster than dr_grpo's: interval 0.01 +-
    4.3027 * 0.01 / sqrt 3 = [-0.0148, +0.0348]. Below one token over 20 steps (0.05 a step): contradicted; over
    200 steps the margin is 0.005 and the same interval decides nothing."""
    root = make_compare(tmp_path / "cmp", ["grpo", "dr_grpo", "isft+"])
    for s, d in zip(SEEDS, (0.0, 0.01, 0.02)):  # difference mean 0.01, sd 0.01: interval [-0.0148, +0.0348]
        make_run(root, "grpo", s, length_incorrect=_line(1.0 + d, steps), steps=steps)
        make_run(root, "dr_grpo", s, length_incorrect=_line(1.0, steps), steps=steps)
        make_run(root, "isft+", s, length_incorrect=_line(1.0, steps), steps=steps)
    c4 = evaluate_claims(collect([root]))["C4"]
    test = c4["measured"]["tests"]["grpo - dr_grpo"]
    assert test["high"] == pytest.approx(0.01 + T975_2 * 0.01 / math.sqrt(3))
    assert c4["measured"]["margin"] == pytest.approx(1.0 / steps)  # 0.05 at 20 steps, 0.005 at 200
    assert test["verdict"] == verdict


# --- C5 ----------------------------------------------------------------------------------------------------------


def _exact(**identities) -> dict:
    ids = {"isft+_seqsum_cosine": 1 - 1e-12, "isft-_seqsum_cosine": 1.0, "dr_grpo_cosine": 1 - 5e-8}
    ids.update(identities)
    return {"group_size": 4, "grad_J_norm": 0.7, "skipped": {"ppo": "needs a critic"}, "identities": ids,
            "presets": {"reinforce": {"cosine": 1.0, "norm_ratio": 1.0, "variance": 0.1, "description": "r"},
                        "grpo": {"cosine": 0.97, "norm_ratio": 0.5, "variance": 0.2, "description": "g"},
                        "isft+": {"cosine": 0.99, "norm_ratio": 2.0, "variance": 0.3, "description": "i"}}}


def evaluate_claims_exact_only(exact: dict) -> dict:
    return evaluate_claims(Collection(), exact)


def test_c5_from_exact_tier():
    claims = evaluate_claims_exact_only(_exact())
    c5 = claims["C5"]
    assert c5["verdict"] == SUPPORTED
    assert c5["measured"]["differ_from_grad_J"] == ["grpo", "isft+"]  # most bent first
    assert c5["measured"]["presets"]["grpo"]["norm_ratio"] == 0.5
    assert c5["measured"]["skipped"] == {"ppo": "needs a critic"}
    assert "grpo cos 0.9700 (norm ×0.5)" in c5["summary"]
    assert "isft- (sequence sum) 1," in c5["summary"] and "dr_grpo 1 - 5e-08" in c5["summary"]
    assert evaluate_claims_exact_only(_exact(**{"isft-_seqsum_cosine": 0.9}))["C5"]["verdict"] == CONTRADICTED
    assert evaluate_claims_exact_only(_exact(dr_grpo_cosine=1 - 1e-4))["C5"]["verdict"] == INCONCLUSIVE
    partial = evaluate_claims_exact_only({"identities": {"dr_grpo_cosine": 1.0}})["C5"]
    assert partial["verdict"] == SUPPORTED and partial["measured"]["missing_identities"] == [
        "isft+_seqsum_cosine", "isft-_seqsum_cosine"]
    empty = evaluate_claims_exact_only({"presets": {}})["C5"]
    assert empty["verdict"] == NOT_MEASURED and "identities" in empty["missing"][0]


# --- missing runs, strict, outputs -------------------------------------------------------------------------------


def test_missing_runs_not_measured_or_one_strict_error(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo", "isft+-"], BASE)
    for s in SEEDS:
        make_run(root, "grpo", s)
        make_run(root, "isft+-", s)
    col = collect([root])
    claims = evaluate_claims(col)
    assert list(claims) == ["C1", "C2", "C3", "C4", "C5"]
    assert claims["C1"]["verdict"] == NOT_MEASURED
    assert claims["C1"]["missing"] == ["grpo_nokl (seeds 0-2)", "isft+-adv (seeds 0-2)"]
    assert claims["C3"]["missing"] == ["isft- (seeds 0-2)"]
    assert claims["C4"]["missing"] == ["length/incorrect in metrics.jsonl of grpo (seeds 0-2)", "dr_grpo (seeds 0-2)",
                                       "isft+ (seeds 0-2)"]
    assert claims["C5"]["missing"] == ["exact tier result"]
    for c in claims.values():
        assert set(c) >= {"claim", "prediction", "measured", "summary", "verdict", "power", "needs", "missing"}
    with pytest.raises(TokenMDPError) as err:
        evaluate_claims(col, strict=True)
    msg = str(err.value)
    assert "cannot be computed from the runs given" in msg
    assert "C1 needs grpo_nokl (seeds 0-2), isft+-adv (seeds 0-2)" in msg
    assert "C3 needs isft- (seeds 0-2)" in msg and "C5 needs exact tier result" in msg
    assert "C2 needs isft+ (seeds 0-2)" in msg


def test_seeds_that_do_not_pair_are_named(tmp_path):
    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"])
    make_run(root, "grpo_nokl", 0)
    make_run(root, "isft+-adv", 1)
    c1 = evaluate_claims(collect([root]))["C1"]
    assert c1["missing"] == ["grpo_nokl (seed 1)", "isft+-adv (seed 0)"]
    # neither grpo nor grpo_nokl: C2 asks for either, on the seeds of the comparison (compare.json: 0-2)
    root2 = make_compare(tmp_path / "cmp2", ["isft+-", "isft+"])
    make_run(root2, "isft+-", 0)
    make_run(root2, "isft+", 0)
    assert evaluate_claims(collect([root2]))["C2"]["missing"] == ["grpo or grpo_nokl (seeds 0-2)"]
    assert (fmt_seeds([0, 1, 2]), fmt_seeds([3]), fmt_seeds([0, 2]), fmt_seeds([4, 5])) == (
        "seeds 0-2", "seed 3", "seeds 0, 2", "seeds 4, 5")


def test_claims_read_run_folders_without_model_code(tmp_path):
    """The module reads run folders only: evaluating the claims imports neither torch nor matplotlib."""
    import subprocess
    import sys

    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-adv"], BASE)
    for algo in ("grpo_nokl", "isft+-adv"):
        make_run(root, algo, 0)
    code = ("import sys; from tokenmdp.experiments.claims import evaluate_claims; "
            "from tokenmdp.experiments.runs import collect; "
            f"c = evaluate_claims(collect([{str(root)!r}])); assert c['C1']['verdict'] == 'supported'; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_markdown_html_and_json(tmp_path):
    claims = evaluate_claims(collect([_c2_root(tmp_path)]), _exact())
    md = claims_markdown(claims)
    lines = md.splitlines()
    assert lines[0] == "| claim | prediction | measured | verdict |" and len(lines) == 2 + 5
    assert "**supported**" in lines[3] and "**not measured**" in lines[2]  # C2 supported, C1 not measured
    page = claims_html(claims)
    assert page.startswith('<table class="claims">') and page.count("<tr") == 6
    assert 'class="verdict-supported" id="claim-C2"' in page
    tricky = {"X": {"claim": "a < b", "prediction": "p & q", "summary": "<script>", "verdict": "supported",
                    "power": "n=1 \"seed\""}}
    out = claims_html(tricky)
    assert "a &lt; b" in out and "p &amp; q" in out and "&lt;script&gt;" in out and "<script>" not in out
    assert "&quot;seed&quot;" in out
    path = write_claims(claims, tmp_path / "out" / "claims.json")
    back = json.loads(path.read_text())  # strict JSON: NaN / inf written as null
    assert back["C2"]["verdict"] == SUPPORTED
    assert back["C3"]["measured"]["mean_ci"]["mean"] is None  # no isft- run: NaN mean -> null
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_c1_float_flip_is_the_same_steps(tmp_path):
    """Bit-equal steps, then one sample changed by float rounding (the step's mean reward moves by at most 1/B):
    the same steps; a separation from step 1 on, or by more than one sample, is two different updates."""
    from tokenmdp.experiments.claims import first_divergence

    a = pd.DataFrame({"reward/mean": [0.5, 0.6, 0.70, 0.8], "length/mean": [60.0, 61, 62, 63]}, index=[1, 2, 3, 4])
    b = a.copy()
    b.loc[3, "reward/mean"] = 0.70 + 1 / 128
    assert first_divergence(a, b) == (3, pytest.approx(1 / 128))
    assert first_divergence(a, a) == (None, 0.0)
    c = a.copy()
    c.loc[1, "length/mean"] = 59.0
    assert first_divergence(a, c)[0] == 1


def _late_curve(final: float, slope: float) -> dict:
    """A 200-step held-out curve: a drop to 0.25 by step 75, then ``slope`` per step from step 100 on (5 points
    in the second half)."""
    return {25: 0.3, 50: 0.28, 75: 0.25, 100: final - 100 * slope, 125: final - 75 * slope,
            150: final - 50 * slope, 175: final - 25 * slope, 200: final}


@pytest.mark.parametrize("slopes,verdict", [
    # slope CI 0 +- 4.97e-5 a step: 0.185 (the final's lower end) - 200 * 4.97e-5 = 0.175 stays above 0.15
    ((0.0, -2e-5, 2e-5), CONTRADICTED),
    # still falling: 0.185 - 200 * 7.5e-4 = 0.036 would cross it
    ((-6e-4, -5e-4, -4e-4), INCONCLUSIVE),
])
def test_c3_levels_off_or_still_falls(tmp_path, slopes, verdict):
    """A decline that stops above the collapse line contradicts "collapses" once every run has 4+ curve points
    in its second half; hand figures: finals 0.20, 0.21, 0.22 (mean 0.21, half width 4.3027 * 0.01 / sqrt 3 =
    0.0248), collapse line 0.15."""
    root = make_compare(tmp_path / "cmp", ["isft-"], BASE)
    for s, v, sl in zip(SEEDS, (0.20, 0.21, 0.22), slopes):
        make_run(root, "isft-", s, sampled=v, curve=_late_curve(v, sl), steps=200)
    c3 = evaluate_claims(collect([root]))["C3"]
    assert c3["verdict"] == verdict
    late = c3["measured"]["late_trend"]
    mean = sum(slopes) / 3
    half = T975_2 * statistics.stdev(slopes) / math.sqrt(3)
    assert late["points_per_100_steps"]["mean"] == pytest.approx(1e4 * mean, abs=1e-9)  # accuracy points
    low = 0.21 - T975_2 * 0.01 / math.sqrt(3)
    assert late["projected_low"] == pytest.approx(low + min(0.0, mean - half) * 200, abs=1e-9)
    assert ("levels off above" in c3["summary"]) == (verdict == CONTRADICTED)


def test_c3_short_curves_keep_the_two_readings(tmp_path):
    """With 3 points in a run's second half (the 60-step preset) there is no late reading: a decline above the
    collapse line stays inconclusive."""
    root = make_compare(tmp_path / "cmp", ["isft-"], BASE)
    for s, v in zip(SEEDS, (0.20, 0.21, 0.22)):
        make_run(root, "isft-", s, sampled=v, curve={15: 0.3, 30: v, 45: v, 60: v}, steps=60)
    c3 = evaluate_claims(collect([root]))["C3"]
    assert c3["verdict"] == INCONCLUSIVE and "late_trend" not in c3["measured"]


def test_an_arm_stands_in_for_its_algorithm(tmp_path):
    """report --stand-in binary-isft+-=isft+-: C2 judged on the arm's runs (the algorithm's own left out); bad
    mappings are one error naming the option."""
    from tokenmdp.commands.report import parse_stand_in
    from tokenmdp.errors import TokenMDPError

    root = make_compare(tmp_path / "cmp", ["grpo_nokl", "isft+-", "binary-isft+-"], BASE)
    for s in SEEDS:
        make_run(root, "grpo_nokl", s, sampled=0.40 + 0.01 * s)
        make_run(root, "isft+-", s, sampled=0.40 + 0.01 * s)  # equal to GRPO: within the margin
        make_run(root, "binary-isft+-", s, sampled=0.30 + 0.01 * s, trains="isft+-")  # 10 points below
    col = collect([root])
    plain = evaluate_claims(col)["C2"]["measured"]["isft+- - grpo_nokl"]
    moved = evaluate_claims(col.with_stand_ins(parse_stand_in("binary-isft+-=isft+-")))["C2"]["measured"]
    moved = moved["isft+- - grpo_nokl"]
    assert plain["sampled/pass@1"]["mean"] == pytest.approx(0.0, abs=1e-12) and plain["verdict"] == SUPPORTED
    assert moved["sampled/pass@1"]["mean"] == pytest.approx(-0.10) and moved["verdict"] == CONTRADICTED
    assert [r.algo for r in col.with_stand_ins({"binary-isft+-": "isft+-"}).runs].count("isft+-") == 3
    for bad, words in [("a", "not ARM=ALGO"), ("a=a", "not ARM=ALGO"), ("a=b,a=c", "given twice")]:
        with pytest.raises(TokenMDPError, match=f"--stand-in: .*{words}"):
            parse_stand_in(bad)
    with pytest.raises(TokenMDPError, match="--stand-in: no runs of nope"):
        col.with_stand_ins({"nope": "isft+-"})
