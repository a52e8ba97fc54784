"""Policy-gradient update time with and without skipping zero-advantage rows, side by side, in one run.

GRPO gives advantage 0 to every row of a group whose rewards are all equal (all right or all wrong); with no KL
term in the loss, no entropy bonus and no critic such rows add exactly nothing to the gradient, and
``optim.skip_zero_advantage`` (off by default) leaves them out of the forward and backward passes (module
:class:`tokenmdp.train.algorithms.PolicyGradient`). This script rolls out one GRPO batch (``--prompts`` x
``--group`` Countdown samples) on
the embedded tiny base model (built into the cache first when absent: a few minutes), sets the rewards of a
fraction ``--uniform`` of the groups to all-equal, and times the same update with the skip off and on, alternating,
best of ``--repeats``, from the same parameters and optimizer state each time. It prints both times, their ratio,
and the largest parameter difference between the two results (float summation order only).

    .venv/bin/python benchmarks/bench_update.py [--uniform 0.5] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenmdp.train.config import load_config  # noqa: E402
from tokenmdp.train.data import prompt_stream  # noqa: E402
from tokenmdp.train.trainer import build_step  # noqa: E402


def _model_path() -> tuple[str, str]:
    from tokenmdp.base.store import ensure_tiny_base

    path = ensure_tiny_base(progress=True)
    return str(path), f"tiny base model ({path})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--uniform", type=float, default=0.5, help="fraction of groups given all-equal rewards")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path, desc = _model_path()
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(None, [f"model.path={path}", "algo.name=grpo", "algo.kl_coef=0", f"run.out={tmp / 'run'}",
                             f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
                             f"run.threads={args.threads}"])
    learner, algorithm, rollouts = build_step(cfg, tmp / "run")
    torch.set_num_threads(args.threads)
    batch = rollouts.collect(prompt_stream(rollouts.task, seed=0, steps=1, prompts_per_step=args.prompts)[0], step=1)
    n_uniform = round(args.uniform * args.prompts)
    batch.rewards[: n_uniform * args.group] = 1.0
    start_model = copy.deepcopy(learner.model.state_dict())
    start_opt = copy.deepcopy(learner.optimizer.state_dict())
    times: dict[bool, float] = {False: float("inf"), True: float("inf")}
    params: dict[bool, dict] = {}
    skipped = 0.0
    for _ in range(args.repeats):
        for skip in (False, True):
            learner.model.load_state_dict(start_model)
            learner.optimizer.load_state_dict(start_opt)
            algorithm.skip_zero_advantage = skip
            t0 = time.perf_counter()
            metrics = algorithm.update(learner, batch, step=1)
            times[skip] = min(times[skip], time.perf_counter() - t0)
            params[skip] = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
            skipped = metrics["update/skipped_rows"] if skip else skipped
    diff = max(float((params[True][k] - params[False][k]).abs().max()) for k in params[False])
    out = {"model": desc, "rows": len(batch), "uniform_groups": n_uniform, "skipped_rows": skipped,
           "tokens": int(batch.rollout.response_mask.sum()), "threads": args.threads,
           "update_s_all_rows": round(times[False], 3), "update_s_skip": round(times[True], 3),
           "speedup": round(times[False] / times[True], 2), "max_param_diff": diff}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"model: {desc}")
    print(f"batch: {len(batch)} rows ({args.prompts} prompts x {args.group}), {n_uniform} groups all-equal "
          f"({int(skipped)} rows skipped), {out['tokens']} response tokens, {args.threads} thread(s)")
    print(f"update, every row:        {times[False]:.3f} s")
    print(f"update, zero-adv skipped: {times[True]:.3f} s   ({out['speedup']:.2f}x)")
    print(f"largest parameter difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
