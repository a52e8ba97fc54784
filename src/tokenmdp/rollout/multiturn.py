"""The multi-turn driver: ``B`` episodes of a :class:`~tokenmdp.mdp.env.TokenEnv` in lockstep turns, as one
:class:`~tokenmdp.rollout.types.Rollout`.

Each turn, the policy's engine samples the next turn of every live episode from its whole context (prompt, earlier
turns and observations, as token ids: nothing is re-tokenised), stopping each row at EOS, at one of the
environment's ``stop_ids`` or at the turn's token budget ``min(turn_tokens, max_tokens - used)``; the environment
answers all the turns that did not end with EOS at once (:meth:`TokenEnv.step_batch`), and its observation is
checked against the policy's vocabulary and appended. An episode ends when the policy samples EOS
(:meth:`TokenEnv.on_eos` gives the final reward), when the environment says ``terminated`` or ``truncated``, or at
a limit (``max_turns`` policy turns, ``max_tokens`` response tokens): then it is truncated and
``info["truncated_by"]`` says which limit.

The first turn of a group starts from the same context, so it is sampled as the single-turn engines sample
(each distinct prompt once, ``n = G`` samples, the step's seed): with :class:`~tokenmdp.mdp.env.SingleTurnEnv` the
driver returns exactly the engine's ``generate`` rollout (the tests check it). Later turns use seeds derived from
the step's seed and the turn number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import (
    EnvStep,
    EpisodeLimits,
    TokenEnv,
    assemble_episode,
    check_observation,
    turn_token_rewards,
)
from tokenmdp.rollout.padding import left_pad, right_pad
from tokenmdp.rollout.types import Engine, Rollout, encode_prompts, pad_token_id


@dataclass
class Episodes:
    """What :func:`run_episodes` returns: the rollout (row ``i * G + j`` = episode ``j`` of problem ``i``), each
    episode's return ``rewards`` (B,) ``= sum_k r_k``, ``token_rewards`` (B, T) with turn ``k``'s reward on the last
    token of policy turn ``k``, the number of policy ``turns`` (B,), and each episode's merged ``infos`` (the
    environment's, plus ``truncated_by`` where a limit cut it)."""

    rollout: Rollout
    rewards: torch.Tensor
    token_rewards: torch.Tensor
    turns: torch.Tensor
    infos: list[dict]


def turn_seed(seed: int | None, turn: int) -> int | None:
    """The sampling seed of turn ``turn`` (0-based) of a step whose seed is ``seed``: turn 0 uses ``seed`` itself."""
    if seed is None or turn == 0:
        return seed
    return (int(seed) * 1_000_003 + turn * 104_729) % (2**31 - 1)


def _cut(ids: list[int], lps: list[float], stops: set[int], budget: int) -> tuple[list[int], list[float], bool]:
    """A row's turn: up to and including its first stop token, at most ``budget`` tokens; whether a stop ended it."""
    for k, t in enumerate(ids[:budget]):
        if t in stops:
            return ids[: k + 1], lps[: k + 1], True
    return ids[:budget], lps[:budget], False


def _sample_turn(engine: Engine, contexts: list[list[int]], live: list[int], *, group_size: int, first: bool,
                 pad: int, max_new: int, stop_ids: Sequence[int], sampling: dict, seed: int | None
                 ) -> tuple[list[list[int]], list[list[float]]]:
    """Raw sampled ids and log-probs of each live row (in ``live`` order)."""
    rows = [contexts[b] for b in live]
    n = 1
    if first and len(live) == len(contexts) and group_size > 1 and all(
            contexts[b] == contexts[b - b % group_size] for b in live):
        rows, n = rows[::group_size], group_size  # each group's shared context once, G samples: the engines' way
    ids = left_pad(rows, pad, dtype=torch.long)
    mask = left_pad([[1] * len(r) for r in rows], 0, dtype=torch.long)
    out, lps = engine.sample_ids(ids, mask, n=n, max_new_tokens=max_new, seed=seed, stop_ids=stop_ids, **sampling)
    return out.cpu().tolist(), lps.float().cpu().tolist()


def run_episodes(engine: Engine, tokenizer, make_env: Callable[[], TokenEnv], problems: Sequence[Any],
                 prompts: Sequence[str], *, group_size: int, limits: EpisodeLimits, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, vocab_size: int | None = None
                 ) -> Episodes:
    """Run ``group_size`` episodes of a fresh ``make_env()`` for each of ``problems`` (rendered as ``prompts``).

    ``vocab_size``: the policy's (default ``len(tokenizer)``); an observation token outside it is one
    :class:`TokenMDPError` naming the episode, turn and position.
    """
    if len(problems) != len(prompts):
        raise TokenMDPError(f"run_episodes: {len(problems)} problems but {len(prompts)} prompts")
    vocab = int(vocab_size if vocab_size is not None else len(tokenizer))
    pad = pad_token_id(tokenizer)
    eos = set(getattr(engine, "eos_ids", None) or [tokenizer.eos_token_id])
    ids, mask = encode_prompts(tokenizer, list(prompts), add_special_tokens=getattr(engine, "add_special_tokens", None))
    prompt_rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    b_total = len(prompts) * group_size
    envs = [make_env() for _ in range(b_total)]
    contexts = []
    for b, env in enumerate(envs):
        start = env.reset(problems[b // group_size], prompt_rows[b // group_size])
        contexts.append(list(check_observation(start, vocab, turn=0, row=b)))
    initial = [list(c) for c in contexts]
    segments: list[list[tuple]] = [[] for _ in range(b_total)]
    rewards: list[list[float]] = [[] for _ in range(b_total)]
    infos: list[dict] = [{} for _ in range(b_total)]
    used = [0] * b_total
    turns = [0] * b_total
    done = [False] * b_total
    terminated = [False] * b_total
    truncated = [False] * b_total
    stop_ids = tuple(int(s) for s in getattr(envs[0], "stop_ids", ()) or ()) if envs else ()
    stops = eos | set(stop_ids)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)

    def end(b: int, *, term: bool, trunc: bool, by: str | None = None) -> None:
        done[b], terminated[b], truncated[b] = True, term, trunc and not term
        if by is not None and truncated[b]:
            infos[b]["truncated_by"] = by

    for turn in range(limits.max_turns):
        for b in range(b_total):
            if not done[b] and used[b] >= limits.max_tokens:
                end(b, term=False, trunc=True, by="max_tokens")
        live = [b for b in range(b_total) if not done[b]]
        if not live:
            break
        budget = {b: min(limits.turn_tokens, limits.max_tokens - used[b]) for b in live}
        out, lps = _sample_turn(engine, contexts, live, group_size=group_size, first=turn == 0, pad=pad,
                                max_new=max(budget.values()), stop_ids=stop_ids, sampling=sampling,
                                seed=turn_seed(seed, turn))
        asks: list[tuple[int, list[int], bool]] = []
        for j, b in enumerate(live):
            action, lp, stopped = _cut(out[j], lps[j], stops, budget[b])
            segments[b].append(("action", action, lp))
            contexts[b] += action
            used[b] += len(action)
            turns[b] += 1
            if stopped and action[-1] in eos:
                step = envs[b].on_eos(action)
                rewards[b].append(float(step.reward))
                infos[b].update(step.info)
                end(b, term=True, trunc=False)
            else:
                asks.append((b, action, stopped))
        if asks:
            steps = type(envs[asks[0][0]]).step_batch([envs[b] for b, _, _ in asks], [a for _, a, _ in asks])
            for (b, _, stopped), step in zip(asks, steps):
                _observe(b, step, turn, vocab, limits, segments, contexts, used, rewards, infos)
                if step.terminated or step.truncated:
                    end(b, term=bool(step.terminated), trunc=bool(step.truncated),
                        by="environment" if stopped else "turn_tokens")
                elif used[b] >= limits.max_tokens:
                    end(b, term=False, trunc=True, by="max_tokens")
    for b in range(b_total):
        if not done[b]:
            end(b, term=False, trunc=True, by="max_turns")
    return _assemble(tokenizer, prompts, group_size, initial, segments, rewards, infos, turns, terminated, truncated,
                     pad)


def _observe(b: int, step: EnvStep, turn: int, vocab: int, limits: EpisodeLimits, segments, contexts, used,
             rewards, infos) -> None:
    """Append the environment's answer to episode ``b`` (cut to the episode's token budget)."""
    obs = list(check_observation(step.observation, vocab, turn=turn + 1, row=b))
    room = limits.max_tokens - used[b]
    if len(obs) > room:
        obs = obs[:room]
        infos[b]["observation_cut"] = True
    if obs:
        segments[b].append(("observation", obs, ()))
        contexts[b] += obs
        used[b] += len(obs)
    rewards[b].append(float(step.reward))
    infos[b].update(step.info)


def _assemble(tokenizer, prompts, group_size, initial, segments, rewards, infos, turns, terminated, truncated,
              pad) -> Episodes:
    rows = [assemble_episode(seg) for seg in segments]
    width = max([len(r[0]) for r in rows] + [0])
    response_ids = right_pad([r[0] for r in rows], pad, length=width, dtype=torch.long)
    response_mask = right_pad([r[1] for r in rows], 0, length=width, dtype=torch.long)
    observed = right_pad([r[2] for r in rows], 0, length=width, dtype=torch.long)
    logprobs = right_pad([r[3] for r in rows], 0.0, length=width, dtype=torch.float32)
    texts = tokenizer.batch_decode([r[0] for r in rows], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    rollout = Rollout(
        prompt_ids=left_pad(initial, pad, dtype=torch.long),
        prompt_mask=left_pad([[1] * len(c) for c in initial], 0, dtype=torch.long),
        response_ids=response_ids, response_mask=response_mask, logprobs=logprobs,
        terminated=torch.tensor(terminated, dtype=torch.bool), truncated=torch.tensor(truncated, dtype=torch.bool),
        prompts=[p for p in prompts for _ in range(group_size)], responses=texts, pad_token_id=pad,
        observation_mask=observed if bool(observed.any()) else None,
    )
    token_rewards = turn_token_rewards(rewards, [r[4] for r in rows], width)
    for info, t in zip(infos, turns):
        info["turns"] = t
    return Episodes(rollout=rollout, rewards=torch.tensor([sum(r) for r in rewards], dtype=torch.float32),
                    token_rewards=token_rewards, turns=torch.tensor(turns, dtype=torch.long), infos=infos)


__all__ = ["Episodes", "run_episodes", "turn_seed"]
