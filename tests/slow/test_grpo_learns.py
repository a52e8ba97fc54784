"""GRPO on the embedded tiny base model raises held-out sampled Countdown accuracy by at least 10 points within
10 minutes of CPU time (the base model is found in, or built into, the tokenmdp cache first; that is not timed)."""

from __future__ import annotations

import json
import time

import pytest

from tokenmdp.experiments.evaluate import evaluate
from tokenmdp.policy.model import load_policy
from tokenmdp.policy.tiny import ensure_tiny_base
from tokenmdp.tasks import get_task
from tokenmdp.train.config import load_config
from tokenmdp.train.setup import model_meta
from tokenmdp.train.trainer import train

pytestmark = pytest.mark.slow

HELD_OUT = 200  # test-split problems, never trained on
SAMPLES = 4  # sampled completions per problem at temperature 1: sampled accuracy over 800 completions
SETTINGS = [
    "algo.name=grpo",
    "algo.kl_coef=0.0",
    "rollout.prompts_per_step=16",
    "rollout.group_size=8",
    "optim.lr=1e-3",
    "run.steps=40",
    "run.save_every=0",
    "run.seed=0",
    "run.threads=2",
]


def _sampled_accuracy(model_dir, task, problems, template, max_new_tokens) -> float:
    policy = load_policy(str(model_dir))
    result = evaluate(policy, None, task, problems, k=SAMPLES, greedy=False, temperature=1.0,
                      max_new_tokens=max_new_tokens, seed=1234, template=template)
    return result["metrics"]["sampled/pass@1"]


def test_grpo_raises_heldout_sampled_accuracy(tmp_path):
    base = ensure_tiny_base(progress=False)
    meta = model_meta(base)
    task = get_task("countdown", **meta.get("task_kwargs", {}))
    problems = task.problems("test", n=HELD_OUT, seed=0)
    before = _sampled_accuracy(base, task, problems, meta["template"], meta["max_new_tokens"])

    config = load_config(None, [f"model.path={base}", f"run.out={tmp_path / 'grpo'}", *SETTINGS])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    run = train(config, progress=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    after = _sampled_accuracy(run / "final", task, problems, meta["template"], meta["max_new_tokens"])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"\nsampled accuracy {before:.3f} -> {after:.3f} (+{100 * (after - before):.1f} points); training "
          f"{cpu:.0f} s CPU, {wall:.0f} s wall, {len(records)} steps; train reward/accuracy "
          f"{records[0]['reward/accuracy']:.3f} -> {records[-1]['reward/accuracy']:.3f}")
    assert cpu < 600, f"training took {cpu:.0f} s of CPU time"
    assert after - before >= 0.10, f"held-out sampled accuracy {before:.3f} -> {after:.3f}"
