"""One step's experience, from the rollout to the loss, in three forms:

1. :class:`~tokenmdp.rollout.base.Rollout` (the engine's): token ids, masks, behaviour ``logprobs``, texts;
2. :class:`Batch` (:func:`collect`): the rollout of ``B = prompts x G`` rows (groups contiguous) with its problems,
   the verifier's scores and ``rewards`` / ``correct`` / ``formatted``; its metrics are the run's ``reward/*`` and
   ``length/*`` keys, its rows go to ``samples.parquet``;
3. :class:`TrainBatch` (the update's ``prepare``): what the loss reads, under the glossary's names
   (``old_logprobs``, ``ref_logprobs``, ``advantages``, ``values``, ``returns``); micro-batches are its
   :meth:`TrainBatch.select`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenmdp.policy.model import chat_prompt
from tokenmdp.rollout.types import Rollout

if TYPE_CHECKING:
    from tokenmdp.train.setup import Components


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


@dataclass
class TrainBatch:
    """The per-row tensors of an update (DESIGN.md's glossary; ``(B, T)`` unless noted), built once a step from a
    :class:`Batch`. Tensors an algorithm does not use are None."""

    rollout: Rollout
    old_logprobs: torch.Tensor | None  # behaviour log-probs (the engine's, or recomputed); None: the loss's own
    # forward gives the anchor (a stale batch, tokenmdp.train.pg.anchor_in_pass)
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    correct: torch.Tensor | None = None  # (B,) the verifier's verdicts (filtered SFT)
    is_weights: torch.Tensor | None = None  # truncated importance weights of a stale batch (rollout.max_staleness)

    def __len__(self) -> int:
        return len(self.rollout)

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The rows ``rows`` (trimmed of all-padding response columns, every ``(B, T)`` tensor cut to match)."""
        sub = self.rollout.select(rows.to(self.rollout.device)).trimmed()
        width = sub.response_ids.shape[1]

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.index_select(0, rows.to(t.device))
            return t[:, :width] if t.dim() == 2 else t

        return TrainBatch(rollout=sub, old_logprobs=cut(self.old_logprobs), advantages=cut(self.advantages),
                          ref_logprobs=cut(self.ref_logprobs), values=cut(self.values), returns=cut(self.returns),
                          correct=cut(self.correct), is_weights=cut(self.is_weights))


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of training step ``step`` (1-based): a function of the run seed and the step only."""
    return (int(seed) * 1_000_003 + int(step) * 7_919) % (2**31 - 1)


def render_prompts(c: Components, problems: list) -> list[str]:
    """The prompt text of each problem (the task's template, wrapped in the chat template when asked)."""
    prompts = [c.task.render(p, template=c.settings.template) for p in problems]
    if c.config.task.chat_template:
        prompts = [chat_prompt(c.tokenizer, text) for text in prompts]
    return prompts


def sampling_args(c: Components, step: int) -> dict:
    """The keyword arguments of ``engine.generate`` for training step ``step`` (its seed included)."""
    cfg = c.config.rollout
    return dict(n=cfg.group_size, max_new_tokens=c.settings.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, seed=step_seed(c.config.run.seed, step))


def score(c: Components, problems: list, rollout: Rollout, times: dict) -> Batch:
    """Score every response of ``rollout`` (sampled for ``problems``, ``G`` rows each) with the task's verifier;
    ``times`` gets the scoring time as ``time/score``."""
    group = c.config.rollout.group_size
    t1 = time.perf_counter()
    rows = [p for p in problems for _ in range(group)]
    scores = [c.task.score(p, text) for p, text in zip(rows, rollout.responses)]
    t2 = time.perf_counter()
    return Batch(
        rollout=rollout,
        problems=rows,
        scores=scores,
        rewards=torch.tensor([s.reward for s in scores], dtype=torch.float32, device=c.device),
        correct=torch.tensor([s.correct for s in scores], dtype=torch.bool, device=c.device),
        formatted=torch.tensor([s.formatted for s in scores], dtype=torch.bool, device=c.device),
        group_size=group,
        times={**times, "time/score": t2 - t1},
    )


def collect(c: Components, problems: list, *, step: int) -> Batch:
    """Render ``problems``, sample ``G`` responses each with the run's engine, and score every response (with a
    multi-turn environment, ``task.env``: run ``G`` episodes each, :func:`collect_episodes`)."""
    if c.env is not None:
        return collect_episodes(c, problems, step=step)
    t0 = time.perf_counter()
    rollout = c.engine.generate(render_prompts(c, problems), **sampling_args(c, step)).to(c.device)
    return score(c, problems, rollout, {"time/rollout": time.perf_counter() - t0})


def collect_episodes(c: Components, problems: list, *, step: int) -> Batch:
    """``G`` episodes of the run's environment for each problem (:func:`tokenmdp.rollout.multiturn.run_episodes`):
    the rewards are the environment's (each row's return), the scores its final ``info["score"]`` (an episode cut
    by a limit before any score: its return, not correct, not formatted), the per-turn token rewards kept for the
    credit assignment (:func:`tokenmdp.train.pg.prepare`)."""
    from tokenmdp.rollout.multiturn import run_episodes
    from tokenmdp.tasks.task import Score

    env, args = c.env, sampling_args(c, step)
    t0 = time.perf_counter()
    env.begin(args["seed"])
    ep = run_episodes(c.engine, c.tokenizer, env.make_env, problems, render_prompts(c, problems),
                      group_size=args["n"], limits=env.limits, temperature=args["temperature"], top_p=args["top_p"],
                      top_k=args["top_k"], seed=args["seed"])
    t1 = time.perf_counter()
    rows = [p for p in problems for _ in range(args["n"])]
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
        rollout=ep.rollout.to(c.device), problems=rows, scores=scores,
        rewards=ep.rewards.to(c.device),
        correct=torch.tensor([bool(s.correct) for s in scores], dtype=torch.bool, device=c.device),
        formatted=torch.tensor([bool(s.formatted) for s in scores], dtype=torch.bool, device=c.device),
        group_size=args["n"], times={"time/rollout": t1 - t0, "time/score": 0.0},
        token_rewards=ep.token_rewards.to(c.device), metrics=metrics,
    )


def _mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def gather_parts(c: Components | None, part: dict[str, list]) -> list[dict[str, list]]:
    """``part`` of every process, in process order (just ``[part]`` in a single process)."""
    acc = None if c is None else c.accelerator
    if acc is None or acc.num_processes <= 1:
        return [part]
    from accelerate.utils import gather_object

    return gather_object([part])


def total_over_processes(c: Components, count: int) -> int:
    """``count`` summed over the run's processes (``count`` itself in a single process)."""
    return int(sum(p["n"] for p in gather_parts(c, {"n": int(count)})))


#: Update metrics that add up over processes (each process counts its own rows); ``*_min`` / ``*_max`` keep the
#: extreme; every other metric is averaged over processes.
SUMMED_OVER_PROCESSES = ("update/rows", "update/skipped_rows", "dpo/pairs")


def reduce_over_processes(c: Components, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` of this process's share of a step combined with those of the other processes (unchanged in a
    single process): sums for :data:`SUMMED_OVER_PROCESSES`, min / max for ``*_min`` / ``*_max``, else means."""
    parts = gather_parts(c, metrics)
    if len(parts) == 1:
        return metrics
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [p[key] for p in parts if isinstance(p.get(key), (int, float))]
        if not values:
            out[key] = None
        elif key in SUMMED_OVER_PROCESSES:
            out[key] = float(sum(values))
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def batch_metrics(batch: Batch, c: Components | None = None) -> dict[str, Any]:
    """``reward/*`` and ``length/*`` metrics of a scored batch; with components ``c`` of a run in several
    processes, of the whole step (every process's share of the prompts gathered first).

    ``reward/groups_mixed`` is the fraction of groups with both correct and incorrect responses (the groups that
    give group-relative methods a signal); ``length/*`` count response tokens, EOS included.
    """
    part = {"rewards": batch.rewards.tolist(), "correct": batch.correct.tolist(),
            "formatted": batch.formatted.tolist(), "lengths": batch.rollout.lengths.tolist(),
            "truncated": batch.rollout.truncated.tolist()}
    cols = {k: [x for p in gather_parts(c, part) for x in p[k]] for k in part}
    rewards = torch.tensor(cols["rewards"], dtype=torch.float32)
    lengths = torch.tensor(cols["lengths"], dtype=torch.float32)
    correct = torch.tensor(cols["correct"], dtype=torch.bool)
    by_group = correct.view(-1, batch.group_size).float().mean(dim=1)
    return {**(batch.metrics or {}),
        "reward/mean": _mean(rewards),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "reward/accuracy": _mean(correct),
        "reward/format": _mean(torch.tensor(cols["formatted"], dtype=torch.bool)),
        "reward/groups_mixed": _mean((by_group > 0) & (by_group < 1)),
        "length/mean": _mean(lengths),
        "length/correct": _mean(lengths[correct]),
        "length/incorrect": _mean(lengths[~correct]),
        "length/truncated": _mean(torch.tensor(cols["truncated"], dtype=torch.bool)),
    }


def sample_rows(batch: Batch, *, step: int, algo: str, seed: int, c: Components | None = None) -> dict[str, list]:
    """The batch as columns of ``samples.parquet`` (``group`` = index of the prompt within the step); with
    components ``c`` of a run in several processes, the rows of every process (process ``r`` holds the prompts
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
    parts = gather_parts(c, part)
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


def step_rewards(c: Components, batch: Batch, *, step_reward: float) -> torch.Tensor:
    """(B, T) process rewards: ``+step_reward`` on the token ending each correct step of the task's step verifier,
    ``-step_reward`` on the token ending each wrong one (for ``credit="process"``)."""
    ro = batch.rollout
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32)
    lengths = ro.lengths.tolist()
    for i, (problem, text) in enumerate(zip(batch.problems, ro.responses)):
        ids = ro.response_ids[i, : lengths[i]].tolist()
        for s in c.task.score_steps(problem, text):
            if ids:
                t = _token_end(c.tokenizer, ids, s.end)
                out[i, t] += step_reward if s.correct else -step_reward
    return out.to(ro.response_ids.device)
