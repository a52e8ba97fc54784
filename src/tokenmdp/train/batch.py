"""A step's scored experience and what is read off it: the :class:`Batch` (a rollout of ``B = prompts x G`` rows,
groups contiguous, with its problems, the verifier's scores and ``rewards`` / ``correct`` / ``formatted``), its
``reward/*`` and ``length/*`` metrics, its rows of ``samples.parquet``, the process rewards of a step verifier, and
the gathering of per-process parts in a run of several processes.

The three forms of a step's experience: the engine's :class:`~tokenmdp.rollout.types.Rollout`, this
:class:`Batch` (:meth:`tokenmdp.train.trainer.Rollouts.collect`), and the update's
:class:`~tokenmdp.train.algorithms.TrainBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmdp.rollout.types import Rollout
from tokenmdp.train.meter import gather_parts, reduce_over_processes


@dataclass
class Batch:
    """A scored rollout of one training step."""

    rollout: Rollout
    problems: list  # one per row (each problem repeated G times)
    scores: list  # tokenmdp.tasks.Score per row
    rewards: torch.Tensor  # (B,) float32
    correct: torch.Tensor  # (B,) bool
    formatted: torch.Tensor  # (B,) bool
    group_size: int
    times: dict
    # multi-turn episodes (task.env): each turn's reward on the last token of its policy turn (B, T), and the
    # episodes' metrics (env/*)
    token_rewards: torch.Tensor | None = None
    metrics: dict | None = None

    def __len__(self) -> int:
        return len(self.rollout)


def _mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def batch_metrics(batch: Batch, accelerator=None) -> dict[str, Any]:
    """``reward/*`` and ``length/*`` metrics of a scored batch; with the ``accelerator`` of a run in several
    processes, of the whole step (every process's share of the prompts gathered first).

    ``reward/groups_mixed`` is the fraction of groups with both correct and incorrect responses (the groups that
    give group-relative methods a signal); ``reward/frac_zero_std`` the fraction whose rewards all agree (TRL's
    ``frac_reward_zero_std``: no group-relative gradient); ``length/*`` count response tokens, EOS included.
    ``reward/<name>`` is the mean of each named part of the reward (the dataset task's reward functions).
    ``logp/positive`` and ``logp/negative`` are the mean per-token log-likelihood of the correct and the incorrect
    responses under the policy that sampled them (the sampler's log-probs): which of the two an update pushes.
    """
    names = list(dict.fromkeys(n for sc in batch.scores for n in (getattr(sc, "parts", None) or {})))  # several
    # reward functions (the dataset task, an environment's rubric); a score without a part counts 0 for it
    mask = batch.rollout.response_mask.float()
    row_logp = (batch.rollout.logprobs.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    part = {"rewards": batch.rewards.tolist(), "correct": batch.correct.tolist(),
            "formatted": batch.formatted.tolist(), "lengths": batch.rollout.lengths.tolist(),
            "truncated": batch.rollout.truncated.tolist(), "logp": row_logp.tolist(),
            **{f"reward/{n}": [float((sc.parts or {}).get(n) or 0.0) for sc in batch.scores] for n in names}}
    cols = {k: [x for p in gather_parts(accelerator, part) for x in p[k]] for k in part}
    rewards = torch.tensor(cols["rewards"], dtype=torch.float32)
    lengths = torch.tensor(cols["lengths"], dtype=torch.float32)
    correct = torch.tensor(cols["correct"], dtype=torch.bool)
    by_group = correct.view(-1, batch.group_size).float().mean(dim=1)
    grouped = rewards.view(-1, batch.group_size)
    logp = torch.tensor(cols["logp"], dtype=torch.float32)
    named = {f"reward/{n}": _mean(torch.tensor(cols[f"reward/{n}"])) for n in names}  # each one's mean
    return {**(batch.metrics or {}), **named,
        "reward/mean": _mean(rewards),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "reward/accuracy": _mean(correct),
        "reward/format": _mean(torch.tensor(cols["formatted"], dtype=torch.bool)),
        "reward/groups_mixed": _mean((by_group > 0) & (by_group < 1)),
        "reward/frac_zero_std": _mean((grouped == grouped[:, :1]).all(dim=1)),
        "logp/positive": _mean(logp[correct]),
        "logp/negative": _mean(logp[~correct]),
        "length/mean": _mean(lengths),
        "length/correct": _mean(lengths[correct]),
        "length/incorrect": _mean(lengths[~correct]),
        "length/truncated": _mean(torch.tensor(cols["truncated"], dtype=torch.bool)),
    }


def base_kl_metrics(learner, batch: Batch, step: int) -> dict[str, float]:
    """``run.kl_to_base``: ``policy/kl_base``, the mean over the step's response tokens of ``log pi_old - log
    pi_base`` (the sampler's log-probs against the start model's: an unbiased per-token estimate of KL(pi_old ||
    base), on the samples of ``pi_old``), and ``policy/kl_base_k3`` (the non-negative k3 estimator of the same KL).
    A hook before the update (``on_batch``), whatever the algorithm; over several processes the mean of their
    means; nothing for offline DPO pairs (no sampler)."""
    if batch is None:
        return {}
    ro = batch.rollout
    ref = learner.reference_logprobs(ro)
    mask = ro.response_mask.bool()
    if ref is None or not mask.any():
        return {}
    diff = (ro.logprobs.float() - ref.float())[mask]
    return reduce_over_processes(learner.accelerator, {"policy/kl_base": float(diff.mean()),
                                                       "policy/kl_base_k3": float((torch.expm1(-diff) + diff).mean())})


def sample_rows(batch: Batch, *, step: int, algo: str, seed: int, accelerator=None) -> dict[str, list]:
    """The batch as columns of ``samples.parquet`` (``group`` = index of the prompt within the step); with the
    ``accelerator`` of a run in several processes, the rows of every process (process ``r`` holds the prompts
    ``r, r + n, r + 2n, ...`` of the step, see :func:`tokenmdp.train.trainer.run_step`)."""
    n = len(batch)
    part = {
        "prompt": list(batch.rollout.prompts),
        "completion": list(batch.rollout.responses),
        "reward": [float(s.reward) for s in batch.scores],
        "correct": [bool(s.correct) for s in batch.scores],
        "length": [int(x) for x in batch.rollout.lengths.tolist()],
        "step": [step] * n,
        "group": [i // batch.group_size for i in range(n)],
        "algo": [algo] * n,
        "seed": [seed] * n,
    }
    parts = gather_parts(accelerator, part)
    for rank, p in enumerate(parts):
        p["group"] = [g * len(parts) + rank for g in p["group"]]
    return {k: [x for p in parts for x in p[k]] for k in part}


def _token_end(tokenizer, ids: list[int], char_end: int) -> int:
    """Index of the first token whose decoded prefix reaches ``char_end`` characters (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= char_end:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def step_rewards(task, tokenizer, batch: Batch, *, step_reward: float) -> torch.Tensor:
    """(B, T) process rewards: ``+step_reward`` on the token ending each correct step of the task's step verifier,
    ``-step_reward`` on the token ending each wrong one (for ``credit="process"``)."""
    ro = batch.rollout
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32)
    lengths = ro.lengths.tolist()
    for i, (problem, text) in enumerate(zip(batch.problems, ro.responses)):
        ids = ro.response_ids[i, : lengths[i]].tolist()
        for s in task.score_steps(problem, text):
            if ids:
                t = _token_end(tokenizer, ids, s.end)
                out[i, t] += step_reward if s.correct else -step_reward
    return out.to(ro.response_ids.device)
