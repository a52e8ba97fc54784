"""Exact enumeration of a tiny token MDP under a tabular softmax policy.

For a :class:`~tokenmdp.mdp.token.TokenMDP` small enough to list every episode (vocabulary up to 4, length up to 4:
at most ``sum_k (V-1)^k + (V-1)^L`` complete responses), :func:`enumerate_sequences` walks the MDP from
``reset(prompt)`` with ``step`` and records

* the ``S`` non-terminal states (response prefixes), each owning one row of the logit table ``theta`` (S, V):
  the tabular softmax policy ``pi(a | s) = softmax(theta[s])[a]``;
* the ``N`` complete responses with their rewards, lengths and ``terminated`` flags, as padded tensors.

Then, exactly and differentiably in ``theta``:

    log p(y) = sum_t log softmax(theta[s_t])[y_t]                       (N,)
    J(theta) = sum_y p(y) R(y)                                          ()
    grad J   = sum_y p(y) R(y) grad log p(y)        (autograd of J; shape of theta)

and the score function in closed form, ``grad_theta[s] log p(y) = sum_{t: s_t = s} (onehot(y_t) - pi(. | s))``.

Hand-computed example checked by the tests: ``V = 2`` (EOS = 0, ``a`` = 1), ``max_len = 2``, reward 1 iff the
response is ``[1, 0]``, ``theta = 0``: the responses are ``[0]``, ``[1, 0]``, ``[1, 1]`` with probabilities
``1/2, 1/4, 1/4``; ``J = 1/4``; ``dJ/dtheta[(), 1] = 1/8``, ``dJ/dtheta[(1,), 0] = 1/8`` (and the negatives on the
other logits of those rows).

Sampling helpers draw whole responses (seeded) from ``p(y)``, which is exactly the distribution of token-by-token
rollouts, so tests can average sampled gradient estimators and compare them with ``grad J``; :func:`all_groups`
lists every group of ``G`` responses so the expectation of a group estimator (GRPO, RLOO) can be computed exactly.

**Environment tokens.** A table may also hold episodes in which a frozen environment writes some of the tokens
(:mod:`tokenmdp.mdp.enumerate_env`, the two-LLM case). Then ``mask`` is the policy's ``response_mask`` (1 on the
policy's tokens only), ``observation_mask`` marks the environment's tokens and ``env_logprobs`` (N,) holds the
log-probability the environment gave its tokens, a constant in ``theta``. Every function here then reads
``log p(y) = sum_{policy t} log pi(y_t | s_t) + env_logprobs`` and differentiates the policy's positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.token import TokenMDP, TokenState

Tensor = torch.Tensor
MAX_SEQUENCES = 5000


class Enumerable(Protocol):
    """What a table needs of its MDP: the vocabulary, EOS and the policy's token budget ``max_len``."""

    vocab_size: int
    eos_id: int
    max_len: int


@dataclass(frozen=True)
class SequenceTable:
    """Every complete response of a tiny token MDP, as padded tensors (``L = max_len``).

    ``tokens`` (N, L) long, padding 0; ``mask`` (N, L) bool; ``prefix_index`` (N, L) long: the row of ``theta``
    for the state before each token (0 on padding); ``rewards`` (N,) float64; ``lengths`` (N,) long;
    ``terminated`` (N,) bool; ``prefixes`` the S states (response prefixes), ``sequences`` the N responses.
    With an environment (module docstring): ``mask`` is 1 on the policy's tokens only, ``lengths`` count them,
    ``observation_mask`` (N, L) bool marks the environment's tokens and ``env_logprobs`` (N,) float64 their
    log-probability; both ``None`` for the plain token MDP.
    """

    mdp: Enumerable
    prompt: tuple[int, ...]
    prefixes: tuple[tuple[int, ...], ...]
    sequences: tuple[tuple[int, ...], ...]
    tokens: Tensor
    mask: Tensor
    prefix_index: Tensor
    rewards: Tensor
    lengths: Tensor
    terminated: Tensor
    observation_mask: Tensor | None = None
    env_logprobs: Tensor | None = None

    @property
    def num_prefixes(self) -> int:
        return len(self.prefixes)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def vocab_size(self) -> int:
        return self.mdp.vocab_size

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the logit table ``theta``: (S, V)."""
        return (self.num_prefixes, self.mdp.vocab_size)

    def prefix_row(self, prefix: tuple[int, ...]) -> int:
        """The row of ``theta`` that holds the logits of state ``prefix``."""
        try:
            return self.prefixes.index(tuple(prefix))
        except ValueError:
            raise TokenMDPError(f"{prefix!r} is not a non-terminal state of this token MDP") from None

    def index_of(self, response: tuple[int, ...]) -> int:
        """The row of a complete response in ``sequences``."""
        try:
            return self.sequences.index(tuple(response))
        except ValueError:
            raise TokenMDPError(f"{response!r} is not a complete response of this token MDP") from None


def enumerate_sequences(mdp: TokenMDP, prompt: tuple[int, ...] = ()) -> SequenceTable:
    """Walk ``mdp`` from ``reset(prompt)`` and list every non-terminal state and every complete response."""
    count = sum((mdp.vocab_size - 1) ** k for k in range(mdp.max_len)) + (mdp.vocab_size - 1) ** mdp.max_len
    if count > MAX_SEQUENCES:
        raise TokenMDPError(
            f"enumerate: {count} responses (vocab_size={mdp.vocab_size}, max_len={mdp.max_len}) exceed the "
            f"limit of {MAX_SEQUENCES}; use vocab <= 4 and max_len <= 4"
        )
    prefixes: list[tuple[int, ...]] = []
    finished: list[tuple[tuple[int, ...], float, bool]] = []
    stack: list[TokenState] = [mdp.reset(prompt)]
    while stack:
        state = stack.pop()
        prefixes.append(state.response)
        for action in reversed(mdp.actions(state)):
            res = mdp.step(state, action)
            if res.done:
                finished.append((res.state.response, res.reward, res.terminated))
            else:
                stack.append(res.state)
    finished.sort(key=lambda item: (len(item[0]), item[0]))
    row = {p: i for i, p in enumerate(prefixes)}
    n, length = len(finished), mdp.max_len
    tokens = torch.zeros(n, length, dtype=torch.long)
    prefix_index = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, (resp, _, _) in enumerate(finished):
        for t, tok in enumerate(resp):
            tokens[i, t], prefix_index[i, t], mask[i, t] = tok, row[resp[:t]], True
    return SequenceTable(
        mdp=mdp,
        prompt=tuple(prompt),
        prefixes=tuple(prefixes),
        sequences=tuple(item[0] for item in finished),
        tokens=tokens,
        mask=mask,
        prefix_index=prefix_index,
        rewards=torch.tensor([item[1] for item in finished], dtype=torch.float64),
        lengths=mask.sum(dim=-1),
        terminated=torch.tensor([item[2] for item in finished], dtype=torch.bool),
    )


def init_logits(
    table: SequenceTable, *, seed: int = 0, scale: float = 1.0, requires_grad: bool = True
) -> Tensor:
    """A random float64 logit table ``theta`` (S, V) ~ ``scale * N(0, 1)`` (``scale = 0``: the uniform policy)."""
    gen = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(table.shape, generator=gen, dtype=torch.float64)
    return theta.requires_grad_(requires_grad)


def _check_theta(theta: Tensor, table: SequenceTable) -> None:
    if tuple(theta.shape) != table.shape:
        raise TokenMDPError(f"theta must have shape (S, V) = {table.shape}, got {tuple(theta.shape)}")


def token_logprobs(theta: Tensor, table: SequenceTable, index: Tensor | None = None) -> Tensor:
    """``log pi(y_t | s_t)`` for the responses ``index`` (default: all), shape (n, L), 0 on padding."""
    _check_theta(theta, table)
    idx = torch.arange(table.num_sequences) if index is None else torch.as_tensor(index, dtype=torch.long)
    logp_table = torch.log_softmax(theta, dim=-1)
    logp = logp_table[table.prefix_index[idx], table.tokens[idx]]
    return torch.where(table.mask[idx], logp, torch.zeros((), dtype=logp.dtype))


def sequence_logprobs(theta: Tensor, table: SequenceTable) -> Tensor:
    """``log p(y) = sum_t log pi(y_t | s_t)`` (+ ``env_logprobs``, a constant) for every response, shape (N,)."""
    logp = token_logprobs(theta, table).sum(dim=-1)
    return logp if table.env_logprobs is None else logp + table.env_logprobs.to(logp.dtype)


def probabilities(theta: Tensor, table: SequenceTable) -> Tensor:
    """``p(y)`` for every response, shape (N,); sums to 1."""
    return sequence_logprobs(theta, table).exp()


def expected_return(theta: Tensor, table: SequenceTable, rewards: Tensor | None = None) -> Tensor:
    """``J(theta) = sum_y p(y) R(y)`` (differentiable); ``rewards`` (N,) overrides the MDP's rewards."""
    r = table.rewards if rewards is None else rewards.to(torch.float64)
    return (probabilities(theta, table) * r).sum()


def exact_gradient(theta: Tensor, table: SequenceTable, rewards: Tensor | None = None) -> tuple[float, Tensor]:
    """``(J(theta), grad J)`` by autograd through :func:`expected_return`; the gradient has the shape of theta."""
    leaf = theta.detach().clone().requires_grad_(True)
    j = expected_return(leaf, table, rewards)
    (grad,) = torch.autograd.grad(j, leaf)
    return float(j.detach()), grad


def score_function(theta: Tensor, table: SequenceTable) -> Tensor:
    """``grad_theta log p(y)`` for every response in closed form, shape (N, S, V).

    ``grad_theta[s] log p(y) = sum_{t: s_t = s} (onehot(y_t) - pi(. | s))``; each state occurs at most once along
    a response, so one scatter per position suffices.
    """
    _check_theta(theta, table)
    pi = torch.softmax(theta.detach(), dim=-1)
    n = table.num_sequences
    scores = torch.zeros((n, *table.shape), dtype=pi.dtype)
    rows = torch.arange(n)
    for t in range(table.tokens.shape[1]):
        s, a, m = table.prefix_index[:, t], table.tokens[:, t], table.mask[:, t]
        contrib = torch.nn.functional.one_hot(a, table.vocab_size).to(pi.dtype) - pi[s]
        scores[rows, s] += contrib * m.unsqueeze(-1).to(pi.dtype)
    return scores


def sample_sequences(theta: Tensor, table: SequenceTable, num: int, *, seed: int) -> Tensor:
    """``num`` i.i.d. responses from ``p(y)`` (seeded), as row indices into the table, shape (num,)."""
    gen = torch.Generator().manual_seed(seed)
    probs = probabilities(theta.detach(), table)
    return torch.multinomial(probs, num, replacement=True, generator=gen)


def sample_tokens(theta: Tensor, table: SequenceTable, num: int, *, seed: int) -> list[tuple[tuple[int, ...], float]]:
    """``num`` rollouts token by token through ``TokenMDP.step`` (slow, for checking :func:`sample_sequences`)."""
    mdp = table.mdp
    if table.env_logprobs is not None or not isinstance(mdp, TokenMDP):
        raise TokenMDPError("sample_tokens: this table has environment tokens; use sample_sequences")
    gen = torch.Generator().manual_seed(seed)
    pi = torch.softmax(theta.detach(), dim=-1)
    out = []
    for _ in range(num):
        state, reward, done = mdp.reset(table.prompt), 0.0, False
        while not done:
            probs = pi[table.prefix_row(state.response)]
            res = mdp.step(state, int(torch.multinomial(probs, 1, generator=gen)))
            state, reward, done = res.state, res.reward, res.done
        out.append((state.response, reward))
    return out


def all_groups(num_sequences: int, group_size: int) -> Tensor:
    """Every ordered group of ``group_size`` responses, shape (N^G, G) (row-major, the last column fastest)."""
    total = num_sequences**group_size
    if total > 2_000_000:
        raise TokenMDPError(f"all_groups: {num_sequences}^{group_size} = {total} groups is too many to list")
    grids = torch.meshgrid(*[torch.arange(num_sequences)] * group_size, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


def group_probabilities(theta: Tensor, table: SequenceTable, groups: Tensor) -> Tensor:
    """The probability of each group of i.i.d. responses, ``prod_j p(y_j)``, shape (M,); sums to 1 over all."""
    logp = sequence_logprobs(theta.detach(), table)
    return logp[groups].sum(dim=-1).exp()


__all__ = [
    "Enumerable",
    "SequenceTable",
    "enumerate_sequences",
    "init_logits",
    "token_logprobs",
    "sequence_logprobs",
    "probabilities",
    "expected_return",
    "exact_gradient",
    "score_function",
    "sample_sequences",
    "sample_tokens",
    "all_groups",
    "group_probabilities",
]
