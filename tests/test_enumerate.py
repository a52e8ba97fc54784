"""Exact enumeration of tiny token MDPs under a tabular softmax policy."""

from __future__ import annotations

import pytest
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.enumerate import (
    all_groups,
    enumerate_sequences,
    exact_gradient,
    expected_return,
    group_probabilities,
    init_logits,
    probabilities,
    sample_sequences,
    sample_tokens,
    score_function,
    token_logprobs,
)
from tokenmdp.mdp.token import TokenMDP


def count_reward(prompt, response):
    """A reward with structure: +1 per token 1, -0.5 if truncated, prompt-dependent offset."""
    return response.count(1) - (0.5 if response[-1] != 0 else 0.0) + 0.1 * sum(prompt)


@pytest.fixture(params=[(2, 2), (3, 3), (4, 4)], ids=["V2L2", "V3L3", "V4L4"])
def table(request):
    v, length = request.param
    return enumerate_sequences(TokenMDP(count_reward, eos_id=0, max_len=length, vocab_size=v), prompt=(1, 2))


def test_counts_and_probabilities_sum_to_one(table):
    v, length = table.vocab_size, table.mdp.max_len
    assert table.num_sequences == sum((v - 1) ** k for k in range(length)) + (v - 1) ** length
    assert table.num_prefixes == sum((v - 1) ** k for k in range(length))
    theta = init_logits(table, seed=3, scale=2.0)
    p = probabilities(theta, table).detach()
    assert abs(float(p.sum()) - 1.0) < 1e-12 and torch.all(p > 0)
    assert torch.equal(table.terminated, table.tokens.gather(1, (table.lengths - 1).unsqueeze(1)).squeeze(1) == 0)
    for seq, r in zip(table.sequences, table.rewards.tolist()):
        assert table.mdp.is_complete(seq) and r == pytest.approx(count_reward((1, 2), seq))


def test_hand_computed_two_token_example():
    mdp = TokenMDP(lambda x, y: float(y == (1, 0)), eos_id=0, max_len=2, vocab_size=2)
    table = enumerate_sequences(mdp)
    assert table.sequences == ((0,), (1, 0), (1, 1))
    theta = torch.zeros(table.shape, dtype=torch.float64)
    torch.testing.assert_close(probabilities(theta, table), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    j, grad = exact_gradient(theta, table)
    assert j == pytest.approx(0.25)
    root, after_a = table.prefix_row(()), table.prefix_row((1,))
    expected = torch.zeros(table.shape, dtype=torch.float64)
    expected[root] = torch.tensor([-1 / 8, 1 / 8])
    expected[after_a] = torch.tensor([1 / 8, -1 / 8])
    torch.testing.assert_close(grad, expected)


def test_exact_gradient_matches_finite_differences(table):
    theta = init_logits(table, seed=0, scale=1.0, requires_grad=False)
    _, grad = exact_gradient(theta, table)
    h = 1e-6
    fd = torch.zeros_like(theta)
    for idx in range(theta.numel()):
        e = torch.zeros(theta.numel(), dtype=theta.dtype)
        e[idx] = h
        e = e.view_as(theta)
        fd.view(-1)[idx] = (expected_return(theta + e, table) - expected_return(theta - e, table)) / (2 * h)
    assert torch.max(torch.abs(fd - grad)) < 1e-4
    assert grad.abs().max() > 1e-3  # not a trivially zero gradient


def test_score_function_matches_autograd(table):
    theta = init_logits(table, seed=1, scale=1.5)
    scores = score_function(theta, table)
    for i in [0, table.num_sequences // 2, table.num_sequences - 1]:
        (g,) = torch.autograd.grad(token_logprobs(theta, table, torch.tensor([i])).sum(), theta)
        torch.testing.assert_close(scores[i], g)
    # grad J = sum_y p(y) R(y) score(y)
    p = probabilities(theta, table).detach()
    _, grad = exact_gradient(theta, table)
    torch.testing.assert_close(torch.einsum("n,n,nsv->sv", p, table.rewards, scores), grad)


def test_token_logprobs_are_zero_on_padding(table):
    theta = init_logits(table, seed=2)
    lp = token_logprobs(theta, table)
    assert torch.all(lp[~table.mask] == 0) and torch.all(lp[table.mask] < 0)


def test_sampling_matches_probabilities():
    mdp = TokenMDP(count_reward, eos_id=0, max_len=2, vocab_size=3)
    table = enumerate_sequences(mdp)
    theta = init_logits(table, seed=4)
    p = probabilities(theta, table).detach()
    n = 40_000
    freq = torch.bincount(sample_sequences(theta, table, n, seed=0), minlength=table.num_sequences) / n
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all(torch.abs(freq - p) < 5 * se)
    # token-by-token rollouts through TokenMDP.step draw from the same distribution
    rolls = sample_tokens(theta, table, 3000, seed=1)
    freq2 = torch.bincount(torch.tensor([table.index_of(y) for y, _ in rolls]), minlength=table.num_sequences) / 3000
    assert torch.all(torch.abs(freq2 - p) < 5 * torch.sqrt(p * (1 - p) / 3000) + 1e-3)
    assert all(r == pytest.approx(count_reward((), y)) for y, r in rolls[:50])
    # seeded: the same seed gives the same draws
    assert torch.equal(sample_sequences(theta, table, 10, seed=7), sample_sequences(theta, table, 10, seed=7))


def test_all_groups_probabilities_sum_to_one():
    table = enumerate_sequences(TokenMDP(count_reward, eos_id=0, max_len=2, vocab_size=3))
    groups = all_groups(table.num_sequences, 3)
    assert groups.shape == (table.num_sequences**3, 3)
    assert len({tuple(g) for g in groups.tolist()}) == groups.shape[0]
    theta = init_logits(table, seed=5)
    assert abs(float(group_probabilities(theta, table, groups).sum()) - 1) < 1e-12


def test_errors():
    with pytest.raises(TokenMDPError, match="exceed the limit"):
        enumerate_sequences(TokenMDP(count_reward, eos_id=0, max_len=8, vocab_size=4))
    table = enumerate_sequences(TokenMDP(count_reward, eos_id=0, max_len=2, vocab_size=2))
    with pytest.raises(TokenMDPError, match="theta must have shape"):
        probabilities(torch.zeros(5, 2, dtype=torch.float64), table)
    with pytest.raises(TokenMDPError, match="not a complete response"):
        table.index_of((1,))
