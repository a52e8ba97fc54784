"""The simulated tier: its exact expected update against the exact tier's enumeration, the sampled update's mean
against it, the small-lr limit of the sampled mean path, the summaries' hand values, and the command."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tokenmdp.cli import app, main
from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact import GroupBatch, enumerate_groups, expected_update, make_point, variants
from tokenmdp.experiments.simulated import (SimRun, check_variant, clopper_pearson, collapse_steps, logits,
                                            response_types, run_sweep, sampled_grad, sim_table, simulate, start_params,
                                            summarize, type_update)
from tokenmdp.experiments.simulated.types import plain_point
from tokenmdp.mdp.enumerate import init_logits

PRESETS = ["grpo_nokl", "dr_grpo", "isft+", "isft-", "isft+-", "isft+-adv", "rloo", "dapo", "gspo"]


@pytest.fixture(scope="module")
def small():
    """The exact tier's default MDP (vocab 3, max_len 3: 15 responses, 5 types) and its groups of 4."""
    table = sim_table(3, 3)
    theta = init_logits(table, seed=0, requires_grad=False)
    groups = enumerate_groups(table, 4)
    point = make_point(theta, groups)
    return table, theta, GroupBatch(groups, point), point


@pytest.mark.parametrize("name", PRESETS)
def test_type_update_equals_the_exact_tier(small, name):
    """Summing over multisets of (reward, length) types gives the update of the exact tier's multisets of
    responses, to float rounding."""
    table, theta, batch, point = small
    v = variants()[name]
    want, _ = expected_update(v, batch, point)
    tu = type_update(v, response_types(table), 4, theta)
    got = tu.update(theta).reshape(-1)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.norm())
    # the coefficients, computed once at the start, hold at another theta too
    other = theta + 0.7 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(5), dtype=theta.dtype)
    point2 = make_point(other, batch.groups)
    want2, _ = expected_update(v, GroupBatch(batch.groups, point2), point2)
    assert float((tu.update(other).reshape(-1) - want2).abs().max()) <= 1e-12 * float(want2.norm())


def test_types_of_the_default_mdp():
    types = response_types(sim_table())
    assert types.table.num_sequences == 127 and types.table.num_prefixes == 63
    # correct at lengths 2..6, wrong at 1..6 (a truncated response is wrong at length 6)
    assert types.num == 11
    assert sorted(types.length[types.reward > 0.5].tolist()) == [2, 3, 4, 5, 6]
    assert sorted(types.length[types.reward < 0.5].tolist()) == [1, 2, 3, 4, 5, 6]


def test_tied_update_is_the_chain_rule(small):
    """With a token bias shared by every state, the state rows move as untied and the shared row by their sum."""
    table, theta, _, _ = small
    tu = type_update(variants()["grpo_nokl"], response_types(table), 4, theta)
    params = torch.cat([theta, torch.zeros(1, 3, dtype=theta.dtype)])
    tied = tu.update(params, tied=True)
    plain = tu.update(theta)
    assert torch.allclose(tied[:-1], plain, rtol=0, atol=1e-15)
    assert torch.allclose(tied[-1], plain.sum(0), rtol=0, atol=1e-14)
    assert torch.equal(logits(params, True), theta)


@pytest.mark.parametrize("name", ["grpo_nokl", "isft-"])
def test_sampled_update_is_unbiased(name):
    """The mean of 4,000 sampled one-group updates at the start matches the exact expected update: every
    coordinate that at least 100 of the groups touch within 4.5 standard errors (the rarer ones have no usable
    standard error), and the whole within cosine 0.98."""
    table = sim_table()
    v = variants()[name]
    theta0 = start_params(table, seed=3, scale=1.0, tied=False)
    b = 4000
    theta = theta0.expand(b, *theta0.shape).clone()
    p = plain_point(theta0, table).logprobs.sum(-1).exp()
    rows = torch.multinomial(p.expand(b, -1), 4, replacement=True, generator=torch.Generator().manual_seed(0))
    per_seed = -sampled_grad(v, theta, table, rows, plain_point(theta0, table)).reshape(b, -1)
    mean, se = per_seed.mean(0), per_seed.std(0) / math.sqrt(b)
    want = type_update(v, response_types(table), 4, theta0).update(theta0).reshape(-1)
    seen = (per_seed != 0).sum(0) >= 100
    z = (mean - want)[seen] / se[seen]
    assert int(seen.sum()) > 60
    assert float(z.abs().max()) < 4.5
    assert float(mean @ want / (mean.norm() * want.norm())) > 0.98


def test_isft_adv_sampled_equals_grpo():
    """The reduction on every sampled group: isft+-adv's gradient is grpo_nokl's (float32 advantage weights)."""
    table = sim_table()
    theta0 = start_params(table, seed=3, scale=1.0, tied=True)
    theta = theta0.expand(64, *theta0.shape).clone()
    ref = plain_point(logits(theta0, True), table)
    rows = torch.multinomial(ref.logprobs.sum(-1).exp().expand(64, -1), 8, replacement=True,
                             generator=torch.Generator().manual_seed(1))
    a = sampled_grad(variants()["grpo_nokl"], theta, table, rows, ref, tied=True)
    b = sampled_grad(variants()["isft+-adv"], theta, table, rows, ref, tied=True)
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


def test_small_lr_mean_path_approaches_the_exact_path():
    """Plain SGD at a small step: the seeds' mean P(correct) after 40 steps is the exact path's within sampling
    error (4 standard errors), though the path moved by many of them."""
    run = simulate("dr_grpo", lr=0.05, group_size=4, steps=40, seeds=400, optimizer="sgd", tied=False)
    pc = run.curves["p_correct"]
    se = pc[-1].std(ddof=1) / math.sqrt(pc.shape[1])
    exact = run.exact["p_correct"]
    assert abs(exact[-1] - exact[0]) > 10 * se
    assert abs(pc[-1].mean() - exact[-1]) < 4 * se
    assert pc[0, 0] == pytest.approx(exact[0], abs=1e-12)


def test_curves_stay_exact_when_the_policy_is_almost_always_right():
    """E[length | incorrect] comes from the wrong answers' own log-probs: finite and right when P(correct) rounds
    to 1 (the start's logit table pushed hard towards 'a EOS')."""
    from tokenmdp.experiments.simulated import policy_curves

    table = sim_table()
    theta = start_params(table, seed=3, scale=1.0, tied=False)
    theta[table.prefix_row(()), 1] += 60.0  # 'a' first
    theta[table.prefix_row((1,)), 0] += 60.0  # then EOS
    c = policy_curves(theta.unsqueeze(0), table)
    assert float(c["p_correct"][0]) == 1.0
    p = torch.exp(torch.log_softmax(theta, -1)[table.prefix_index, table.tokens].where(table.mask, 0.0).sum(-1))
    wrong = table.rewards < 0.5
    want = float((p[wrong] * table.lengths[wrong]).sum() / p[wrong].sum())
    assert 1.0 <= float(c["len_incorrect"][0]) <= 6.0 and float(c["len_incorrect"][0]) == pytest.approx(want)


def test_runs_are_reproducible_and_seeds_differ():
    a = simulate("isft-", lr=0.3, group_size=4, steps=5, seeds=3, exact=False)
    b = simulate("isft-", lr=0.3, group_size=4, steps=5, seeds=3, exact=False)
    assert np.array_equal(a.curves["p_correct"], b.curves["p_correct"])
    assert len(set(a.curves["p_correct"][-1].tolist())) == 3
    assert a.exact is None


def test_collapse_steps_hand_values():
    pc = np.array([[0.4, 0.4, 0.4], [0.3, 0.1, 0.3], [0.1, 0.5, 0.25]])
    # below 0.5 * 0.4 = 0.2: seed 0 first at step 2, seed 1 at step 1, seed 2 never
    assert collapse_steps(pc).tolist() == [2, 1, -1]


def test_clopper_pearson_hand_value():
    low, high = clopper_pearson(0, 20)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 20), rel=1e-9)


def test_summarize_hand_values():
    pc = np.array([[0.4, 0.4], [0.1, 0.5], [0.3, 0.6]])
    li = np.array([[3.0, 3.0], [4.0, 3.0], [5.0, 4.0]])
    run = SimRun("isft-", 0.1, 4, "adam", {"p_correct": pc, "len_incorrect": li, "entropy": np.ones_like(pc)},
                 None, 1.0)
    s = summarize(run, curve_every=1)
    assert s["collapse_rate"] == 0.5 and s["ended_collapsed"] == 0.0 and s["collapse_step_median"] == 1
    assert s["len_incorrect_drift"]["mean"] == pytest.approx(1.5)  # drifts 2 and 1
    assert s["p_correct_end"]["mean"] == pytest.approx(0.45)
    assert s["curves"]["p_correct"]["mean"] == pytest.approx([0.4, 0.3, 0.45])


def test_bad_input_is_one_clear_error():
    with pytest.raises(TokenMDPError, match="unknown preset 'nope'"):
        simulate("nope", lr=0.1, group_size=4, steps=1, seeds=2)
    with pytest.raises(TokenMDPError, match="'ppo_oracle'"):
        simulate("ppo_oracle", lr=0.1, group_size=4, steps=1, seeds=2)
    with pytest.raises(TokenMDPError, match="lr must be > 0"):
        simulate("isft+", lr=0.0, group_size=4, steps=1, seeds=2)
    with pytest.raises(TokenMDPError, match="exceed the limit"):
        simulate("isft+", lr=0.1, group_size=16, steps=1, seeds=2)
    with pytest.raises(TokenMDPError, match="batch whitening"):
        check_variant(replace(variants()["grpo_nokl"], spec=replace(variants()["grpo_nokl"].spec,
                                                                    whiten_advantages=True)))
    # a sweep checks every setting before the first runs: nothing trains when the last preset is unknown
    calls = []
    with pytest.raises(TokenMDPError, match="unknown preset 'nope'"):
        run_sweep(presets=["isft+", "nope"], lrs=[0.1], group_sizes=[4], seeds=2, steps=1, optimizer="adam",
                  tied=True, start_seed=3, seed=0, progress=calls.append)
    with pytest.raises(TokenMDPError, match="exceed the limit"):
        run_sweep(presets=["isft+"], lrs=[0.1], group_sizes=[4, 11], seeds=2, steps=1, optimizer="adam",
                  tied=True, start_seed=3, seed=0, progress=calls.append)
    assert calls == []


def test_kl_preset_runs_sampled_without_an_exact_path():
    run = simulate("grpo", lr=0.1, group_size=4, steps=3, seeds=4)
    assert run.exact is None and run.curves["p_correct"].shape == (4, 4)


def test_command_writes_the_report(tmp_path, capsys):
    res = CliRunner().invoke(app, ["simulate", "--presets", "grpo_nokl,isft-", "--lrs", "0.1,1", "--group-sizes",
                                   "4", "--seeds", "8", "--steps", "20", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "sim.json").read_text())
    assert [(r["preset"], r["lr"]) for r in doc["runs"]] == [("grpo_nokl", 0.1), ("isft-", 0.1), ("grpo_nokl", 1.0),
                                                              ("isft-", 1.0)]
    assert doc["runs"][0]["start"]["p_correct"] == pytest.approx(0.308, abs=5e-4)
    assert "| isft- | 1 |" in (tmp_path / "summary.md").read_text()
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"sim_paths_G4.png", "sim_collapse.png",
                                                                 "sim_length.png"}
    assert main(["simulate", "--lrs", "fast"]) == 2
    assert "--lrs takes comma-separated numbers, got 'fast'" in capsys.readouterr().err
    assert main(["simulate", "--group-sizes", "4.5"]) == 2
    assert "--group-sizes takes comma-separated integers, got '4.5'" in capsys.readouterr().err
