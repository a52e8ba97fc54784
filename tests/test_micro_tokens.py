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
def test_a_token_budget_changes_nothing_but_memory(tmp_path, tiny_random_dir, algo, grad_passes):
    """... and it does cut: the run with the budget runs the passes counted by hand from the rows' lengths."""
    from conftest import cut_count

    def run(name, *extra):
        cfg = load_config(None, [f"model.path={tiny_random_dir}", f"algo.name={algo}", f"run.out={tmp_path / name}",
                                 *SMALL, "optim.eps=1e-3", *extra])
        return load_file(str(train(cfg, progress=False) / "final" / "model.safetensors"))

    a = run("rows")
    rows_passes = list(grad_passes)
    grad_passes.clear()
    b = run("tokens", "optim.micro_batch_tokens=12")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    # micro_batch_size 16 >= the 8 rows of a step: each pass of the plain run is a whole batch (2 steps x inner
    # epochs x policy / critic), and each of those is cut by the budget into the micro-batches counted by hand
    assert rows_passes and all(len(p) == 8 for p in rows_passes), [len(p) for p in rows_passes]
    expected = sum(cut_count(p, 16, 12) for p in rows_passes)
    assert expected > len(rows_passes)  # the budget cuts (rows of 7 tokens and more go alone or in pairs)
    assert len(grad_passes) == expected, (len(grad_passes), expected)
    assert all(len(p) == 1 or len(p) * max(p) <= 12 for p in grad_passes), grad_passes


def test_a_bad_token_budget_names_the_field():
    with pytest.raises(TokenMDPError, match="optim.micro_batch_tokens"):
        load_config(None, ["optim.micro_batch_tokens=0"])
