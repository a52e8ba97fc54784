"""The run's multi-turn environment (config section ``task.env``): built once from the config, used by
:func:`tokenmdp.train.batch.collect` to roll out episodes through :func:`tokenmdp.rollout.multiturn.run_episodes`.

* ``single_turn``: :class:`tokenmdp.mdp.env.SingleTurnEnv` scoring the decoded turn with the task's verifier
  (limits: one turn of ``max_new_tokens``), the same rollouts and scores as the plain loop;
* ``calculator``: :class:`tokenmdp.rollout.calculator.CalculatorEnvironment`, a tool that writes the value of each
  ``a op b =`` step the policy asks for (limits: ``max_turns`` turns of ``turn_tokens``, ``max_tokens`` in all,
  default ``rollout.max_new_tokens``);
* ``two_llm_hint`` / ``two_llm_alternate``: :class:`tokenmdp.rollout.two_llm.BaseModelEnvironment` over the frozen
  base model ``task.env.base_path`` (default: the policy's start model), loaded here with its own tokenizer and a
  ``fast`` sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EpisodeLimits, SingleTurnEnv, TokenEnv


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


__all__ = ["RunEnvironment", "build_environment"]
