"""The exact tier: expected updates by enumerating every group, the identities of docs/math.md sections 4.2
and 7, and the `tokenmdp exact` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenmdp.algos.dpo import dpo_loss, preference_pairs, sequence_logps
from tokenmdp.algos.isft import isft_loss, kept_counts
from tokenmdp.algos.core import compute_advantages, kl_reward, policy_loss
from tokenmdp.algos.presets import get_algo
from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact import (
    DEFAULTS,
    MAX_GROUPS,
    Variant,
    GroupBatch,
    enumerate_groups,
    exact_mdp,
    expected_update,
    make_point,
    run_exact,
    state_values,
    variants,
)
from tokenmdp.mdp.credit import assign_credit
from tokenmdp.mdp.enumerate import (
    all_groups,
    enumerate_sequences,
    exact_gradient,
    group_probabilities,
    init_logits,
    probabilities,
    token_logprobs,
)

SCHEMA = {"mdp", "group_size", "steps", "lr", "seed", "start", "grad_J_norm", "presets", "skipped", "identities",
          "dynamics", "seconds"}
IDENTITY_KEYS = {"isft+-adv_vs_grpo_nokl_max_abs_diff", "isft+_seqsum_cosine", "isft-_seqsum_cosine",
                 "isft+_seqsum_scale", "isft-_seqsum_scale", "dr_grpo_cosine", "len_incorrect_shift"}
RECORD_KEYS = {"step", "J", "p_correct", "len_correct", "len_incorrect", "p_truncated"}


@pytest.fixture(scope="module")
def default():
    """The default MDP (V = 3, L = 3, G = 4, seed 0) with a short run of the dynamics."""
    return run_exact(steps=6)


def test_schema(default):
    assert SCHEMA <= set(default)
    assert {"vocab", "max_len", "num_sequences", "num_groups", "description"} <= set(default["mdp"])
    assert default["mdp"]["num_sequences"] == 15 and default["mdp"]["num_groups"] == math.comb(18, 4)
    assert default["mdp"]["correct_lengths"] == [2, 3] and default["mdp"]["incorrect_lengths"] == [1, 2, 3]
    assert set(default["start"]) == RECORD_KEYS - {"step"}
    assert IDENTITY_KEYS <= set(default["identities"])
    assert set(default["identities"]["len_incorrect_shift"]) >= {"grpo_nokl", "dr_grpo"}
    assert "ppo" in default["skipped"] and "ppo" not in default["presets"]
    for name, p in default["presets"].items():
        assert {"cosine", "norm_ratio", "variance", "description"} <= set(p), name
        assert p["variance"] > 0 and p["description"]
        recs = default["dynamics"][name]
        assert [r["step"] for r in recs] == list(range(7)) and RECORD_KEYS <= set(recs[0])
        assert all(r["step_size"] == pytest.approx(default["lr"]) for r in recs)  # unit-length steps
    assert default["start"]["p_truncated"] > 0.1 and 0.2 < default["start"]["J"] < 0.8
    json.dumps(default, allow_nan=False)


def test_hand_computed_tiny_case():
    """V = 2, L = 2, theta = 0: [0], [1, 0] (correct), [1, 1] (truncated), p = 1/2, 1/4, 1/4 (module docstring)."""
    r = run_exact(vocab=2, max_len=2, group_size=2, steps=1, init_scale=0.0, presets=["reinforce", "rloo"])
    start = r["start"]
    assert start["J"] == pytest.approx(0.25) and start["p_correct"] == pytest.approx(0.25)
    assert start["len_correct"] == pytest.approx(2.0) and start["len_incorrect"] == pytest.approx(4 / 3)
    assert start["p_truncated"] == pytest.approx(0.25)
    assert r["grad_J_norm"] == pytest.approx(0.25)
    table = enumerate_sequences(exact_mdp(2, 2))
    j, grad = exact_gradient(torch.zeros(table.shape, dtype=torch.float64), table)
    assert j == pytest.approx(0.25)
    root, after_a = table.prefix_row(()), table.prefix_row((1,))
    torch.testing.assert_close(grad[root], torch.tensor([-1 / 8, 1 / 8], dtype=torch.float64))
    torch.testing.assert_close(grad[after_a], torch.tensor([1 / 8, -1 / 8], dtype=torch.float64))
    p = r["presets"]
    # REINFORCE (b = 0), token sum / L: one sample's update R s / 2, E|x|^2 = 1/16, |E x|^2 = 1/64
    assert p["reinforce"]["scale"] == pytest.approx(0.5) and p["reinforce"]["variance"] == pytest.approx(3 / 64)
    assert p["rloo"]["scale"] == pytest.approx(0.5)
    assert p["dr_grpo"]["scale"] == pytest.approx(0.25)  # (G - 1) / (G L)


def test_isft_adv_equals_grpo_without_kl(default):
    ids = default["identities"]
    assert ids["isft+-adv_vs_grpo_nokl_max_abs_diff"] < 1e-6 and ids["isft+-adv_vs_grpo_nokl_rel_diff"] < 1e-6
    assert default["presets"]["isft+-adv"]["variance"] == pytest.approx(default["presets"]["grpo_nokl"]["variance"],
                                                                        rel=1e-6)


def test_ratio_losses_take_their_aggregations_step_on_policy(default):
    """GSPO, CISPO and SAPO differ from the clipped surrogate only off-policy: in the exact tier's one on-policy
    step gspo's expected update is grpo_nokl's and cispo's and sapo's are dapo's (token mean, no KL, its overlong
    penalty off), with the same variance."""
    rows = default["presets"]
    for name, twin in (("gspo", "grpo_nokl"), ("cispo", "dapo"), ("sapo", "dapo")):
        for key in ("cosine", "norm_ratio", "update_norm", "variance"):
            assert rows[name][key] == pytest.approx(rows[twin][key], rel=1e-9, abs=1e-12), (name, key)
    assert rows["gspo"]["cosine"] < rows["cispo"]["cosine"]  # the 1/|o| factor bends grpo_nokl's, not the token mean


def test_isft_sequence_sum_is_grad_j_over_l(default):
    ids, length = default["identities"], default["mdp"]["max_len"]
    for sign in "+-":
        assert ids[f"isft{sign}_seqsum_cosine"] == pytest.approx(1.0, abs=1e-9)
        assert ids[f"isft{sign}_seqsum_scale"] == pytest.approx(1 / length, rel=1e-9)
    p = default["presets"]
    for name in ("reinforce", "rloo"):
        assert p[name]["cosine"] == pytest.approx(1.0, abs=1e-9) and p[name]["scale"] == pytest.approx(1 / length)
    # REINFORCE with b = 0 is the ISFT+ estimator itself; negatives are the noisier half (docs/math.md section 7)
    assert p["reinforce"]["variance"] == pytest.approx(p["isft+_seqsum_const"]["variance"], rel=1e-9)
    assert p["isft-_seqsum_const"]["relative_variance"] > 2 * p["isft+_seqsum_const"]["relative_variance"]


def test_dr_grpo_is_an_exact_multiple(default):
    g, length = default["group_size"], default["mdp"]["max_len"]
    assert default["identities"]["dr_grpo_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert default["identities"]["dr_grpo_scale"] == pytest.approx((g - 1) / (g * length), rel=1e-9)


def test_reward_only_weights_keep_the_direction_length_weights_bend_it(default):
    """On one prompt a weight that depends on the group's rewards alone is a multiple of grad J (closed-form
    scales); 1/|o| and token means are not."""
    p, j, g, length = default["presets"], default["start"]["J"], default["group_size"], default["mdp"]["max_len"]
    for name in ("grpo_nokl_seqsum", "isft+_seqsum_kept", "isft-_seqsum_kept", "dpo"):
        assert p[name]["cosine"] == pytest.approx(1.0, abs=1e-9), name
    assert p["isft+_seqsum_kept"]["scale"] == pytest.approx((1 - (1 - j) ** g) / (j * length), rel=1e-9)
    assert p["isft-_seqsum_kept"]["scale"] == pytest.approx((1 - j**g) / ((1 - j) * length), rel=1e-9)
    mixed = 1 - j**g - (1 - j) ** g
    assert p["dpo"]["scale"] == pytest.approx(0.1 / 2 * mixed / (j * (1 - j)), rel=1e-9)  # at the reference
    for name in ("grpo", "grpo_nokl", "bnpo", "isft+", "isft-", "isft+-", "ppo_oracle"):
        assert p[name]["cosine"] < 1 - 1e-4, name
    assert p["grpo"]["cosine"] == pytest.approx(p["grpo_nokl"]["cosine"], abs=1e-12)  # KL to the start: 0 there


def test_length_shift_signs(default):
    """GRPO's 1/|o| lengthens wrong answers; Dr. GRPO (and GRPO without the 1/|o|) do not, on the default."""
    ids = default["identities"]
    shift, slope = ids["len_incorrect_shift"], ids["len_incorrect_slope"]
    assert shift["grpo_nokl"] > 0 and slope["grpo_nokl"] > 0
    assert shift["dr_grpo"] < 0 and slope["dr_grpo"] < 0  # this MDP and start; see the test over seeds
    assert shift["grpo_nokl_seqsum"] == pytest.approx(shift["dr_grpo"], abs=1e-9)


@pytest.mark.parametrize("max_len", [3, 4])
def test_length_bias_over_seeds(max_len):
    """The robust part of the claim: GRPO's first-order change of E[len | incorrect] exceeds Dr. GRPO's."""
    for seed in range(3):
        r = run_exact(steps=0, group_size=3 if max_len == 3 else 2, max_len=max_len, seed=seed, presets=[])
        slope = r["identities"]["len_incorrect_slope"]
        assert slope["grpo_nokl"] > slope["dr_grpo"] + 1e-3, (max_len, seed)


def _direct(v, table, theta, ref_theta, g):
    """The expected update over *ordered* groups, each group a trainer-style batch differentiated in theta."""
    groups = all_groups(table.num_sequences, g)
    weights = group_probabilities(theta, table, groups)
    s, length = v.spec, table.mdp.max_len
    values = state_values(theta, table)
    us = []
    for idx in groups:
        leaf = theta.clone().requires_grad_(True)
        lp, ref = token_logprobs(leaf, table, idx), token_logprobs(ref_theta, table, idx)
        mask, rewards = table.mask[idx], table.rewards[idx]
        correct = rewards > 0.5
        if s.kind == "pg":
            token_rewards = None
            if s.kl_in == "reward" and s.kl_coef > 0:
                token_rewards, _ = kl_reward(assign_credit(s.credit, rewards, mask), lp.detach(), ref, mask,
                                             kl_coef=s.kl_coef, estimator=s.kl_estimator)
            adv, _, _ = compute_advantages(s, rewards, mask, group_size=g, values=values[idx] if s.critic else None,
                                           token_rewards=token_rewards, max_len=length)
            loss, _ = policy_loss(lp, lp.detach(), adv, mask, clip_low=s.clip_low, clip_high=s.clip_high,
                                  aggregation=s.aggregation, ref_logprobs=ref,
                                  kl_coef=s.kl_coef if s.kl_in == "loss" else 0.0, kl_estimator=s.kl_estimator,
                                  max_len=length, num_tokens=mask.sum(), num_seqs=g)
        elif s.kind == "isft":
            adv = compute_advantages(s, rewards, mask, group_size=g)[0][:, 0] if s.isft_weighting == "advantage" \
                else None
            n_tok, n_seq = kept_counts(mask, correct, mode=s.isft_mode)
            loss, _ = isft_loss(lp, mask, correct, mode=s.isft_mode, weighting=s.isft_weighting, advantages=adv,
                                aggregation=s.aggregation, max_len=length, num_tokens=n_tok,
                                num_seqs=g if v.const_divisor else n_seq)
        else:
            ch, rj = preference_pairs(correct.float(), group_size=g)
            if len(ch) == 0:
                us.append(torch.zeros(theta.numel(), dtype=torch.float64))
                continue
            seq, seq_ref = sequence_logps(lp, mask), sequence_logps(ref, mask)
            loss, _ = dpo_loss(seq[ch], seq[rj], seq_ref[ch], seq_ref[rj], beta=s.dpo_beta)
        us.append(-torch.autograd.grad(loss, leaf)[0].reshape(-1))
    u = torch.stack(us)
    mean = weights @ u
    return mean, weights @ (u * u).sum(-1) - mean @ mean


def test_multisets_and_buckets_match_ordered_groups():
    """Bucketed multisets (with cached coefficients from the start) = the plain sum over ordered groups, at a
    theta away from the reference, for every kind of loss; DPO's tie-break averages out over orderings."""
    table = enumerate_sequences(exact_mdp(2, 3))  # [0], [1, 0], [1, 1, 0], [1, 1, 1]: two correct
    g = 3
    groups = enumerate_groups(table, g)
    theta0 = init_logits(table, seed=1, requires_grad=False)
    theta1 = theta0 + 0.7 * init_logits(table, seed=2, requires_grad=False)
    batch = GroupBatch(groups, make_point(theta0, groups))
    start = make_point(theta0, groups)
    moved = make_point(theta1, groups)
    names = ["reinforce", "rloo", "grpo", "bnpo", "dr_grpo", "dapo", "ppo_oracle", "dpo", "isft+", "isft-",
             "isft+-adv", "isft+_seqsum_const", "isft-_seqsum_kept"]
    for name in names:
        v = variants()[name]
        expected_update(v, batch, start)  # fills the coefficient cache of theta-free variants
        mean, var = expected_update(v, batch, moved, per_group=True)
        ref_mean, ref_var = _direct(v, table, theta1, theta0, g)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-9, msg=name)
        assert float(var) == pytest.approx(float(ref_var), rel=1e-6, abs=1e-12), name
        fast, _ = expected_update(v, batch, moved)
        torch.testing.assert_close(fast, mean, rtol=1e-9, atol=1e-12, msg=name)


def test_group_weights_and_state_values():
    table = enumerate_sequences(exact_mdp(3, 2))
    groups = enumerate_groups(table, 3)
    theta = init_logits(table, seed=3, requires_grad=False)
    assert groups.num == math.comb(table.num_sequences + 2, 3)
    assert float(groups.probabilities(theta).sum()) == pytest.approx(1.0, abs=1e-12)
    values = state_values(theta, table)
    j = float(probabilities(theta, table) @ table.rewards)
    assert torch.allclose(values[:, 0], torch.full((table.num_sequences,), j, dtype=torch.float64))


def test_too_large_is_one_clear_error():
    with pytest.raises(TokenMDPError, match=rf"exceed the limit of MAX_GROUPS = {MAX_GROUPS}") as info:
        run_exact(max_len=4, group_size=8)
    assert str(math.comb(31 + 7, 8)) in str(info.value) and "--group-size" in str(info.value)
    with pytest.raises(TokenMDPError, match="group_size must be >= 2"):
        run_exact(group_size=1)
    with pytest.raises(TokenMDPError, match="unknown preset.*skipped presets: ppo"):
        run_exact(presets=["ppo"])


def test_unsupported_choices_are_named():
    table = enumerate_sequences(exact_mdp(2, 2))
    groups = enumerate_groups(table, 2)
    point = make_point(init_logits(table, seed=0, requires_grad=False), groups)
    batch = GroupBatch(groups, point)
    for overrides, what in (({"epochs": 2}, "epochs > 1"), ({"whiten_advantages": True}, "batch whitening"),
                            ({"std_scale": "batch"}, "batch-wide std"), ({"entropy_coef": 0.01}, "entropy")):
        v = Variant("custom", get_algo("grpo", **overrides), "")
        with pytest.raises(TokenMDPError, match=what):
            expected_update(v, batch, point)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from tokenmdp.cli import app, main
    from tokenmdp.commands.exact import D

    assert D == DEFAULTS
    res = CliRunner().invoke(app, ["exact", "--json", "--steps", "2", "--presets", "rloo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert SCHEMA <= set(doc) and "rloo" in doc["presets"] and len(doc["dynamics"]["rloo"]) == 3
    assert json.loads((tmp_path / "exact.json").read_text())["presets"].keys() == doc["presets"].keys()
    for name in ("exact_directions", "exact_dynamics"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["exact", "--max-len", "4", "--group-size", "8"]) == 2
