"""A step's diagnostics (`batch_metrics`) on a hand-built batch: every figure computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmdp.policy.tiny import build_char_tokenizer
from tokenmdp.rollout.types import build_rollout
from tokenmdp.train.batch import Batch, batch_metrics


def test_diagnostics_by_hand():
    """Two groups of 2. Group 0: rewards 1, 0 (mixed); group 1: 0.1, 0.1 (agree: no group-relative gradient).
    Response log-probs (no EOS: lengths 2, 2, 1, 2): row 0 (correct) log 0.5, log 0.5 -> mean log 0.5; rows 1-3
    (incorrect) means log 0.25, log 0.1 and (log 0.2 + log 0.4) / 2, averaged over the 3 rows."""
    tok = build_char_tokenizer()
    a = tok.convert_tokens_to_ids("a")
    ids = torch.tensor([[a, a], [a, a], [a, 0], [a, a]])
    valid = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.1, 1.0], [0.2, 0.4]]))
    prompt = torch.ones(4, 1, dtype=torch.long)
    ro = build_rollout(tok, ["p", "q"], 2, prompt * a, prompt, ids, lp, [tok.eos_token_id], valid)
    assert ro.lengths.tolist() == [2, 2, 1, 2]
    rewards = torch.tensor([1.0, 0.0, 0.1, 0.1])
    correct = torch.tensor([True, False, False, False])
    batch = Batch(ro, [None] * 4, [None] * 4, rewards, correct, torch.ones(4, dtype=torch.bool), 2, {})
    m = batch_metrics(batch)
    assert m["reward/groups_mixed"] == 0.5 and m["reward/frac_zero_std"] == 0.5
    assert m["logp/positive"] == pytest.approx(math.log(0.5), rel=1e-6)
    neg = (math.log(0.25) + math.log(0.1) + (math.log(0.2) + math.log(0.4)) / 2) / 3
    assert m["logp/negative"] == pytest.approx(neg, rel=1e-6)
    assert m["length/correct"] == 2.0 and m["length/incorrect"] == pytest.approx(5 / 3)
