"""Credit assignment: hand-computed values and return preservation."""

from __future__ import annotations

import pytest
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.credit import assign_credit, discounted, process, terminal, uniform

R3 = torch.tensor([3.0])
M = torch.tensor([[1, 1, 1, 0]])


def test_hand_values():
    assert torch.equal(terminal(R3, M), torch.tensor([[0.0, 0, 3, 0]]))
    assert torch.equal(uniform(R3, M), torch.tensor([[1.0, 1, 1, 0]]))
    torch.testing.assert_close(discounted(R3, M, gamma=0.5), torch.tensor([[3 / 7, 6 / 7, 12 / 7, 0]]))
    r1, m4 = torch.tensor([1.0]), torch.ones(1, 4)
    steps = torch.tensor([[0.0, 0.5, 0, 0]])
    assert torch.equal(process(r1, m4, step_rewards=steps), torch.tensor([[0.0, 0.5, 0, 0.5]]))
    assert torch.equal(process(r1, m4, step_rewards=steps, final="add"), torch.tensor([[0.0, 0.5, 0, 1]]))


def test_discounted_limits():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(5, generator=gen, dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(discounted(r, m, gamma=1.0), uniform(r, m))
    torch.testing.assert_close(discounted(r, m, gamma=0.0), terminal(r, m))


@pytest.mark.parametrize("name, kw", [
    ("terminal", {}), ("uniform", {}), ("discounted", {"gamma": 0.9}), ("discounted", {"gamma": 0.3}),
    ("process", {"final": "residual"}),
])
def test_every_credit_preserves_the_return(name, kw):
    gen = torch.Generator().manual_seed(1)
    b, t = 16, 7
    rewards = torch.randn(b, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t) < lengths.unsqueeze(-1)).long()
    mask[3, 2] = 0  # a hole inside a response (e.g. tool output) must not break anything
    if name == "process":
        kw = dict(kw, step_rewards=torch.randn(b, t, generator=gen, dtype=torch.float64) * mask)
    tr = assign_credit(name, rewards, mask, **kw)
    assert tr.shape == (b, t)
    torch.testing.assert_close(tr.sum(-1), rewards)
    assert torch.all(tr[mask == 0] == 0)
    # the last valid token carries the terminal part: positive reward -> non-negative last entry (terminal)
    if name == "terminal":
        assert torch.all((tr != 0).sum(-1) <= 1)


def test_process_add_shapes_the_return():
    r = torch.tensor([1.0, 0.0])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = torch.tensor([[0.2, 0.3, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(process(r, m, step_rewards=s, final="add").sum(-1), r + s.sum(-1))


def test_empty_rows_get_zero():
    tr = uniform(torch.tensor([1.0, 2.0]), torch.tensor([[1, 1], [0, 0]]))
    assert torch.equal(tr, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    assert torch.equal(terminal(torch.tensor([2.0]), torch.tensor([[0, 0]])), torch.zeros(1, 2))


def test_errors_name_the_problem():
    with pytest.raises(TokenMDPError, match="unknown credit assignment 'nope'"):
        assign_credit("nope", R3, M)
    with pytest.raises(TokenMDPError, match="takes no argument 'gamma'"):
        assign_credit("uniform", R3, M, gamma=0.9)
    with pytest.raises(TokenMDPError, match="needs gamma"):
        assign_credit("discounted", R3, M)
    with pytest.raises(TokenMDPError, match="needs step_rewards"):
        assign_credit("process", R3, M)
    with pytest.raises(TokenMDPError, match="where response_mask is 0"):
        process(R3, M, step_rewards=torch.tensor([[0.0, 0, 0, 1]]))
    with pytest.raises(TokenMDPError, match="gamma must be in"):
        discounted(R3, M, gamma=1.5)
    with pytest.raises(TokenMDPError, match="rewards must have shape"):
        uniform(torch.ones(2), M)
