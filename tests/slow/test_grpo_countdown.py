"""GRPO on the embedded tiny base model raises held-out sampled Countdown accuracy (the trainer issue's `slow` test).

The base model is the default one (built into the cache on first use, a few minutes); the held-out problems are
the first ``HELDOUT`` of the test split, whose number sets never occur in training. Accuracy is sampled pass@1 at
temperature 1 over ``K`` samples per problem (within the model folder's ``max_new_tokens``, the training runs'
budget), before and after ``STEPS`` GRPO steps of ``PROMPTS`` prompts x 8 samples on the train split (the grpo
preset: group std, per-sequence token mean, clip 0.2; without its KL term, as in Dr. GRPO and DAPO: the reference
model's forward pass would take a quarter of each step), AdamW at ``LR`` after ``WARMUP`` warmup steps, one torch
thread. The CPU time of the training is printed: the issue's budget is 10 minutes.

Measured (held-out draw: ``HELDOUT`` problems x ``K`` samples; the figures move by one or two points between
draws, see below):

* 2026-11-22, 2-core development machine, 300 x 4: 22.0% -> 30.3% (+8.3 points) in 9.4 CPU minutes. The same
  training inside the long comparison of the README: +10.2 points on 500 x 4.
* 2026-12-01, a 2-core machine 2.3x slower (the base model's build took 899 s instead of 384 s): this test,
  500 x 8: 22.9% -> 28.4% (+5.5 points) in 24.3 CPU minutes (27.6 min wall, the other core busy). A run with
  an evaluation every 20 steps on 300 x 4: 20.9% -> 22.9 / 25.8 / 26.8 / 28.2 / 27.5 / 27.0% at steps 20 ...
  120 (+6.1).

* 2026-12-01, the same slower machine, after the prompt stream kept a cycled split's first epoch in the task's
  order (``tokenmdp.train.data.prompt_stream``; 120 x 32 prompts cycle the 2,233 train problems): this test,
  500 x 8, 22.9% -> 33.1% (+10.2), and with ``run.seed`` 1 and 2 -> 32.4% (+9.5) and 29.4% (+6.5), 23.5 CPU
  minutes each (two runs side by side). Mean +8.7 over the three seeds. The same prefix of the seed-0 run with an
  evaluation every 10 steps (300 x 4, base 20.9%): 23.2 / 25.1 / 25.3 / 25.3% at steps 10 ... 40.

A base pretrained on give-up traces (``tokenmdp pretrain --give-up 0.4 --max-failures 8``) gained +8.6 to +10.5
points at steps 80-120 from 13.3%, below the base model's band (benchmarks/RESULTS.md, "Other trace kinds").

* 2026-12-02, with both cores (``LEVERS``: the prompt once per group, one-step-off rollouts in a second process):
  32.95% -> 41.35% (+8.4 points, 500 x 8; the shipped base model), 120 steps in 9.7 min wall, 4.70 s a step.

So the effect is +6.5 to +10 points over seeds and machines, short of the issue's +10 for a robust test, and it
takes the 120 steps (9.4 CPU minutes on the first machine, 23.5 here): at 40 steps (about 8 CPU minutes here)
it is +4.4. The assertion asks for +3, which a run that does not learn (about +0, with a sampling noise near one
point on 500 x 8) fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tokenmdp.base.store import ensure_tiny_base
from tokenmdp.policy.model import load_policy, read_meta
from tokenmdp.tasks import get_task
from tokenmdp.train.config import load_config
from tokenmdp.train.heldout import evaluate
from tokenmdp.train.trainer import train

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "grpo.yaml"
HELDOUT, K = 500, 8
STEPS, PROMPTS, LR, WARMUP = 120, 32, 2e-4, 10
# both cores: the prompt once per group, and rollouts overlapped with updates (the batch of step t sampled in a
# second process with the weights after step t-2, truncated importance sampling); 2026-12-02 on this 2-core
# machine: 120 steps in 9.7 min wall, 32.95% -> 41.35% (+8.4 points, 500 x 8), 4.70 s a step (median)
LEVERS = ("optim.shared_prompt=true", "rollout.max_staleness=1")


def _sampled_accuracy(model_dir, task, problems, meta) -> float:
    result = evaluate(load_policy(str(model_dir)), None, task, problems, k=K, greedy=False, temperature=1.0,
                      max_new_tokens=meta["max_new_tokens"], seed=11, template=meta["template"])
    return result["metrics"]["sampled/pass@1"]


def test_grpo_raises_heldout_countdown_accuracy(tmp_path):
    base = ensure_tiny_base(progress=False)
    meta = read_meta(base)
    task = get_task("countdown", **meta["task_kwargs"])
    problems = task.problems("test", n=HELDOUT, seed=0)
    before = _sampled_accuracy(base, task, problems, meta)
    config = load_config(CONFIG, [
        f"model.path={base}", f"rollout.prompts_per_step={PROMPTS}", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}",
        "algo.kl_coef=0", f"run.steps={STEPS}",
        "run.eval_every=0", "run.save_every=0", "run.seed=0", "run.threads=1", "run.log_samples=false",
        f"run.out={tmp_path / 'grpo'}", *LEVERS,
    ])
    threads = torch.get_num_threads()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        run = train(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    after = _sampled_accuracy(run / "final", task, problems, meta)
    curve = [json.loads(line)["reward/accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    tenth = max(1, len(curve) // 10)
    print(f"\ngrpo on the tiny base: held-out sampled accuracy {before:.3f} -> {after:.3f} ({HELDOUT} problems x {K}); "
          f"training {STEPS} steps x {PROMPTS * 8} samples: {cpu / 60:.1f} CPU min, {wall / 60:.1f} min wall; "
          f"train accuracy first/last tenth {sum(curve[:tenth]) / tenth:.3f} / {sum(curve[-tenth:]) / tenth:.3f}")
    assert 0.15 <= before <= 0.60, before
    assert after - before >= 0.03, (before, after)
