"""Advantage estimators: hand-computed values, and sampled / exact expectations against exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmdp.algos.core import (
    gae,
    grpo_advantages,
    overlong_penalty,
    reinforce_advantages,
    returns_to_go,
    rloo_advantages,
    whiten,
)
from tokenmdp.algos.core import policy_loss
from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.enumerate import (
    all_groups,
    enumerate_sequences,
    exact_gradient,
    group_probabilities,
    init_logits,
    probabilities,
    sample_sequences,
    score_function,
    token_logprobs,
)
from tokenmdp.mdp.token import TokenMDP

# ---------------------------------------------------------------- hand-computed values


def test_grpo_hand_values():
    r = torch.tensor([1.0, 0, 0, 1])
    s3 = math.sqrt(3) / 2  # 0.5 / sqrt(1/3) = 0.866
    torch.testing.assert_close(grpo_advantages(r, group_size=4, std="unbiased"),
                               torch.tensor([s3, -s3, -s3, s3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo_advantages(r, group_size=4, std="population"),
                               torch.tensor([1.0, -1, -1, 1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo_advantages(r, group_size=4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # two groups of two; all-equal group -> 0; batch scale uses the std of all four rewards (population 0.433)
    r2 = torch.tensor([1.0, 0, 1, 1])
    torch.testing.assert_close(grpo_advantages(r2, group_size=2, std="population"),
                               torch.tensor([1.0, -1, 0, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo_advantages(r2, group_size=2, scale="batch", std="population"),
                               torch.tensor([0.5, -0.5, 0, 0]) / math.sqrt(3 / 16), atol=1e-5, rtol=0)


def test_grpo_reduction_formula():
    """Population std, fraction p correct: A+ = sqrt((1-p)/p), A- = -sqrt(p/(1-p)) (docs/math.md section 4.3)."""
    r = torch.tensor([1.0, 0, 0, 0, 0])  # p = 0.2
    a = grpo_advantages(r, group_size=5, std="population", eps=0.0)
    torch.testing.assert_close(a, torch.tensor([2.0, -0.5, -0.5, -0.5, -0.5]))


def test_rloo_hand_values():
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 0, 0, 0]), group_size=4),
                               torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    # equals G/(G-1) times the group-centred reward
    r = torch.randn(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rloo_advantages(r, group_size=3), 1.5 * grpo_advantages(r, group_size=3, scale="none"))


def test_reinforce_baselines_and_state():
    r = torch.tensor([1.0, 0, 1, 1])
    a, s = reinforce_advantages(r, baseline="none")
    assert torch.equal(a, r) and s is None
    a, s = reinforce_advantages(r, baseline="batch_mean")
    torch.testing.assert_close(a, torch.tensor([0.25, -0.75, 0.25, 0.25]))
    a, s = reinforce_advantages(r, baseline="moving_average", state=0.5, momentum=0.9)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 0.5, 0.5]))
    assert float(s) == pytest.approx(0.525)
    a, s = reinforce_advantages(r, baseline="moving_average")  # first call: b = 0, state = batch mean
    assert torch.equal(a, r) and float(s) == pytest.approx(0.75)


def test_gae_hand_values():
    r = torch.tensor([[0.0, 0, 1, 0]])
    v = torch.tensor([[0.5, 0.6, 0.7, 9.9]])  # 9.9 sits on padding and must be ignored
    m = torch.tensor([[1, 1, 1, 0]])
    adv0, ret0 = gae(r, v, m, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([[0.1, 0.1, 0.3, 0]]))
    torch.testing.assert_close(ret0, torch.tensor([[0.6, 0.7, 1.0, 0]]))
    adv1, ret1 = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv1, torch.tensor([[0.5, 0.4, 0.3, 0]]))
    torch.testing.assert_close(ret1, torch.tensor([[1.0, 1, 1, 0]]))
    # gamma 0.9, lam 0.5: deltas [0.04, 0.03, 0.3]; A2 = 0.3, A1 = 0.03 + 0.45*0.3 = 0.165, A0 = 0.04 + 0.45*0.165
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.04 + 0.45 * 0.165, 0.165, 0.3, 0]]))


def test_gae_lambda_one_is_return_minus_value():
    gen = torch.Generator().manual_seed(0)
    r, v = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    m = (torch.arange(6) < torch.tensor([6, 3, 1, 4, 5]).unsqueeze(-1)).long()
    adv, ret = gae(r, v, m, gamma=0.95, lam=1.0)
    torch.testing.assert_close(adv, (returns_to_go(r, m, gamma=0.95) - v) * m)
    torch.testing.assert_close(ret, returns_to_go(r, m, gamma=0.95))


def test_returns_to_go_whiten_overlong():
    torch.testing.assert_close(returns_to_go(torch.tensor([[0.0, 1, 2]]), torch.ones(1, 3), gamma=0.5),
                               torch.tensor([[1.0, 2, 2]]))
    x, m = torch.tensor([[1.0, 3, 100], [5.0, 7, 0]]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, m)
    torch.testing.assert_close(w[m.bool()], (torch.tensor([1.0, 3, 5, 7]) - 4) / math.sqrt(5), atol=1e-6, rtol=0)
    assert w[0, 2] == 0
    torch.testing.assert_close(overlong_penalty(torch.tensor([6, 8, 10, 12]), max_len=10, buffer=4),
                               torch.tensor([0.0, -0.5, -1, -1]))


def test_bad_input():
    with pytest.raises(TokenMDPError, match="group_size 3 must be >= 1 and divide the batch size 4"):
        grpo_advantages(torch.zeros(4), group_size=3)
    with pytest.raises(TokenMDPError, match="rloo needs group_size >= 2"):
        rloo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(TokenMDPError, match="scale must be"):
        grpo_advantages(torch.zeros(4), group_size=2, scale="global")
    with pytest.raises(TokenMDPError, match="std must be"):
        grpo_advantages(torch.zeros(4), group_size=2, std="sample")
    with pytest.raises(TokenMDPError, match="baseline must be"):
        reinforce_advantages(torch.zeros(4), baseline="critic")
    with pytest.raises(TokenMDPError, match="gae: token_rewards"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# ---------------------------------------------------------------- against exact enumeration


def graded_reward(prompt, response):
    """Non-binary: 1 per token 1 before EOS, -0.5 if truncated (so the estimators see a spread of returns)."""
    return float(response.count(1)) - (0.0 if response[-1] == 0 else 0.5)


def binary_reward(prompt, response):
    """Correct iff the response is exactly ``1 EOS``: short right answer, wrong answers mostly long."""
    return float(response == (1, 0))


def expected_update(theta, table, group_size, adv_fn, aggregation):
    """Exact expectation, over all groups of i.i.d. responses, of the update -grad policy_loss (on-policy).

    The loss is linear in the advantages at ratio 1 and the aggregations used here are means over groups of
    per-group terms, so weighting each group's advantages by ``P(group) * num_groups`` gives sum_g P(g) e(g).
    """
    groups = all_groups(table.num_sequences, group_size)
    weight = (group_probabilities(theta, table, groups) * groups.shape[0]).repeat_interleave(group_size)
    idx = groups.reshape(-1)
    adv = adv_fn(table.rewards[idx]) * weight
    th = theta.detach().clone().requires_grad_(True)
    logp = token_logprobs(th, table, idx)
    loss, _ = policy_loss(logp, logp.detach(), adv, table.mask[idx], aggregation=aggregation)
    (update,) = torch.autograd.grad(-loss, th)
    return update


@pytest.fixture(scope="module")
def graded_table():
    return enumerate_sequences(TokenMDP(graded_reward, eos_id=0, max_len=3, vocab_size=3))


@pytest.mark.parametrize("estimator", ["reinforce_none", "reinforce_moving_average", "rloo"])
def test_sampled_estimators_are_unbiased(graded_table, estimator):
    """Mean of 20,000 sampled group estimates is within 4.5 standard errors of the exact grad J (every entry),
    and within 5 % in norm."""
    table, k, m = graded_table, 4, 20_000
    theta = init_logits(table, seed=1, scale=1.0, requires_grad=False)
    _, exact = exact_gradient(theta, table)
    idx = sample_sequences(theta, table, m * k, seed=0)
    rewards = table.rewards[idx]
    if estimator == "rloo":
        adv = rloo_advantages(rewards, group_size=k)
    elif estimator == "reinforce_none":
        adv, _ = reinforce_advantages(rewards, baseline="none")
    else:  # a baseline from past batches (state) does not depend on this batch: unbiased
        adv, _ = reinforce_advantages(rewards, baseline="moving_average", state=0.4)
    th = theta.clone().requires_grad_(True)
    logp = token_logprobs(th, table, idx)
    loss, _ = policy_loss(logp, logp.detach(), adv, table.mask[idx], aggregation="seq_mean_token_sum")
    (mean_est,) = torch.autograd.grad(-loss, th)
    # per-group estimates in closed form give the standard error (and check the loss's gradient)
    per_seq = adv.view(-1, 1, 1) * score_function(theta, table)[idx]
    per_group = per_seq.view(m, k, *table.shape).mean(dim=1)
    torch.testing.assert_close(per_group.mean(0), mean_est)
    se = per_group.std(0) / math.sqrt(m)
    assert torch.all((mean_est - exact).abs() <= 4.5 * se + 1e-12)
    assert float((mean_est - exact).norm() / exact.norm()) < 0.05


def test_exact_expectations_of_group_estimators(graded_table):
    """Enumerating every group of G = 3: RLOO's expected update is grad J exactly; a group-mean baseline that
    includes R_i (GRPO without std, or REINFORCE with the batch mean) shrinks it by exactly (G-1)/G."""
    table, g = graded_table, 3
    theta = init_logits(table, seed=2, scale=1.0, requires_grad=False)
    _, exact = exact_gradient(theta, table)
    rloo = expected_update(theta, table, g, lambda r: rloo_advantages(r, group_size=g), "seq_mean_token_sum")
    torch.testing.assert_close(rloo, exact, atol=1e-10, rtol=1e-8)
    centred = expected_update(theta, table, g, lambda r: grpo_advantages(r, group_size=g, scale="none"),
                              "seq_mean_token_sum")
    torch.testing.assert_close(centred, (g - 1) / g * exact, atol=1e-10, rtol=1e-8)
    per_batch = torch.vmap(lambda r: reinforce_advantages(r, baseline="batch_mean")[0])
    batch_mean = expected_update(theta, table, g, lambda r: per_batch(r.view(-1, g)).reshape(-1),
                                 "seq_mean_token_sum")
    torch.testing.assert_close(batch_mean, centred)


def test_grpo_length_normalisation_biases_toward_longer_wrong_answers():
    """Binary reward, the right answer is short ('1 EOS'); wrong answers have lengths 1..3.

    With a binary reward any sequence-level advantage summed over tokens has an expected update exactly parallel to
    grad J (only the scale is off). GRPO's 1/|o_i| factor tilts the direction: per unit of expected-return gain,
    its expected update raises the mean length of wrong answers more than the exact gradient does (at the uniform
    policy, exact values from the enumeration: 129/64 vs 63/64 tokens per unit of J).
    """
    table = enumerate_sequences(TokenMDP(binary_reward, eos_id=0, max_len=3, vocab_size=3))
    wrong = (table.rewards == 0).double()

    def wrong_length(theta):
        p = probabilities(theta, table)
        return (p * wrong * table.lengths).sum() / (p * wrong).sum()

    g = 3
    grpo = lambda r: grpo_advantages(r, group_size=g, std="unbiased")  # noqa: E731
    for seed, scale in [(0, 0.0), (0, 1.0), (1, 1.0), (2, 1.0)]:
        theta = init_logits(table, seed=seed, scale=scale, requires_grad=False)
        _, grad_j = exact_gradient(theta, table)
        th = theta.clone().requires_grad_(True)
        (grad_len,) = torch.autograd.grad(wrong_length(th), th)

        def length_per_return(u, grad_len=grad_len, grad_j=grad_j):
            return float((grad_len * u).sum() / (grad_j * u).sum())

        u_grpo = expected_update(theta, table, g, grpo, "seq_mean_token_mean")
        u_sum = expected_update(theta, table, g, grpo, "seq_mean_token_sum")
        cos = float((u_sum * grad_j).sum() / (u_sum.norm() * grad_j.norm()))
        assert cos == pytest.approx(1.0, abs=1e-9)
        assert float((u_grpo * grad_j).sum()) > 0  # GRPO still ascends J ...
        assert length_per_return(u_grpo) > length_per_return(grad_j) + 0.2  # ... but lengthens wrong answers
        if scale == 0.0:
            assert length_per_return(grad_j) == pytest.approx(63 / 64)
            assert length_per_return(u_grpo) == pytest.approx(129 / 64)
