"""Micro-batches by tokens (optim.micro_batch_tokens): the cut follows the padded token count (rows x the longest
row), a row longer than the budget goes alone, and the update does not depend on the cut (the normalisers are the
minibatch's), so a run with a small token budget ends where a run without one does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tests.test_trainer  # noqa: F401  (registers the parity task)
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train
from tokenmdp.train.learner import micro_batches

SMALL = tests.test_trainer.SMALL


def _cut(lengths, size, max_tokens, groups=None):
    rows = torch.arange(len(lengths))
    g = None if groups is None else torch.tensor(groups)
    return [m.tolist() for m in micro_batches(rows, size, torch.tensor(lengths), g, max_tokens=max_tokens)]


def test_the_cut_by_tokens_by_hand():
    assert _cut([9, 5, 4, 2], 4, 12) == [[0], [1, 2], [3]]
    assert _cut([2, 9, 4, 5], 4, 12) == [[1], [3, 2], [0]]  # longest first
    assert _cut([3, 3, 3, 3, 3], 2, 100) == [[0, 1], [2, 3], [4]]  # the row limit still holds
    assert _cut([20, 1], 4, 5) == [[0], [1]]  # a row over the budget goes alone
    # groups stay together in order; the budget cuts between (and, if it must, inside) them
    assert _cut([4, 6, 2, 2], 4, 12, groups=[0, 0, 1, 1]) == [[0, 1], [2, 3]]
    every = sum(_cut([7, 1, 5, 3, 8, 2], 3, 10), [])
    assert sorted(every) == list(range(6))


@pytest.mark.parametrize("algo", ["grpo", "isft+-", "ppo"])
def test_a_token_budget_changes_nothing_but_memory(tmp_path, tiny_random_dir, algo):
    def run(name, *extra):
        cfg = load_config(None, [f"model.path={tiny_random_dir}", f"algo.name={algo}", f"run.out={tmp_path / name}",
                                 *SMALL, "optim.eps=1e-3", *extra])
        return load_file(str(train(cfg, progress=False) / "final" / "model.safetensors"))

    a = run("rows")
    b = run("tokens", "optim.micro_batch_tokens=12")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)


def test_a_bad_token_budget_names_the_field():
    with pytest.raises(TokenMDPError, match="optim.micro_batch_tokens"):
        load_config(None, ["optim.micro_batch_tokens=0"])
