"""DPO / IPO and filtered iterative SFT: hand values, gradients, the on-policy GRPO identity, invariances."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmdp.algos.core import AGGREGATIONS, grpo_advantages, policy_loss
from tokenmdp.algos.dpo import dpo_loss, preference_pairs, sequence_logps
from tokenmdp.algos.isft import isft_loss, kept_counts
from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.enumerate import enumerate_sequences, init_logits, probabilities, token_logprobs
from tokenmdp.mdp.token import TokenMDP

# ---------------------------------------------------------------- DPO


def test_dpo_hand_values():
    pc = torch.tensor([1.0], requires_grad=True)  # log-ratio margin h = (1 - 0) - (0 - 0) = 1
    z = torch.zeros(1)
    loss, m = dpo_loss(pc, z, z, z, beta=0.1)
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-7)
    assert float(loss.detach()) == pytest.approx(0.6444, abs=5e-5)
    (g,) = torch.autograd.grad(loss, pc)  # d/d logpi(y_w) = -beta sigmoid(-beta h) = -0.04750
    assert float(g) == pytest.approx(-0.1 / (1 + math.exp(0.1)))
    assert m["dpo/margin"] == 1.0 and m["dpo/accuracy"] == 1.0
    assert m["dpo/reward_chosen"] == pytest.approx(0.1) and m["dpo/reward_rejected"] == 0.0
    ipo, _ = dpo_loss(pc, z, z, z, beta=0.1, loss_type="ipo")
    assert float(ipo.detach()) == pytest.approx(16.0)  # (1 - 1/(2*0.1))^2
    smooth, _ = dpo_loss(pc, z, z, z, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-0.1)) + 0.1 * math.log(1 + math.exp(0.1))
    assert float(smooth.detach()) == pytest.approx(expected)


def test_dpo_is_invariant_to_the_reference_offset_and_uses_the_reference():
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=gen) for _ in range(4))
    a, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    b, _ = dpo_loss(pc + 3, pr + 3, rc + 3, rr + 3, beta=0.5)  # a common shift changes nothing
    torch.testing.assert_close(a, b)
    c, _ = dpo_loss(pc, pr, rc + 1, rr, beta=0.5)  # a higher reference on y_w lowers the margin: loss goes up
    assert float(c) > float(a)


def test_sequence_logps_and_pairs():
    lp = torch.tensor([[-1.0, -2.0, 7.0], [-3.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(sequence_logps(lp, m), torch.tensor([-3.0, -3.0]))
    torch.testing.assert_close(sequence_logps(lp, m, average=True), torch.tensor([-1.5, -3.0]))
    chosen, rejected = preference_pairs(torch.tensor([0.0, 1, 1, 0, 0, 0]), group_size=3)
    assert chosen.tolist() == [1] and rejected.tolist() == [0]
    chosen, rejected = preference_pairs(torch.tensor([0.1, 1, 0, 0.5]), group_size=2)
    assert chosen.tolist() == [1, 3] and rejected.tolist() == [0, 2]


def test_dpo_errors():
    z = torch.zeros(2)
    with pytest.raises(TokenMDPError, match="unknown dpo loss_type 'hinge2'"):
        dpo_loss(z, z, z, z, loss_type="hinge2")
    with pytest.raises(TokenMDPError, match="beta must be > 0"):
        dpo_loss(z, z, z, z, beta=0)
    with pytest.raises(TokenMDPError, match="share one"):
        dpo_loss(z, torch.zeros(3), z, z)


# ---------------------------------------------------------------- filtered iterative SFT

LP = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
M2 = torch.ones(2, 2)
CORRECT = torch.tensor([True, False])


def test_isft_hand_values():
    assert float(isft_loss(LP, M2, CORRECT, mode="+")[0]) == pytest.approx(1.0)
    assert float(isft_loss(LP, M2, CORRECT, mode="-")[0]) == pytest.approx(-1.0)
    assert float(isft_loss(LP, M2, CORRECT, mode="+-")[0]) == pytest.approx(0.0)
    adv = torch.tensor([1.0, -1.0])
    kw = dict(weighting="advantage", advantages=adv, aggregation="seq_mean_token_mean")
    assert float(isft_loss(LP, M2, CORRECT, mode="+-", **kw)[0]) == pytest.approx(0.0)
    assert float(isft_loss(LP, M2, CORRECT, mode="+", **kw)[0]) == pytest.approx(1.0)
    loss, m = isft_loss(LP, M2, CORRECT, mode="+-", pos_weight=2.0, neg_weight=0.5)
    assert float(loss) == pytest.approx((2 * 2 - 0.5 * 2) / 4)
    assert (m["isft/num_pos"], m["isft/num_neg"], m["isft/nll_pos"], m["isft/nll_neg"]) == (1, 1, 1.0, 1.0)


def test_isft_gradient_directions_on_a_tabular_policy():
    """One gradient step of isft+ raises the probability of the correct responses; isft- lowers the incorrect."""
    table = enumerate_sequences(TokenMDP(lambda x, y: float(y == (1, 0)), eos_id=0, max_len=3, vocab_size=3))
    theta = init_logits(table, seed=0, scale=0.5)
    correct = table.rewards > 0
    for mode, rows, sign in (("+", correct, +1), ("-", ~correct, -1)):
        loss, _ = isft_loss(token_logprobs(theta, table), table.mask, correct, mode=mode)
        (g,) = torch.autograd.grad(loss, theta)
        p0 = probabilities(theta, table).detach()[rows].sum()
        p1 = probabilities(theta.detach() - 0.1 * g, table)[rows].sum()
        assert sign * float(p1 - p0) > 1e-4


def test_isft_advantage_over_length_equals_on_policy_grpo():
    """The paper's identity on random tensors: kl 0, rho = 1 -> grad GRPO loss = grad isft(+-, A_i / |o_i|)."""
    gen = torch.Generator().manual_seed(0)
    b, t, g = 8, 6, 4
    params = torch.randn(b, t, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(t) < torch.randint(1, t + 1, (b,), generator=gen).unsqueeze(-1)).long()
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])
    adv = grpo_advantages(rewards, group_size=g, std="population")
    logp = torch.log_softmax(params, dim=-1)
    grpo, _ = policy_loss(logp, logp.detach(), adv, mask, clip_low=0.2, aggregation="seq_mean_token_mean")
    sft, _ = isft_loss(logp, mask, rewards > 0, mode="+-", weighting="advantage", advantages=adv,
                       aggregation="seq_mean_token_mean")
    (g1,) = torch.autograd.grad(grpo, params, retain_graph=True)
    (g2,) = torch.autograd.grad(sft, params)
    torch.testing.assert_close(g1, g2)
    assert g1.abs().max() > 1e-3


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mode", ["+", "-", "+-"])
def test_isft_padding_and_accumulation(aggregation, mode):
    gen = torch.Generator().manual_seed(1)
    b, t = 6, 5
    params = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = (torch.arange(t) < torch.tensor([5, 1, 3, 2, 4, 5]).unsqueeze(-1)).long()
    correct = torch.tensor([True, False, True, False, False, True])
    kw = dict(mode=mode, aggregation=aggregation, max_len=8)

    def run(pp, mm, cc, **extra):
        p = pp.clone().requires_grad_(True)
        loss, _ = isft_loss(p, mm, cc, **kw, **extra)
        return loss.detach(), torch.autograd.grad(loss, p)[0]

    full, g_full = run(params, mask, correct)
    padded, g_pad = run(torch.cat([params, torch.full((b, 2), -50.0, dtype=params.dtype)], 1),
                        torch.cat([mask, torch.zeros(b, 2, dtype=mask.dtype)], 1), correct)
    torch.testing.assert_close(padded, full)
    torch.testing.assert_close(g_pad[:, :t], g_full)
    n_tok, n_seq = kept_counts(mask, correct, mode=mode)
    parts = [run(params[r], mask[r], correct[r], num_tokens=n_tok, num_seqs=n_seq) for r in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), g_full)


def test_isft_errors():
    with pytest.raises(TokenMDPError, match="unknown isft mode"):
        isft_loss(LP, M2, CORRECT, mode="++")
    with pytest.raises(TokenMDPError, match="needs advantages"):
        isft_loss(LP, M2, CORRECT, weighting="advantage")
    with pytest.raises(TokenMDPError, match="unknown isft weighting"):
        isft_loss(LP, M2, CORRECT, weighting="reward")
