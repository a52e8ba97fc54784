"""The token MDP of LLM generation.

A state is ``s_t = (x, y_<t)``: the prompt token ids ``x`` and the response tokens generated so far. An action is
the next token id ``a_t`` in ``[0, vocab_size)``. The transition is deterministic concatenation,
``s_{t+1} = (x, y_<t + [a_t])``. The episode ends

* ``terminated`` when the action is the EOS token (the EOS token is part of the response), or
* ``truncated`` when the response reaches ``max_len`` tokens without EOS (EOS exactly at position ``max_len``
  counts as terminated, not truncated: the model ended on its own).

The reward is 0 on every step before the end and ``reward_fn(prompt, response)`` on the step that ends the episode
(terminated or truncated): a verifier scoring the full sequence. The discount is 1 (docs/math.md section 2.1). How that
single terminal reward is spread over the tokens is the job of :mod:`tokenmdp.mdp.credit`.

Example (vocabulary ``{0: EOS, 1: a, 2: b}``, ``max_len = 2``, reward 1 iff the response is ``[1, 0]``)::

    mdp = TokenMDP(lambda x, y: float(y == (1, 0)), eos_id=0, max_len=2, vocab_size=3)
    s = mdp.reset([7])            # TokenState(prompt=(7,), response=())
    r = mdp.step(s, 1)            # reward 0.0, terminated False, truncated False
    r = mdp.step(r.state, 0)      # reward 1.0, terminated True,  truncated False
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tokenmdp.errors import TokenMDPError

RewardFn = Callable[[tuple[int, ...], tuple[int, ...]], float]


@dataclass(frozen=True)
class TokenState:
    """``s_t = (x, y_<t)``: prompt ids and the response tokens so far (hashable, immutable)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...] = ()
    done: bool = False

    @property
    def ids(self) -> tuple[int, ...]:
        """The full token sequence ``x + y_<t`` that a language model conditions on."""
        return self.prompt + self.response

    @property
    def t(self) -> int:
        """The time step: the number of response tokens so far."""
        return len(self.response)


@dataclass(frozen=True)
class StepResult:
    """The outcome of one transition (gymnasium's naming: ``terminated`` = EOS, ``truncated`` = length limit)."""

    state: TokenState
    reward: float
    terminated: bool
    truncated: bool

    @property
    def next_state(self) -> TokenState:
        return self.state

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class TokenMDP:
    """The deterministic token MDP with a terminal reward from ``reward_fn(prompt, response)``.

    Parameters
    ----------
    reward_fn:
        Called once per episode, on the step that ends it, with the prompt and the full response (tuples of ints,
        the EOS token included when the episode terminated). Must return a number.
    eos_id:
        The token that ends an episode (``terminated``).
    max_len:
        The maximum number of response tokens; reaching it without EOS sets ``truncated``.
    vocab_size:
        Actions are ``0 .. vocab_size - 1``.
    gamma:
        The discount; 1 for LLM post-training (kept as an attribute so the object prints as ``(S, A, P, r, gamma)``).
    """

    def __init__(
        self, reward_fn: RewardFn, eos_id: int, max_len: int, vocab_size: int, *, gamma: float = 1.0
    ) -> None:
        if not callable(reward_fn):
            raise TokenMDPError("TokenMDP: reward_fn must be callable (prompt, response) -> float")
        if int(vocab_size) < 2:
            raise TokenMDPError(f"TokenMDP: vocab_size must be >= 2 (EOS and one other token), got {vocab_size}")
        if not 0 <= int(eos_id) < int(vocab_size):
            raise TokenMDPError(f"TokenMDP: eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        if int(max_len) < 1:
            raise TokenMDPError(f"TokenMDP: max_len must be >= 1, got {max_len}")
        if not 0.0 <= float(gamma) <= 1.0:
            raise TokenMDPError(f"TokenMDP: gamma must be in [0, 1], got {gamma}")
        self.reward_fn = reward_fn
        self.eos_id = int(eos_id)
        self.max_len = int(max_len)
        self.vocab_size = int(vocab_size)
        self.gamma = float(gamma)

    def __repr__(self) -> str:
        return (
            f"TokenMDP(vocab_size={self.vocab_size}, eos_id={self.eos_id}, max_len={self.max_len}, "
            f"gamma={self.gamma})"
        )

    def reset(self, prompt_ids: Iterable[int] = ()) -> TokenState:
        """The initial state ``s_0 = (x, ())``."""
        prompt = tuple(int(i) for i in prompt_ids)
        return TokenState(prompt=prompt, response=(), done=False)

    def actions(self, state: TokenState) -> range:
        """The legal actions: every token id (none once the episode is over)."""
        return range(0) if state.done else range(self.vocab_size)

    def step(self, state: TokenState, action: int) -> StepResult:
        """Append ``action``; reward ``reward_fn(prompt, response)`` if this ends the episode, else 0."""
        if state.done:
            raise TokenMDPError(f"TokenMDP.step: the episode already ended at t={state.t}; call reset()")
        action = int(action)
        if not 0 <= action < self.vocab_size:
            raise TokenMDPError(f"TokenMDP.step: action {action} is outside the vocabulary [0, {self.vocab_size})")
        response = state.response + (action,)
        terminated = action == self.eos_id
        truncated = (not terminated) and len(response) >= self.max_len
        done = terminated or truncated
        reward = float(self.reward_fn(state.prompt, response)) if done else 0.0
        return StepResult(TokenState(state.prompt, response, done), reward, terminated, truncated)

    def run(self, prompt_ids: Iterable[int], actions: Sequence[int]) -> list[StepResult]:
        """Play ``actions`` from ``reset(prompt_ids)`` and return every step (stops early if the episode ends)."""
        state = self.reset(prompt_ids)
        out: list[StepResult] = []
        for a in actions:
            res = self.step(state, a)
            out.append(res)
            state = res.state
            if res.done:
                break
        return out

    def is_complete(self, response: Sequence[int]) -> bool:
        """Whether ``response`` is a whole episode: ends with EOS (only there) or has ``max_len`` tokens."""
        response = tuple(response)
        if not response or len(response) > self.max_len:
            return False
        if self.eos_id in response[:-1]:
            return False
        return response[-1] == self.eos_id or len(response) == self.max_len


__all__ = ["TokenMDP", "TokenState", "StepResult", "RewardFn"]
