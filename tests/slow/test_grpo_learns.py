"""Runs that must actually learn: the whole on-policy loop (rollout, verifier, advantages, update) raises held-out
accuracy on a task whose reward a model can learn in a few dozen steps.

The task: the completion must start with a decimal digit. A random tiny Qwen2 (character vocabulary of 98
symbols, 10 of them digits) starts near 10%, so most groups of 8 are all wrong or hold one right answer: the
group-relative methods only learn from the few mixed groups, as on a real verifier.
"""

from __future__ import annotations

import json

import pytest
import torch

from tokenmdp.tasks import Problem, Score, Task
from tokenmdp.tasks.registry import register_task
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

pytestmark = pytest.mark.slow


class LeadingDigitTask(Task):
    """Reward 1 when the completion starts with a digit 0-9, else 0."""

    name = "leading_digit"
    templates = ("plain",)

    def problems(self, split="train", n=None, seed=0):
        g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        n = 500 if n is None else n
        words = torch.randint(0, 10_000, (n,), generator=g).tolist()
        return [Problem(id=f"{split}-{i}", question=f"w{x}", answer=None) for i, x in enumerate(words)]

    def render(self, problem, template=None):
        return f"{problem.question}>"

    def score(self, problem, completion):
        ok = bool(completion) and completion[0] in "0123456789"
        return Score(reward=1.0 if ok else 0.0, correct=ok, formatted=True, reason="leading digit")


register_task("leading_digit", LeadingDigitTask)


def _heldout_accuracy(run_or_model_dir, n=200, k=4) -> float:
    from tokenmdp.policy.model import load_policy
    from tokenmdp.train.heldout import evaluate

    policy = load_policy(str(run_or_model_dir))
    task = LeadingDigitTask()
    result = evaluate(policy, None, task, task.problems("test", n=n, seed=0), k=k, greedy=False, temperature=1.0,
                      max_new_tokens=4, seed=7)
    return result["metrics"]["sampled/pass@1"]


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo", "isft+"])
def test_algorithm_raises_heldout_accuracy(tmp_path, tiny_random_dir, algo):
    before = _heldout_accuracy(tiny_random_dir)
    config = load_config(None, [
        f"model.path={tiny_random_dir}", "task.name=leading_digit", f"algo.name={algo}", "algo.kl_coef=0.0",
        "rollout.prompts_per_step=16", "rollout.group_size=8", "rollout.max_new_tokens=4", "optim.lr=3e-3",
        "run.steps=25", "run.save_every=0", "run.seed=0", "run.threads=1", f"run.out={tmp_path / algo}",
    ])
    run = train(config, progress=False)
    after = _heldout_accuracy(run / "final")
    curve = [json.loads(line)["reward/accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{algo}: held-out sampled accuracy {before:.3f} -> {after:.3f}; train accuracy by step "
          f"{[round(x, 2) for x in curve]}")
    assert before < 0.25
    assert after - before >= 0.40, (before, after, curve)
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5 + 0.3  # the learning curve moves
