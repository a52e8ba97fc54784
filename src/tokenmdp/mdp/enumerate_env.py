"""An enumerable two-LLM token MDP: a frozen, stochastic environment writes tokens between the policy's.

The sampled two-LLM formulation (:mod:`tokenmdp.rollout.two_llm`) lets a frozen base LLM continue the episode
from the policy's text; the verifier scores the result; the base's tokens enter the context and are masked out
of every loss. :class:`TwoLLMTokenMDP` is that shape small enough to list every episode. Vocabulary
``{0: EOS, 1: a, 2: b, ...}``; the policy writes at most ``max_len`` tokens (its token budget, which every length
normaliser uses); the *base* is a fixed table ``base(e | context)`` over the non-EOS tokens ``{1, ..., V-1}``, a
function of everything written so far (policy and base tokens), independent of ``theta``. Two variants
(:data:`ENV_VARIANTS`), after those of the sampled case:

* ``alternate``: the base writes one token right after the policy's ``k``-th token for each ``k`` in
  ``env_after`` (default: after the first); the policy's EOS ends the episode, ``max_len`` policy tokens without
  EOS truncate it (after a base turn due there). The verifier scores the *whole* transcript: the final-answer
  verifier, 1 iff it ends with ``a EOS``, so with ``env_after = (1,)`` and ``max_len = 2`` the correct episodes
  are ``x, a(base), EOS``: the policy must steer the base towards ``a`` and stop when it says ``a``.
* ``hint``: the policy writes a hint (up to EOS, or ``max_len`` tokens), then the base writes one answer token;
  the verifier reads only the base's answer: 1 iff it is ``a``. ``env_after`` is not used.

The default base (:func:`random_base`) is a seeded softmax table, ``base(. | c) = softmax(base_scale z_c)``
with ``z_c ~ N(0, 1)`` drawn from a generator seeded by ``(base_seed, c)``: a frozen model, not the policy.
``base_table`` overrides it with explicit probabilities (the hand examples).

:func:`enumerate_env_sequences` lists every episode as a :class:`~tokenmdp.mdp.enumerate.SequenceTable`: ``tokens``
the whole transcript, ``mask`` the policy's tokens (``response_mask``), ``observation_mask`` the base's,
``env_logprobs`` the log-probability of the base's tokens. ``theta`` has a row for every context, the base's
included (a language model has logits at the base's positions too); the loss never reads those rows, so every
update, and ``grad J``, is exactly 0 there. Since ``base`` does not depend on ``theta``,
``grad J = E[R grad log p(y)] = E[R sum_{policy t} grad log pi(y_t | s_t)]``: the score-function identities of
the plain token MDP hold with the base's tokens masked.

Hand example (the tests): ``hint``, V = 3, ``max_len = 1``, ``base(a | EOS) = 1/2``, ``base(a | a) = 3/4``,
``base(a | b) = 1/4``, ``theta = 0``: the hint is EOS, a or b with probability 1/3 each, six episodes of
probability ``1/3 * base(e | hint)``; ``J = (1/2 + 3/4 + 1/4) / 3 = 1/2``; one policy state (the empty context),
``dJ/dtheta[()] = pi_k (E[R | hint k] - J) = (0, 1/12, -1/12)``; the rows of the three base contexts are 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.enumerate import MAX_SEQUENCES, SequenceTable

ENV_VARIANTS = ("alternate", "hint")
EOS, ANSWER = 0, 1
Context = tuple[int, ...]


def random_base(vocab_size: int, context: Context, *, seed: int, scale: float) -> tuple[float, ...]:
    """``base(e | context)`` over ``e = 1 .. V-1``: ``softmax(scale * z)``, ``z ~ N(0, 1)`` seeded by
    ``(seed, context)`` (the same context always gets the same distribution, whatever the enumeration order)."""
    code = 0
    for tok in context:
        code = code * (vocab_size + 1) + tok + 1
    gen = torch.Generator().manual_seed((seed * 1_000_003 + code) % (2**63))
    z = torch.randn(vocab_size - 1, generator=gen, dtype=torch.float64)
    return tuple(torch.softmax(scale * z, dim=-1).tolist())


@dataclass(frozen=True)
class TwoLLMTokenMDP:
    """The enumerable two-LLM MDP (module docstring). ``max_len``: the policy's token budget."""

    vocab_size: int = 3
    max_len: int = 2
    variant: str = "alternate"
    env_after: tuple[int, ...] = (1,)
    base_seed: int = 1
    base_scale: float = 1.0
    base_table: Mapping[Context, Sequence[float]] | None = field(default=None, compare=False)
    eos_id: int = EOS

    def __post_init__(self) -> None:
        if self.variant not in ENV_VARIANTS:
            raise TokenMDPError(f"two-LLM MDP: unknown --env-variant {self.variant!r}; choose from "
                                f"{', '.join(ENV_VARIANTS)}")
        if self.vocab_size < 3:
            raise TokenMDPError(f"two-LLM MDP: --vocab must be >= 3 (EOS and two tokens for the base to choose "
                                f"between), got {self.vocab_size}")
        if self.max_len < 1:
            raise TokenMDPError(f"two-LLM MDP: --max-len must be >= 1, got {self.max_len}")
        bad = [k for k in self.env_after if not 1 <= k <= self.max_len]
        if self.variant == "alternate" and (not self.env_after or bad or len(set(self.env_after)) != len(
                self.env_after)):
            raise TokenMDPError(f"two-LLM MDP: --env-after must list distinct policy positions in 1..max_len = "
                                f"1..{self.max_len}, got {list(self.env_after)}")
        if not self.base_scale >= 0:
            raise TokenMDPError(f"two-LLM MDP: --base-scale must be >= 0, got {self.base_scale}")

    def base(self, context: Context) -> tuple[float, ...]:
        """``base(e | context)`` for ``e = 1 .. V-1`` (sums to 1)."""
        if self.base_table is None:
            return random_base(self.vocab_size, context, seed=self.base_seed, scale=self.base_scale)
        probs = self.base_table.get(tuple(context))
        if probs is None or len(probs) != self.vocab_size - 1 or abs(sum(probs) - 1) > 1e-9 or min(probs) < 0:
            raise TokenMDPError(f"two-LLM MDP: base_table needs a distribution over the {self.vocab_size - 1} "
                                f"non-EOS tokens for context {context!r}, got {probs!r}")
        return tuple(float(p) for p in probs)

    def reward(self, tokens: Context, observed: Sequence[bool]) -> float:
        """The verifier: ``alternate`` reads the transcript (ends with ``a EOS``), ``hint`` the base's last token."""
        if self.variant == "hint":
            base_tokens = [t for t, o in zip(tokens, observed) if o]
            return float(bool(base_tokens) and base_tokens[-1] == ANSWER)
        return float(len(tokens) >= 2 and tokens[-1] == EOS and tokens[-2] == ANSWER)

    def describe(self) -> str:
        v, length = self.vocab_size, self.max_len
        base = ("an explicit table" if self.base_table is not None else
                f"softmax({self.base_scale:g} N(0, 1)) per context, base seed {self.base_seed}")
        if self.variant == "hint":
            turn = (f"the policy writes a hint of up to {length} tokens (ended by EOS), the frozen base answers one "
                    "token; reward 1 iff the base's answer is 'a'")
        else:
            turn = (f"the policy writes up to {length} tokens (EOS ends the episode), the frozen base writes one token "
                    f"after policy token(s) {', '.join(map(str, self.env_after))}; reward 1 iff the transcript "
                    "ends with 'a EOS'")
        return f"two-LLM token MDP ({self.variant}), vocab {v} (EOS = 0, a = 1): {turn}; base: {base}"


Episode = tuple[Context, tuple[bool, ...], tuple[int, ...], float, bool]


def _episodes(mdp: TwoLLMTokenMDP, contexts: list[Context]) -> list[Episode]:
    """Every episode: (tokens, observed flags, context rows, env log-prob, terminated); fills ``contexts``."""
    row: dict[Context, int] = {}
    out: list[Episode] = []

    def ctx_row(c: Context) -> int:
        if c not in row:
            row[c] = len(contexts)
            contexts.append(c)
        return row[c]

    def base_turn(toks: Context, obs: tuple[bool, ...], rows: tuple[int, ...], lp: float, n_pol: int,
                  ends: bool | None) -> None:
        """One base token; then the episode ends (``ends``: its ``terminated`` flag) or the policy goes on."""
        r = ctx_row(toks)
        for e, q in enumerate(mdp.base(toks), start=1):
            if q <= 0:
                continue
            nxt = (toks + (e,), obs + (True,), rows + (r,), lp + math.log(q))
            if ends is None:
                policy_turn(*nxt, n_pol)
            else:
                out.append((*nxt, ends))

    def policy_turn(toks: Context, obs: tuple[bool, ...], rows: tuple[int, ...], lp: float, n_pol: int) -> None:
        """One policy token; ``terminated`` means the policy wrote EOS (in both variants)."""
        r = ctx_row(toks)
        for a in range(mdp.vocab_size):
            nxt, k, eos = (toks + (a,), obs + (False,), rows + (r,), lp), n_pol + 1, a == EOS
            if mdp.variant == "hint":
                if eos or k == mdp.max_len:  # the hint is over: the base answers, the episode ends
                    base_turn(*nxt, k, ends=eos)
                else:
                    policy_turn(*nxt, k)
            elif eos:
                out.append((*nxt, True))
            elif k in mdp.env_after:
                base_turn(*nxt, k, ends=False if k == mdp.max_len else None)
            elif k == mdp.max_len:
                out.append((*nxt, False))
            else:
                policy_turn(*nxt, k)

    policy_turn((), (), (), 0.0, 0)
    return out


def enumerate_env_sequences(mdp: TwoLLMTokenMDP) -> SequenceTable:
    """Every episode of ``mdp`` as a :class:`SequenceTable` (module docstring), sorted by (length, tokens)."""
    contexts: list[Context] = []
    eps = _episodes(mdp, contexts)
    if len(eps) > MAX_SEQUENCES:
        raise TokenMDPError(f"two-LLM MDP: {len(eps)} episodes exceed the limit of {MAX_SEQUENCES}; use a smaller "
                            "--vocab or --max-len")
    eps.sort(key=lambda e: (len(e[0]), e[0]))
    n, width = len(eps), max(len(e[0]) for e in eps)
    tokens = torch.zeros(n, width, dtype=torch.long)
    prefix_index = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    observed = torch.zeros(n, width, dtype=torch.bool)
    for i, (toks, obs, rows, _, _) in enumerate(eps):
        k = len(toks)
        tokens[i, :k], prefix_index[i, :k] = torch.tensor(toks), torch.tensor(rows)
        observed[i, :k] = torch.tensor(obs)
        mask[i, :k] = ~torch.tensor(obs)
    return SequenceTable(
        mdp=mdp, prompt=(), prefixes=tuple(contexts), sequences=tuple(e[0] for e in eps), tokens=tokens,
        mask=mask, prefix_index=prefix_index,
        rewards=torch.tensor([mdp.reward(e[0], e[1]) for e in eps], dtype=torch.float64),
        lengths=mask.sum(dim=-1), terminated=torch.tensor([e[4] for e in eps], dtype=torch.bool),
        observation_mask=observed, env_logprobs=torch.tensor([e[3] for e in eps], dtype=torch.float64),
    )


def policy_rows(table: SequenceTable) -> torch.Tensor:
    """(S,) bool: the rows of ``theta`` whose context precedes a policy token (the others precede the base's)."""
    rows = torch.zeros(table.num_prefixes, dtype=torch.bool)
    rows[table.prefix_index[table.mask]] = True
    return rows


__all__ = ["ENV_VARIANTS", "TwoLLMTokenMDP", "enumerate_env_sequences", "policy_rows", "random_base"]
