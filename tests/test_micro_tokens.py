"""Micro-batches by tokens (optim.micro_batch_tokens): the cut follows the tokens of forward pass (rows x the
longest row; with the shared prompt each group's prompt once), a row longer than the budget goes alone, and the
update does not depend on the cut (the normalisers are the minibatch's), so a run with a small token budget ends
where a run without one does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tests.test_trainer  # noqa: F401  (registers the parity task)
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train
from tokenmdp.train.micro import micro_batches

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


def test_a_shared_prompt_counts_once_in_the_budget():
    """Groups [0, 0, 1, 1] with prompts of 5 and 3 tokens and responses of 4, 3, 3, 4 (rows of 9, 8, 6, 7).
    Shared: [0, 1] runs 1 x 5 + 2 x 4 = 13 <= 14, adding row 2 would run 2 x 5 + 3 x 4 = 22; [2, 3] runs
    1 x 3 + 2 x 4 = 11. Padded, the same budget cuts by rows x longest row: 9, 8, then 7 + 7 = 14."""
    rows, lengths = torch.arange(4), torch.tensor([9, 8, 6, 7])
    groups, prompts = torch.tensor([0, 0, 1, 1]), torch.tensor([5, 5, 3, 3])
    shared = [m.tolist() for m in micro_batches(rows, 4, lengths, groups, prompts, max_tokens=14)]
    assert shared == [[0, 1], [2, 3]]
    # two groups of 8 rows, prompts of 170 and responses of 64 (SmolLM2's chat rows), a budget of 1,202 tokens:
    # 13 rows would fit (2 x 170 + 13 x 64 = 1,172) but split the second group: each group goes whole
    rows, lengths = torch.arange(16), torch.full((16,), 234)
    groups, prompts = torch.tensor([0] * 8 + [1] * 8), torch.full((16,), 170)
    cut = [len(m) for m in micro_batches(rows, 16, lengths, groups, prompts, max_tokens=1202)]
    assert cut == [8, 8]
    # a group larger than the budget (170 + 8 x 64 = 682 > 600) is cut inside, and not moved to wait for a
    # micro-batch it cannot fit: 6 rows (554), then 2 + 2 rows of two groups (2 x 170 + 4 x 64 = 596), then 6;
    # the row limit cuts where it falls, as before
    assert [len(m) for m in micro_batches(rows, 16, lengths, groups, prompts, max_tokens=600)] == [6, 4, 6]
    assert [len(m) for m in micro_batches(rows, 12, lengths, groups, prompts, max_tokens=10_000)] == [12, 4]
    assert _cut([9, 8, 6, 7], 4, 14) == [[0], [1], [3, 2]]


def test_a_budget_that_does_not_bind_keeps_the_rows_as_they_are():
    rows = torch.tensor([2, 0, 1])
    lengths = torch.tensor([3, 9, 5])  # of rows 0, 1, 2: the pass of all three runs 3 x 9 = 27 tokens
    assert [m.tolist() for m in micro_batches(rows, 4, lengths, max_tokens=27)] == [[2, 0, 1]]
    # 26: it binds, longest first: rows 1 and 2 run 2 x 9 = 18, adding row 0 would make 27
    assert [m.tolist() for m in micro_batches(rows, 4, lengths, max_tokens=26)] == [[1, 2], [0]]
    # no rows (a process whose rows all skip their pass): no micro-batch, as without a budget
    empty = torch.zeros(0, dtype=torch.long)
    assert list(micro_batches(empty, 4, lengths, max_tokens=26)) == list(micro_batches(empty, 4, lengths)) == []


def test_auto_budget_by_hand():
    import os
    from types import SimpleNamespace

    from torch import nn

    from tokenmdp.train.micro import AUTO_MEMORY_SHARE, auto_micro_batch_tokens

    model = nn.Linear(1, 1)
    model.config = SimpleNamespace(num_hidden_layers=2, hidden_size=10, intermediate_size=20)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_token = 2 * (14 * 10 + 9 * 20) * 4  # 2 layers x 320 floats x 4 bytes
    assert auto_micro_batch_tokens(model, "cpu") == int(ram * AUTO_MEMORY_SHARE // per_token)
    assert auto_micro_batch_tokens(model, "cpu", half=True) == int(ram * AUTO_MEMORY_SHARE // (per_token // 2))
    # checkpointing: each layer keeps its 10-wide input, one layer's 320 floats at a time
    assert auto_micro_batch_tokens(model, "cpu", checkpointing=True) == int(ram * AUTO_MEMORY_SHARE // (340 * 4))
    model.config = SimpleNamespace(vocab_size=5)  # no sizes: no cap
    assert auto_micro_batch_tokens(model, "cpu") is None


def test_auto_does_not_cut_the_tiny_model(tmp_path, tiny_random_dir):
    """The default (auto) leaves a tiny model's micro-batches as they were: the run is bit-equal to one without a
    budget."""
    def run(name, *extra):
        cfg = load_config(None, [f"model.path={tiny_random_dir}", "algo.name=grpo", f"run.out={tmp_path / name}",
                                 *SMALL, "optim.micro_batch_size=4", *extra])
        return load_file(str(train(cfg, progress=False) / "final" / "model.safetensors"))

    from tokenmdp.policy.model import load_policy
    from tokenmdp.train.micro import auto_micro_batch_tokens

    # the budget is a number, far above a micro-batch of 4 rows of the parity task's few tokens
    cap = auto_micro_batch_tokens(load_policy(tiny_random_dir).model, "cpu")
    assert isinstance(cap, int) and cap > 4 * 64
    a, b = run("auto"), run("none", "optim.micro_batch_tokens=null")
    assert all(torch.equal(a[k], b[k]) for k in a)
