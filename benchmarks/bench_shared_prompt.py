"""Update time with each group's prompt run once (``optim.shared_prompt``) and without, side by side, in one run.

The ``G`` responses of a group share their prompt; with ``optim.shared_prompt`` the update's forward and backward
passes (and the reference model's log-probs) run each distinct prompt once and the responses on its KV cache
(module :mod:`tokenmdp.policy.shared_prompt`), instead of the prompt once per row. This script rolls out one batch
(``--prompts`` x ``--group`` Countdown samples, the training defaults) on the embedded tiny base model, and times
the same update with the switch off and on, alternating, best of ``--repeats``, from the same parameters and
optimizer state each time. It prints both times, their ratio, the prompt and response token counts, and the
largest parameter difference between the two results (float summation order only).

    .venv/bin/python benchmarks/bench_shared_prompt.py [--algo grpo] [--micro 16] [--threads 1] [--json]
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


def _time_updates(learner, algorithm, batch, repeats: int) -> tuple[dict[bool, float], float]:
    """Best-of-``repeats`` update time with the switch off and on, and the largest parameter difference."""
    pairs = [(learner.model, learner.optimizer)] + (
        [(learner.critic, learner.critic_optimizer)] if learner.critic is not None else [])
    start = [(copy.deepcopy(m.state_dict()), copy.deepcopy(o.state_dict())) for m, o in pairs]
    times: dict[bool, float] = {False: float("inf"), True: float("inf")}
    params: dict[bool, dict] = {}
    for _ in range(repeats):
        for shared in (False, True):
            for (model, opt), (m_state, o_state) in zip(pairs, start):
                model.load_state_dict(m_state)
                opt.load_state_dict(o_state)
            learner.shared_prompt = shared
            t0 = time.perf_counter()
            algorithm.update(learner, batch, step=1)
            times[shared] = min(times[shared], time.perf_counter() - t0)
            params[shared] = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    diff = max(float((params[True][k] - params[False][k]).abs().max()) for k in params[False])
    return times, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--micro", type=int, default=16, help="optim.micro_batch_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path, desc = _model_path()
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(None, [f"model.path={path}", f"algo.name={args.algo}", f"run.out={tmp / 'run'}",
                             f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
                             f"optim.micro_batch_size={args.micro}", f"run.threads={args.threads}"])
    learner, algorithm, rollouts = build_step(cfg, tmp / "run")
    torch.set_num_threads(args.threads)
    batch = rollouts.collect(prompt_stream(rollouts.task, seed=0, steps=1, prompts_per_step=args.prompts)[0], step=1)
    times, diff = _time_updates(learner, algorithm, batch, args.repeats)
    ro = batch.rollout
    out = {"model": desc, "algo": args.algo, "rows": len(batch), "micro_batch_size": args.micro,
           "prompt_tokens": int(ro.prompt_mask.sum()), "response_tokens": int(ro.response_mask.sum()),
           "threads": args.threads, "update_s_padded": round(times[False], 3),
           "update_s_shared": round(times[True], 3), "speedup": round(times[False] / times[True], 2),
           "max_param_diff": diff}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"model: {desc}")
    print(f"batch: {len(batch)} rows ({args.prompts} prompts x {args.group}), {args.algo}, micro-batches of "
          f"{args.micro}; {out['prompt_tokens']} prompt and {out['response_tokens']} response tokens; "
          f"{args.threads} thread(s); best of {args.repeats}")
    print(f"update, prompt per row (padded): {times[False]:.3f} s")
    print(f"update, prompt once per group:   {times[True]:.3f} s   ({out['speedup']:.2f}x)")
    print(f"largest parameter difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
