"""The run's multi-turn environment (config section ``task.env``): built once from the config; :func:`collect_episodes`
rolls out a step's episodes through :func:`tokenmdp.rollout.multiturn.run_episodes`.

* ``single_turn``: :class:`tokenmdp.mdp.env.SingleTurnEnv` scoring the decoded turn with the task's verifier
  (limits: one turn of ``max_new_tokens``), the same rollouts and scores as the plain loop;
* ``calculator``: :class:`tokenmdp.rollout.calculator.CalculatorEnvironment`, a tool that writes the value of each
  ``a op b =`` step the policy asks for (limits: ``max_turns`` turns of ``turn_tokens``, ``max_tokens`` in all,
  default ``rollout.max_new_tokens``);
* ``module``: :class:`tokenmdp.tasks.env_module.ModuleEnv`, the turns of the task's environment module (limits:
  ``max_turns`` turns of ``turn_tokens``, ``max_tokens`` in all, default four times the policy's share);
* ``two_llm_hint`` / ``two_llm_alternate``: :class:`tokenmdp.rollout.two_llm.BaseModelEnvironment` over the frozen
  base model ``task.env.base_path`` (default: the policy's start model), loaded here with its own tokenizer and a
  ``fast`` sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EpisodeLimits, SingleTurnEnv, TokenEnv
from tokenmdp.tasks.env_module import ModuleEnv
from tokenmdp.train.batch import Batch


@dataclass
class RunEnvironment:
    """A run's environment: a factory of episodes, the episode limits, and ``begin(seed)`` called before each
    step's episodes (seeds the environment's own sampling)."""

    kind: str
    make_env: Callable[[], TokenEnv]
    limits: EpisodeLimits
    begin: Callable[[int], None]
    shared: Any = None  # the two-LLM environment's shared state (the base model and its sampler)


def build_environment(config, settings, task, tokenizer, device) -> RunEnvironment | None:
    """The environment of ``config.task.env`` (None for ``kind="none"``)."""
    env = config.task.env
    max_new = settings.max_new_tokens
    if env.kind == "none":
        return None
    if env.kind == "single_turn":
        def score(problem, ids):
            return task.score(problem, tokenizer.decode(list(ids), skip_special_tokens=True,
                                                        clean_up_tokenization_spaces=False))

        return RunEnvironment("single_turn", lambda: SingleTurnEnv(score), EpisodeLimits(1, max_new, max_new),
                              lambda seed: None)
    if env.kind == "module":
        stop = ()
        if env.turn_stop is not None:
            ids = tokenizer(env.turn_stop, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise TokenMDPError(f"config field 'task.env.turn_stop' {env.turn_stop!r} is {len(ids)} tokens of the "
                                    "policy's tokenizer; a turn must end at one stop token")
            stop = (int(ids[0]),)
        limits = EpisodeLimits(env.max_turns, env.turn_tokens, env.max_tokens or 4 * env.max_turns * env.turn_tokens)
        return RunEnvironment("module", lambda: ModuleEnv(task, tokenizer, stop), limits, lambda seed: None)
    if env.kind == "calculator":
        from tokenmdp.rollout.calculator import CalculatorEnvironment

        calc = CalculatorEnvironment(tokenizer, task)
        limits = EpisodeLimits(env.max_turns, env.turn_tokens, env.max_tokens or max_new)
        return RunEnvironment("calculator", calc.make_env, limits, calc.begin, calc)
    from tokenmdp.policy.model import load_policy
    from tokenmdp.rollout.fast import FastEngine
    from tokenmdp.rollout.two_llm import BaseModelEnvironment

    path = str(Path(env.base_path).expanduser()) if env.base_path else settings.model_path
    gguf = None if env.base_path else config.model.gguf_file
    try:
        base = load_policy(path, dtype=config.model.dtype, device=device, gguf_file=gguf)
    except (TokenMDPError, OSError, ValueError) as exc:
        raise TokenMDPError(f"config field 'task.env.base_path': cannot load the base model {path!r}: {exc}") from None
    base.model.eval()
    base.model.requires_grad_(False)
    variant = "hint" if env.kind == "two_llm_hint" else "alternate"
    turns = 1 if variant == "hint" else env.max_turns
    base_tokens = env.base_tokens or max_new
    limits = EpisodeLimits(turns, env.turn_tokens, env.max_tokens or turns * (env.turn_tokens + base_tokens))
    shared = BaseModelEnvironment(FastEngine(base.model, base.tokenizer), base.tokenizer, tokenizer, task,
                                  template=settings.template, variant=variant, max_turns=turns,
                                  base_tokens=base_tokens, base_temperature=env.base_temperature,
                                  seed=config.run.seed)
    return RunEnvironment(env.kind, shared.make_env, limits, shared.begin, shared)


def collect_episodes(env: RunEnvironment, engine, tokenizer, problems: list, prompts: list[str], sampling: dict,
                     device) -> Batch:
    """``G = sampling["n"]`` episodes of ``env`` for each problem: the rewards are the environment's (each row's
    return), the scores its final ``info["score"]`` (an episode cut by a limit before any score: its return, not
    correct, not formatted), the per-turn token rewards kept for the credit assignment."""
    from tokenmdp.rollout.multiturn import run_episodes
    from tokenmdp.tasks.task import Score

    t0 = time.perf_counter()
    env.begin(sampling["seed"])
    ep = run_episodes(engine, tokenizer, env.make_env, problems, prompts, group_size=sampling["n"],
                      limits=env.limits, temperature=sampling["temperature"], top_p=sampling["top_p"],
                      top_k=sampling["top_k"], seed=sampling["seed"])
    t1 = time.perf_counter()
    rows = [p for p in problems for _ in range(sampling["n"])]
    scores = []
    for r, info in zip(ep.rewards.tolist(), ep.infos):
        s = info.get("score")
        if s is None:
            s = Score(float(r), False, False, f"no score: truncated by {info.get('truncated_by', 'a limit')}")
        scores.append(s)
    limit = [i.get("truncated_by") in ("max_turns", "max_tokens") for i in ep.infos]
    obs = ep.rollout.observation_mask
    metrics = {"env/turns": float(ep.turns.float().mean()), "env/limit_truncated": sum(limit) / max(1, len(limit)),
               "env/observation_tokens": float(obs.sum(1).float().mean()) if obs is not None else 0.0}
    return Batch(
        rollout=ep.rollout.to(device), problems=rows, scores=scores,
        rewards=ep.rewards.to(device),
        correct=torch.tensor([bool(s.correct) for s in scores], dtype=torch.bool, device=device),
        formatted=torch.tensor([bool(s.formatted) for s in scores], dtype=torch.bool, device=device),
        group_size=sampling["n"], times={"time/rollout": t1 - t0, "time/score": 0.0},
        token_rewards=ep.token_rewards.to(device), metrics=metrics,
    )


__all__ = ["RunEnvironment", "build_environment", "collect_episodes"]
