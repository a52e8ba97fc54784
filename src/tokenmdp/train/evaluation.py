"""Periodic held-out evaluation and the equivalence diagnostic, as seen from the training loop.

The evaluation itself is :func:`tokenmdp.train.heldout.evaluate` (the same code that evaluates final
checkpoints), run on the run's engine; the trainer logs its figures under ``eval/``:
``eval/accuracy`` (greedy pass@1 when ``run.eval_greedy``, else sampled pass@1), ``eval/sampled_accuracy``
(mean over problems of the fraction of ``run.eval_k`` samples that are correct), ``eval/pass@k``,
``eval/format_rate`` and ``eval/length_correct`` / ``eval/length_incorrect``. With a multi-turn environment
(``task.env``) every evaluation is an episode of the policy with it (the two-LLM formulation: the base's answer
after the policy's hint), scored by the environment.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from tokenmdp.train.batch import TrainBatch
from tokenmdp.train.equivalence import gradient_cosines
from tokenmdp.train.heldout import evaluate
from tokenmdp.train.sharding import full_weights

if TYPE_CHECKING:
    from tokenmdp.train.setup import Components

EVAL_SEED = 0  # the held-out problems are the same for every run (any algorithm, any seed)


def eval_problems(c: Components) -> list:
    """The fixed held-out problems: ``run.eval_n`` problems of ``task.eval_split`` (seed 0)."""
    return c.task.problems(c.config.task.eval_split, n=c.config.run.eval_n, seed=EVAL_SEED)


def held_out(c: Components, problems: list, *, step: int) -> dict:
    """Evaluate the current policy on ``problems``; returns ``eval/*`` metrics."""
    run = c.config.run
    t0 = time.perf_counter()
    with full_weights(c.fsdp):  # a sharded policy is whole while it samples
        result = evaluate(
                c.unwrapped(), c.tokenizer, c.task, problems, k=run.eval_k, engine=c.engine,
            temperature=run.eval_temperature, max_new_tokens=c.settings.max_new_tokens, greedy=run.eval_greedy,
            seed=run.seed * 1_000 + 17, template=c.settings.template, chat=c.config.task.chat_template,
            env=c.env,
        )
    m = result["metrics"]
    out = {
        "eval/sampled_accuracy": m.get("sampled/pass@1"),
        "eval/pass@k": m.get("pass@k"),
        "eval/format_rate": m.get("sampled/format_rate"),
        "eval/length_correct": m.get("sampled/length_correct"),
        "eval/length_incorrect": m.get("sampled/length_incorrect"),
        "time/eval": time.perf_counter() - t0,
    }
    if run.eval_greedy:
        out["eval/greedy_accuracy"] = m.get("greedy/pass@1")
    out["eval/accuracy"] = out.get("eval/greedy_accuracy", out["eval/sampled_accuracy"])
    return out


def equivalence(c: Components, tb: TrainBatch) -> dict:
    """``equiv/*`` metrics (:func:`tokenmdp.train.equivalence.gradient_cosines`) on the first
    ``optim.micro_batch_size`` rows of the batch, before the update, for group or baseline policy gradients (with
    ``algo.returns="to_go"`` against their per-token advantages; not for a critic's GAE)."""
    spec = c.spec
    if spec.kind != "pg" or spec.advantage == "gae":
        return {}
    t = tb.select(torch.arange(min(len(tb), c.config.optim.micro_batch_size)))
    sub = t.rollout
    data = {"prompt_ids": sub.prompt_ids, "prompt_mask": sub.prompt_mask, "response_ids": sub.response_ids,
            "response_mask": sub.response_mask, "old_logprobs": t.old_logprobs, "ref_logprobs": t.ref_logprobs,
            "observation_mask": sub.observation_mask}
    # a constant divisor does not change a cosine: seq_sum_const points where seq_mean_token_sum does
    aggregation = "seq_mean_token_sum" if spec.aggregation == "seq_sum_const" else spec.aggregation
    t0 = time.perf_counter()
    with c.accelerator.autocast():
        out = gradient_cosines(
            c.unwrapped(), data, t.advantages[:, 0] if spec.returns == "sequence" else t.advantages, clip_low=spec.clip_low, clip_high=spec.clip_high,
            kl_coef=spec.loss_kl_coef, kl_estimator=spec.kl_estimator,
            temperature=c.config.rollout.temperature or 1.0, aggregation=aggregation,
        )
    out["time/equiv"] = time.perf_counter() - t0
    return out
