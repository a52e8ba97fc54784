"""The literature's controls as presets (RAFT++, Reinforce-Rej, W-REINFORCE): the rows each trains on, its
advantages and its loss, by hand."""

from __future__ import annotations

import types

import pytest
import torch

from tokenmdp.algos.core import compute_advantages, policy_loss
from tokenmdp.algos.isft import isft_loss
from tokenmdp.algos.presets import get_algo
from tokenmdp.train.algorithms import PolicyGradient


class _B(types.SimpleNamespace):
    def __len__(self):
        return len(self.rewards)


def _rows(name, rewards, correct, group_size=2):
    unit = PolicyGradient(get_algo(name), seed=0, max_new_tokens=4)
    return unit.train_rows(_B(rewards=torch.tensor(rewards), correct=torch.tensor(correct),
                              group_size=group_size)).tolist()


def test_raft_plus_plus_trains_on_the_correct_rows_with_advantage_one():
    """Rewards 1, 0.1 (formatted, wrong), 1, 0: rows 0 and 2 train, advantage = reward = 1; on-policy the
    gradient is -1/N_kept_tokens on each of their tokens (3 + 1 tokens: -0.25 each)."""
    spec = get_algo("raft++")
    assert _rows("raft++", [1.0, 0.1, 1.0, 0.0], [True, False, True, False]) == [0, 2]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv, _, _ = compute_advantages(spec, torch.tensor([1.0, 0.1, 1.0, 0.0]), mask, group_size=2)
    assert adv[:, 0].tolist() == pytest.approx([1.0, 0.1, 1.0, 0.0])
    kept = torch.tensor([0, 2])
    lp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), adv[kept].double(), mask[kept], aggregation=spec.aggregation,
                          num_tokens=int(mask[kept].sum()), num_seqs=2)
    loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, -0.25, -0.25, 0.0, 0.0])


def test_reinforce_rej_drops_the_groups_that_agree():
    """Groups (1, 1), (1, 0), (0, 0): only the mixed group trains; advantages r - group mean (no std): +-0.5."""
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert _rows("reinforce_rej", rewards, [r == 1.0 for r in rewards]) == [2, 3]
    adv, _, _ = compute_advantages(get_algo("reinforce_rej"), torch.tensor(rewards), torch.ones(6, 2), group_size=2)
    assert adv[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.5, -0.5, 0.0, 0.0])


def test_w_reinforce_weights_positives_by_a_tenth():
    """One token each, log-probs -1 (correct) and -2 (wrong), token mean: loss (0.1 * 1 + 1 * (-2)) / 2 = -0.95,
    gradients -0.1 / 2 and +1 / 2."""
    spec = get_algo("w_reinforce")
    lp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = isft_loss(lp, torch.ones(2, 1), torch.tensor([True, False]), mode=spec.isft_mode,
                        weighting=spec.isft_weighting, pos_weight=spec.isft_pos_weight,
                        neg_weight=spec.isft_neg_weight, aggregation=spec.aggregation)
    loss.backward()
    assert float(loss) == pytest.approx(-0.95) and lp.grad[:, 0].tolist() == pytest.approx([-0.05, 0.5])
