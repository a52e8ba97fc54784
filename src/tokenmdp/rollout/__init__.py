"""Rollouts of the token MDP: the `Rollout` batch and the sampling engines (`hf`, `fast`, `vllm`)."""

from __future__ import annotations

import importlib

from tokenmdp.errors import TokenMDPError
from tokenmdp.rollout.padding import left_pad, right_pad
from tokenmdp.rollout.types import Engine, Rollout, concat_rollouts

ENGINES = {
    "hf": "tokenmdp.rollout.hf:HFEngine",
    "fast": "tokenmdp.rollout.fast:FastEngine",
    "vllm": "tokenmdp.rollout.vllm:VLLMEngine",
}


def get_engine(name: str, model, tokenizer, **kw) -> Engine:
    """The rollout engine ``name`` ("hf", "fast" or "vllm") over ``model`` and ``tokenizer``.

    Extra keyword arguments go to the engine's constructor (e.g. ``eos_token_id=``).
    """
    if name not in ENGINES:
        raise TokenMDPError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, tokenizer, **kw)


__all__ = ["Rollout", "Engine", "get_engine", "concat_rollouts", "left_pad", "right_pad", "ENGINES"]
