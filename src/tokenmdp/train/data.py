"""What the trainer feeds on: the prompt stream of a run and offline preference pairs for DPO.

:func:`prompt_stream` is a function of the task, the seed and the sizes only (never of the algorithm or the model),
so every algorithm of a comparison sees the same prompts in the same order for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.model import chat_prompt


def prompt_stream(task, *, seed: int, steps: int, prompts_per_step: int, split: str = "train") -> list[list]:
    """The problems of every training step: ``steps`` lists of ``prompts_per_step`` problems.

    The problems are ``task.problems(split, n=steps * prompts_per_step, seed=seed)`` in order. A split that holds
    fewer problems (``task.num_problems(split)``: a dataset, or a small generated task) is cycled in epochs: epoch 0
    is the split in the task's order, epoch ``e >= 1`` a permutation of it drawn from
    ``numpy.random.default_rng([seed, e])``. The stream of a shorter run is a prefix of the stream of a longer one
    (``prompt_stream(steps=n)`` is ``prompt_stream(steps=m)[:n]`` for ``n <= m``), so a run extended by ``--resume``
    sees the prompts of a run that was that long from the start. Nothing here depends on the algorithm or the model.
    """
    if steps < 0 or prompts_per_step < 1:
        raise TokenMDPError(f"prompt_stream needs steps >= 0 and prompts_per_step >= 1, got {steps}, "
                            f"{prompts_per_step}")
    need = steps * prompts_per_step
    if need == 0:
        return []
    size = task.num_problems(split) if hasattr(task, "num_problems") else None
    pool = list(task.problems(split, n=need if size is None else min(need, size), seed=seed))
    if not pool:
        raise TokenMDPError(f"task {getattr(task, 'name', task)!r} has no {split!r} problems")
    return _cut(_epochs(pool, need, seed=seed, first=pool), prompts_per_step, steps)


def _epochs(pool: list, need: int, *, seed: int, first: list | None = None) -> list:
    """``need`` items of ``pool``: ``first`` (epoch 0, when given), then epochs ``e`` as permutations of the pool
    drawn from ``numpy.random.default_rng([seed, e])``."""
    flat = list(first) if first is not None else []
    epoch = 0 if first is None else 1
    while len(flat) < need:
        order = np.random.default_rng([seed, epoch]).permutation(len(pool))
        flat.extend(pool[i] for i in order[: need - len(flat)])
        epoch += 1
    return flat


def _cut(flat: list, per_step: int, steps: int) -> list[list]:
    return [flat[i * per_step : (i + 1) * per_step] for i in range(steps)]


@dataclass(frozen=True)
class PreferencePair:
    """One offline DPO example: the full prompt text, a preferred and a dispreferred completion."""

    prompt: str
    chosen: str
    rejected: str


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL (or Parquet) of ``{"prompt", "chosen", "rejected"}`` objects (strings).

    A missing field or a non-string value raises :class:`TokenMDPError` naming the file and line.
    """
    from tokenmdp.tasks.task import read_records, require

    pairs = []
    for lineno, record in read_records(path):
        where = f"{path}:{lineno}"
        values = [require(record, key, where) for key in ("prompt", "chosen", "rejected")]
        for key, value in zip(("prompt", "chosen", "rejected"), values):
            if not isinstance(value, str):
                raise TokenMDPError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        pairs.append(PreferencePair(*values))
    if not pairs:
        raise TokenMDPError(f"{path}: no preference pairs (expected lines of prompt, chosen, rejected)")
    return pairs


def pair_stream(pairs: list[PreferencePair], *, seed: int, steps: int,
                pairs_per_step: int) -> list[list[PreferencePair]]:
    """The offline pairs of every step: epochs of seeded permutations (``default_rng([seed, e])``), cut in steps."""
    return _cut(_epochs(pairs, steps * pairs_per_step, seed=seed), pairs_per_step, steps)


def render_prompts(task, problems: list, *, template: str | None, tokenizer, chat: bool) -> list[str]:
    """The prompt text of each problem: the task's template, wrapped in the tokenizer's chat template when
    ``chat``; a problem whose task gives chat messages (``task.chat_messages``) goes through the chat template
    whole, which ``chat`` must allow."""
    out = []
    for p in problems:
        messages = task.chat_messages(p) if hasattr(task, "chat_messages") else None
        if messages:
            if not chat:
                raise TokenMDPError(f"problem {p.id}: its prompt is a list of chat messages, which the model's chat "
                                    "template renders: set task.chat_template=true (--chat)")
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            text = task.render(p, template=template)
            out.append(chat_prompt(tokenizer, text) if chat else text)
    return out

