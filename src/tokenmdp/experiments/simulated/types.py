"""The simulated tier's ground: its token MDP, the response *types* of a group, and the exact expected update of
any group size (the infinite-batch limit the sampled runs are set against).

**The MDP** (:func:`sim_table`) is the exact tier's (:func:`tokenmdp.experiments.exact.exact_mdp`: EOS = 0, the
answer token ``a`` = 1, reward 1 iff a response ends ``a EOS``) at vocabulary 3 and ``max_len`` 6: 127 responses,
63 states. Six tokens is the smallest length at which wrong answers spread over six lengths (1-6, truncation at 6)
and ``E[length | incorrect]`` can drift by whole tokens; it is also the largest at which the type enumeration
below stays exact for G = 8 (43,758 group types; ``max_len`` 8, with 15 types, gives 319,770).

**Types.** Every pg and isft loss of the family (no critic, no KL) gives a row a coefficient that depends on the
group only through each member's reward and length (advantages from rewards, normalisers from kept counts and
token counts). A response's *type* is its ``(reward, length)``: 11 types here (correct at lengths 2-6, wrong at
1-6). So the expected update is a sum over the multisets ``c`` of G types, with the multinomial ``P(c)`` of the
type probabilities ``q_k``:

    U = -sum_k W_k E[score(y) | type k],   W_k = sum_c P(c) sum_{j: c_j = k} w_j(c),

``w_j(c)`` being the coefficient the project's own loss (:meth:`GroupBatch.pg_loss` / ``isft_loss``, via
:func:`row_coefficients`) gives member ``j`` of a representative group of types ``c``; it is the same at every
``theta`` (on-policy, ratio 1), so it is computed once. With ``E[score | k] q_k = sum_{y in k} p(y) grad log p(y)``,
``U = -grad sum_y sg(p(y) W_k(y) / q_k(y)) log p(y)``. On an MDP small enough for the exact tier's multisets of
responses the two agree to float rounding (``tests/test_simulated.py``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact.groups import Groups, Point, exact_mdp
from tokenmdp.experiments.exact.updates import GroupBatch, Variant, row_coefficients, theta_free
from tokenmdp.mdp.enumerate import (SequenceTable, enumerate_sequences, init_logits, sequence_logprobs,
                                    token_logprobs)

Tensor = torch.Tensor
VOCAB, MAX_LEN = 3, 6
MAX_TYPE_GROUPS = 200_000


def sim_table(vocab: int = VOCAB, max_len: int = MAX_LEN) -> SequenceTable:
    """Every response of the simulated tier's token MDP (module docstring)."""
    return enumerate_sequences(exact_mdp(vocab, max_len))


def plain_point(theta: Tensor, table: SequenceTable) -> Point:
    """A :class:`Point` with the token log-probs of ``theta`` only (no Jacobian, no group weights): what the losses
    read as the reference policy and as the on-policy log-probs."""
    empty = torch.zeros(0, dtype=torch.float64)
    return Point(theta.detach(), token_logprobs(theta.detach(), table), empty, empty)


@dataclass(frozen=True)
class TypeTable:
    """The response types of ``table``: ``of_row`` (N,) each response's type, ``reward`` / ``length`` (K,) each
    type's, ``rep`` (K,) one response of each type (its representative in the loss calls)."""

    table: SequenceTable
    of_row: Tensor
    reward: Tensor
    length: Tensor
    rep: Tensor

    @property
    def num(self) -> int:
        return len(self.rep)

    def probabilities(self, p: Tensor) -> Tensor:
        """``q`` (..., K): the type probabilities from the response probabilities ``p`` (..., N)."""
        q = torch.zeros(*p.shape[:-1], self.num, dtype=p.dtype)
        return q.index_add_(-1, self.of_row, p)


def response_types(table: SequenceTable) -> TypeTable:
    """Group the responses of ``table`` by ``(reward, length)``."""
    keys = [(float(r), int(n)) for r, n in zip(table.rewards.tolist(), table.lengths.tolist())]
    uniq = sorted(set(keys))
    index = {k: i for i, k in enumerate(uniq)}
    of_row = torch.tensor([index[k] for k in keys], dtype=torch.long)
    rep = torch.tensor([keys.index(k) for k in uniq], dtype=torch.long)
    return TypeTable(table, of_row, torch.tensor([k[0] for k in uniq], dtype=torch.float64),
                     torch.tensor([k[1] for k in uniq], dtype=torch.long), rep)


@dataclass(frozen=True)
class TypeUpdate:
    """The exact expected update of one variant at any ``theta`` (:meth:`update`), from its type coefficients:
    ``members`` (M, G) the type multisets, ``log_count`` (M,) their log multinomial coefficients, ``coef`` (M, G)
    each member's loss coefficient ``w_j(c)``."""

    types: TypeTable
    members: Tensor
    log_count: Tensor
    coef: Tensor

    def weights(self, q: Tensor) -> Tensor:
        """``W`` (K,): each type's summed coefficient over the multisets, weighted by ``P(c)`` at type
        probabilities ``q`` (K,)."""
        logq = torch.log(q.clamp(min=1e-300))
        prob = (self.log_count + logq[self.members].sum(-1)).exp()
        w = torch.zeros(self.types.num, dtype=torch.float64)
        return w.index_add_(0, self.members.reshape(-1), (prob.unsqueeze(-1) * self.coef).reshape(-1))

    def update(self, params: Tensor, tied: bool = False) -> Tensor:
        """``U`` at ``params`` (:func:`logits`; the shape of ``params``): the expected ascent direction of one
        group's update."""
        table = self.types.table
        leaf = params.detach().clone().requires_grad_(True)
        logp = sequence_logprobs(logits(leaf, tied), table)
        p = logp.detach().exp()
        q = self.types.probabilities(p)
        per_row = p * self.weights(q)[self.types.of_row] / q[self.types.of_row].clamp(min=1e-300)
        (grad,) = torch.autograd.grad((per_row * logp).sum(), leaf)
        return -grad


def logits(params: Tensor, tied: bool) -> Tensor:
    """The logit table (..., S, V) of ``params``: the table itself, or with ``tied`` (..., S + 1, V) the state
    rows plus a last row shared by every state (a token bias, as an LM's shared output layer ties its states)."""
    return params[..., :-1, :] + params[..., -1:, :] if tied else params


def start_params(table: SequenceTable, *, seed: int, scale: float, tied: bool) -> Tensor:
    """The start: the seeded logit table of :func:`init_logits`, and a zero shared row with ``tied`` (the same
    policy either way)."""
    theta = init_logits(table, seed=seed, scale=scale, requires_grad=False)
    return torch.cat([theta, theta.new_zeros(1, theta.shape[-1])]) if tied else theta


def check_group_size(group_size: int, num_types: int = 11) -> None:
    """One error when the type multisets of ``group_size`` exceed :data:`MAX_TYPE_GROUPS` (G <= 10 at the default
    MDP's 11 types)."""
    m = math.comb(num_types + group_size - 1, group_size)
    if m > MAX_TYPE_GROUPS:
        raise TokenMDPError(f"simulate: {m} type groups of {group_size} from {num_types} types exceed the limit of "
                            f"{MAX_TYPE_GROUPS}; use a smaller --group-size")


def type_multisets(num_types: int, group_size: int) -> tuple[Tensor, Tensor]:
    """``(members (M, G), log_count (M,))``: every multiset of ``group_size`` types and ``log(G! / prod m_k!)``."""
    check_group_size(group_size, num_types)
    m = math.comb(num_types + group_size - 1, group_size)
    members = torch.tensor(list(itertools.combinations_with_replacement(range(num_types), group_size)),
                           dtype=torch.long).view(m, group_size)
    mult = (members.unsqueeze(-1) == torch.arange(num_types)).sum(dim=1).to(torch.float64)
    return members, math.lgamma(group_size + 1) - torch.lgamma(mult + 1).sum(dim=1)


def type_update(v: Variant, types: TypeTable, group_size: int, theta0: Tensor) -> TypeUpdate:
    """The :class:`TypeUpdate` of ``v`` (one pass of the project's loss over a representative group of every type
    multiset). Raises :class:`TokenMDPError` for a variant whose coefficients depend on ``theta`` (a KL, a critic,
    DPO): it has no exact path here."""
    if not theta_free(v):
        raise TokenMDPError(f"simulate: preset {v.name!r} has a KL, a critic or pairs: its coefficients depend on "
                            "theta, so the type enumeration has no exact path for it")
    members, log_count = type_multisets(types.num, group_size)
    table = types.table
    groups = Groups(table, group_size, types.rep[members], log_count)
    point = plain_point(theta0, table)
    coef = row_coefficients(v, GroupBatch(groups, point), point)  # (M * G, T), constant over a row's tokens
    mask = table.mask[groups.rows]
    spread = (coef - coef[:, :1]).abs().where(mask, torch.zeros((), dtype=coef.dtype)).max()
    if float(spread) > 1e-12 * max(float(coef.abs().max()), 1e-300):
        raise TokenMDPError(f"simulate: preset {v.name!r} weights the tokens of a response differently (a "
                            "per-token advantage): the type enumeration has no exact path for it")
    return TypeUpdate(types, members, log_count, coef[:, 0].reshape(members.shape))


__all__ = ["MAX_LEN", "MAX_TYPE_GROUPS", "VOCAB", "TypeTable", "TypeUpdate", "check_group_size", "logits",
           "plain_point", "response_types", "sim_table", "start_params", "type_multisets", "type_update"]
