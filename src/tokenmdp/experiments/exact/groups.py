"""The exact tier's ground: the token MDP, its verifier, every multiset of responses and what each needs at one
``theta``. The updates are :mod:`tokenmdp.experiments.exact.updates`; the runs :mod:`tokenmdp.experiments.exact`.

The MDP (:func:`exact_mdp`): vocabulary ``{0: EOS, 1: a, 2: b, ...}``, ``max_len`` L, one empty prompt, and the
*final-answer verifier* ``R(y) = 1`` iff the response ended with EOS and the token before it is ``a``, else 0; a
response that reaches L tokens without EOS is truncated (and wrong). Default V = 3, L = 3: N = 15 responses, 3
correct (lengths 2, 3) and 12 wrong (lengths 1, 2, 3; 8 truncated). The policy is the tabular softmax
``pi(a | s) = softmax(theta[s])`` of :mod:`tokenmdp.mdp.enumerate`, seeded start ``theta_0 ~ init_scale N(0, 1)``.

**Groups.** Every group update here is symmetric in the order of the group, so its expectation is a sum over the
``M = C(N + G - 1, G)`` multisets (3,060 for the default G = 4, against ``N^G = 50,625`` ordered groups) with the
multinomial probability ``P(g) = G! / prod_k m_k! * prod_j p(y_j)``. :data:`MAX_GROUPS` bounds M (``max_len=4``
already has 46,376 groups).

:class:`Point` holds what every update needs at one ``theta`` (token log-probs, their Jacobian, ``P(g)``);
:func:`state_values` is the exact ``V^pi(s_t)`` of the task reward (``ppo_oracle``'s critic).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.enumerate import SequenceTable, group_probabilities, probabilities, token_logprobs
from tokenmdp.mdp.token import TokenMDP

Tensor = torch.Tensor
MAX_GROUPS = 200_000
EOS, ANSWER = 0, 1


def final_answer_verifier(prompt: tuple[int, ...], response: tuple[int, ...]) -> float:
    """1.0 iff ``response`` ended with EOS and the token before EOS is the answer token ``a`` (1), else 0.0."""
    return float(len(response) >= 2 and response[-1] == EOS and response[-2] == ANSWER)


def exact_mdp(vocab: int, max_len: int) -> TokenMDP:
    """The exact tier's token MDP: EOS = 0, the final-answer verifier, truncation at ``max_len``."""
    return TokenMDP(final_answer_verifier, eos_id=EOS, max_len=max_len, vocab_size=vocab)


def count_groups(vocab: int, max_len: int, group_size: int) -> tuple[int, int]:
    """``(N, M)``: responses ``sum_{k<L} (V-1)^k + (V-1)^L`` and multisets ``C(N + G - 1, G)``."""
    n = sum((vocab - 1) ** k for k in range(max_len)) + (vocab - 1) ** max_len
    return n, math.comb(n + group_size - 1, group_size)


@dataclass(frozen=True)
class Groups:
    """Every multiset of ``size`` responses: ``members`` (M, G) sorted row indices, ``log_count`` (M,) the log
    multinomial coefficient ``log(G! / prod_k m_k!)``."""

    table: SequenceTable
    size: int
    members: Tensor
    log_count: Tensor

    @property
    def num(self) -> int:
        return self.members.shape[0]

    @property
    def rows(self) -> Tensor:
        """(M * G,) the response of every row of the stacked batch (groups contiguous)."""
        return self.members.reshape(-1)

    def probabilities(self, theta: Tensor) -> Tensor:
        """``P(g)`` (M,); sums to 1."""
        return self.log_count.exp() * group_probabilities(theta, self.table, self.members)


def enumerate_groups(table: SequenceTable, group_size: int) -> Groups:
    """All ``C(N + G - 1, G)`` multisets; raises :class:`TokenMDPError` above :data:`MAX_GROUPS`."""
    n = table.num_sequences
    m = math.comb(n + group_size - 1, group_size)
    if m > MAX_GROUPS:
        raise TokenMDPError(f"exact: {m} groups of {group_size} from {n} responses exceed the limit of "
                            f"MAX_GROUPS = {MAX_GROUPS}; use a smaller --group-size, --max-len or --vocab")
    members = torch.tensor(list(itertools.combinations_with_replacement(range(n), group_size)), dtype=torch.long)
    mult = (members.unsqueeze(-1) == torch.arange(n)).sum(dim=1).to(torch.float64)
    log_count = math.lgamma(group_size + 1) - torch.lgamma(mult + 1).sum(dim=1)
    return Groups(table, group_size, members.view(m, group_size), log_count)


@dataclass(frozen=True)
class Point:
    """What every variant needs at one ``theta``: token log-probs (N, T), their Jacobian (N, T, D), P(g)."""

    theta: Tensor
    logprobs: Tensor
    jac: Tensor
    weights: Tensor


def make_point(theta: Tensor, groups: Groups) -> Point:
    """The :class:`Point` of ``theta`` (the Jacobian by autograd of :func:`token_logprobs`)."""
    theta = theta.detach()
    table = groups.table
    jac = torch.autograd.functional.jacobian(lambda th: token_logprobs(th, table), theta, vectorize=True)
    return Point(theta, token_logprobs(theta, table).detach(), jac.reshape(*table.tokens.shape, -1),
                 groups.probabilities(theta))


def state_values(theta: Tensor, table: SequenceTable) -> Tensor:
    """``V^pi(s_t)`` at every position of every response (N, T), 0 on padding: ``E[R | prefix s_t]``."""
    p = probabilities(theta.detach(), table)
    visits = torch.zeros(table.num_sequences, table.num_prefixes, dtype=torch.float64)
    visits.scatter_add_(1, table.prefix_index, table.mask.to(torch.float64))  # each prefix once per path
    v = (p * table.rewards) @ visits / (p @ visits)
    return torch.where(table.mask, v[table.prefix_index], torch.zeros((), dtype=torch.float64))


__all__ = ["ANSWER", "EOS", "MAX_GROUPS", "Groups", "Point", "count_groups", "enumerate_groups", "exact_mdp",
           "final_answer_verifier", "make_point", "state_values"]
