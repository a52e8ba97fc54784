"""Multi-turn token environments: the policy's turns are actions, the environment's tokens are observations.

The token MDP of :mod:`tokenmdp.mdp.token` has one actor: the state is the prompt plus the policy's own tokens.
A :class:`TokenEnv` breaks that assumption (the first of the two that arXiv 2505.13697 rests its reduction of
GRPO to filtered SFT on). An episode, Gymnasium-style::

    context = env.reset(problem, prompt_ids)           # the tokens the first turn conditions on
    while True:
        action = policy(context)                       # one turn: tokens up to a stop token, EOS or a limit
        step = env.step(action)                        # EnvStep(observation, reward, terminated, truncated, info)
        context += action + step.observation           # observations enter the context ...
        if step.terminated or step.truncated: break    # ... but are never the policy's actions

The episode is stored as one row of a rollout (:class:`tokenmdp.rollout.types.Rollout`): the response is the turns
and observations in order, ``response_mask`` is 1 on the policy's tokens only (every loss counts those and nothing
else) and ``observation_mask`` is 1 on the environment's tokens (attended to, never trained on). Turn ``k``'s
reward ``r_k`` is placed on the last token of policy turn ``k`` (:func:`turn_token_rewards`), so the return is
``R = sum_k r_k`` and process-style credit sees where each reward was earned.

:class:`SingleTurnEnv` is the token MDP itself as an environment: one policy turn, the verifier's reward, no
observation; run through the multi-turn driver it gives today's rollouts exactly.

Limits (:class:`EpisodeLimits`): at most ``max_turns`` policy turns, at most ``turn_tokens`` tokens a turn and
``max_tokens`` response tokens in all (policy and observation); an episode that reaches one without the
environment ending it is ``truncated`` and records which limit (``info["truncated_by"]``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError


@dataclass(frozen=True)
class EnvStep:
    """What :meth:`TokenEnv.step` returns: observation token ids (in the policy's vocabulary), the turn's reward,
    ``terminated`` (the episode ended: answered, solved, failed), ``truncated`` (the environment's own limit) and
    ``info`` (``info["score"]``: the verifier's :class:`~tokenmdp.tasks.task.Score` of the episode, when scored)."""

    observation: tuple[int, ...] = ()
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EpisodeLimits:
    """``max_turns`` policy turns, ``turn_tokens`` tokens per policy turn, ``max_tokens`` response tokens in all
    (policy and observation tokens); each at least 1."""

    max_turns: int = 1
    turn_tokens: int = 256
    max_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_turns", "turn_tokens", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TokenMDPError(f"episode limit {name!r} must be an integer >= 1, got {value!r}")


class TokenEnv(ABC):
    """One episode of a multi-turn environment (a new instance per episode; see the module docstring).

    ``stop_ids``: tokens (besides EOS) that end a policy turn, e.g. a newline for one-line moves; the stop token is
    part of the turn. EOS from the policy ends the episode (``terminated``) without calling :meth:`step`.
    """

    stop_ids: tuple[int, ...] = ()

    def reset(self, problem: Any, prompt_ids: Sequence[int]) -> list[int]:
        """Start an episode on ``problem`` whose rendered prompt is ``prompt_ids``; returns the context of the first
        turn (by default the prompt itself)."""
        return list(prompt_ids)

    @abstractmethod
    def step(self, action: Sequence[int]) -> EnvStep:
        """Answer the policy's turn ``action`` (token ids, the stop token included)."""

    @classmethod
    def step_batch(cls, envs: Sequence[TokenEnv], actions: Sequence[Sequence[int]]) -> list[EnvStep]:
        """One step of many episodes at once (an environment with a model overrides it to batch its work)."""
        return [env.step(a) for env, a in zip(envs, actions)]

    def on_eos(self, action: Sequence[int]) -> EnvStep:
        """The policy ended the episode with EOS in turn ``action``: the final reward (default: 0, no score)."""
        return EnvStep(terminated=True)


class SingleTurnEnv(TokenEnv):
    """The token MDP as an environment: one policy turn (up to EOS or the token limit), scored by
    ``score_fn(problem, action_ids)``, which returns a number or an object with a ``reward`` attribute (a task's
    ``Score``, kept as ``info["score"]``); no observation, ever."""

    def __init__(self, score_fn: Callable[[Any, tuple[int, ...]], Any]):
        if not callable(score_fn):
            raise TokenMDPError("SingleTurnEnv: score_fn must be callable (problem, action_ids) -> reward or Score")
        self.score_fn = score_fn
        self.problem: Any = None

    def reset(self, problem: Any, prompt_ids: Sequence[int]) -> list[int]:
        self.problem = problem
        return list(prompt_ids)

    def _score(self, action: Sequence[int], *, eos: bool) -> EnvStep:
        result = self.score_fn(self.problem, tuple(int(a) for a in action))
        reward = float(getattr(result, "reward", result))
        return EnvStep((), reward, eos, not eos, {"score": result} if hasattr(result, "reward") else {})

    def step(self, action: Sequence[int]) -> EnvStep:
        """The turn ended without EOS (it reached the token limit): scored, ``truncated`` as in the token MDP."""
        return self._score(action, eos=False)

    def on_eos(self, action: Sequence[int]) -> EnvStep:
        """The turn ended with EOS: scored, ``terminated``."""
        return self._score(action, eos=True)


def check_observation(observation: Sequence[int], vocab_size: int, *, turn: int, row: int) -> tuple[int, ...]:
    """The observation as a tuple of ints, or one :class:`TokenMDPError` naming the first token outside
    ``[0, vocab_size)`` (its value, position, turn and episode row)."""
    out = []
    for pos, tok in enumerate(observation):
        if isinstance(tok, bool) or not hasattr(tok, "__index__"):
            raise TokenMDPError(f"environment observation of episode {row}, turn {turn}: token {pos} is {tok!r}, "
                                f"not a token id")
        t = int(tok)
        if not 0 <= t < vocab_size:
            raise TokenMDPError(f"environment observation of episode {row}, turn {turn}: token {pos} is {t}, outside "
                                f"the policy's vocabulary [0, {vocab_size})")
        out.append(t)
    return tuple(out)


def assemble_episode(segments: Sequence[tuple[str, Sequence[int], Sequence[float]]]
                     ) -> tuple[list[int], list[int], list[int], list[float], list[int]]:
    """One episode's response row from its segments in order, each ``("action", ids, logprobs)`` or
    ``("observation", ids, ())``; returns ``(ids, response_mask, observation_mask, logprobs, turn_ends)`` where
    ``turn_ends[k]`` is the column of the last token of policy turn ``k`` (an empty turn has none).

    Hand example: action ``[5, 6]`` (log-probs ``[-1, -2]``), observation ``[7]``, action ``[8]`` (``[-3]``):
    ids ``[5, 6, 7, 8]``, response_mask ``[1, 1, 0, 1]``, observation_mask ``[0, 0, 1, 0]``, logprobs
    ``[-1, -2, 0, -3]``, turn_ends ``[1, 3]``.
    """
    ids: list[int] = []
    act: list[int] = []
    obs: list[int] = []
    lps: list[float] = []
    ends: list[int] = []
    for kind, toks, lp in segments:
        toks = [int(t) for t in toks]
        if kind == "action":
            if len(lp) != len(toks):
                raise TokenMDPError(f"assemble_episode: an action of {len(toks)} tokens has {len(lp)} log-probs")
            lps += [float(x) for x in lp]
            act += [1] * len(toks)
            obs += [0] * len(toks)
            if toks:
                ends.append(len(ids) + len(toks) - 1)
        elif kind == "observation":
            lps += [0.0] * len(toks)
            act += [0] * len(toks)
            obs += [1] * len(toks)
        else:
            raise TokenMDPError(f"assemble_episode: segment kind must be 'action' or 'observation', got {kind!r}")
        ids += toks
    return ids, act, obs, lps, ends


def turn_token_rewards(turn_rewards: Sequence[Sequence[float]], turn_ends: Sequence[Sequence[int]], width: int
                       ) -> torch.Tensor:
    """(B, width) token rewards: turn ``k``'s reward of row ``i`` on column ``turn_ends[i][k]``, 0 elsewhere.

    A reward after the policy's last token (the environment's answer to it) goes to that last token; a reward of a
    row with no policy token at all is dropped (there is no action to credit). The sum of a row is its return
    ``R_i = sum_k r_k`` whenever it has a policy token. Hand example: rewards ``[[0.5, 1]]``, ends ``[[1, 3]]``,
    width 5 -> ``[[0, 0.5, 0, 1, 0]]``.
    """
    out = torch.zeros(len(turn_rewards), width, dtype=torch.float32)
    for i, (rs, ends) in enumerate(zip(turn_rewards, turn_ends)):
        if not ends:
            continue
        for k, r in enumerate(rs):
            out[i, ends[min(k, len(ends) - 1)]] += float(r)
    return out


__all__ = ["EnvStep", "EpisodeLimits", "TokenEnv", "SingleTurnEnv", "check_observation", "assemble_episode",
           "turn_token_rewards"]
