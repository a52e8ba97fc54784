"""Periodic held-out evaluation, as seen from the training loop.

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

from tokenmdp.train.heldout import evaluate
from tokenmdp.train.sharding import full_weights

EVAL_SEED = 0  # the held-out problems are the same for every run (any algorithm, any seed)


def eval_problems(task, config) -> list:
    """The fixed held-out problems: ``run.eval_n`` problems of ``task.eval_split`` (seed 0) of ``config``."""
    return task.problems(config.task.eval_split, n=config.run.eval_n, seed=EVAL_SEED)


def held_out(learner, rollouts, run, problems: list, *, step: int) -> dict:
    """Evaluate the learner's current policy on ``problems`` with the run's engine, template and environment
    (``rollouts``, a :class:`tokenmdp.train.trainer.Rollouts`) and the ``run`` section's evaluation settings;
    returns ``eval/*`` metrics."""
    t0 = time.perf_counter()
    with full_weights(learner.fsdp):  # a sharded policy is whole while it samples
        result = evaluate(
            learner.unwrapped(), rollouts.tokenizer, rollouts.task, problems, k=run.eval_k, engine=rollouts.engine,
            temperature=run.eval_temperature, max_new_tokens=rollouts.max_new_tokens, greedy=run.eval_greedy,
            seed=run.seed * 1_000 + 17, template=rollouts.template, chat=rollouts.chat_template,
            env=rollouts.env,
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
