"""Seconds per training step of the synchronous loop and of rollouts overlapped with updates
(``rollout.max_staleness=1``), alternating, on the embedded tiny base model and Countdown.

Each run trains ``--steps`` steps of ``--algo`` with ``--prompts`` x ``--group`` samples a step and one torch
thread for the learner (and one for the sampler); a step's time is the wall time between the ends of consecutive
steps (everything: rollout or waiting, scoring, update, logging), and the figure is the median over steps 2 ..
``--steps`` (step 1 includes the sampler's start-up: the spawn of a process imports torch). The runs alternate
(sync, async, sync, async, ... for ``--rounds``) so that the noise of a shared machine falls on both. Printed: each
run's median s/step and the medians of ``time/rollout``, ``time/update`` and ``time/wait``, then the ratio
sync / async per worker kind.

    .venv/bin/python benchmarks/bench_async.py [--workers process,thread] [--rounds 1] [--steps 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _run(path: str, out: Path, args, staleness: int, worker: str) -> dict:
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    cfg = load_config(None, [f"model.path={path}", f"algo.name={args.algo}", f"run.out={out}",
                             f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
                             f"run.steps={args.steps}", "run.save_every=0", "run.threads=1",
                             f"rollout.max_staleness={staleness}", f"rollout.async_worker={worker}"])
    ends: dict[int, float] = {}
    records: dict[int, dict] = {}

    def on_step(step, record, c):
        ends[step] = time.perf_counter()
        records[step] = record

    train(cfg, progress=False, callbacks=[on_step])
    steps = range(2, args.steps + 1)

    def med(key):
        values = [records[s].get(key) for s in steps if records[s].get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return {"mode": "sync" if staleness == 0 else f"async-{worker}",
            "s_per_step": round(statistics.median(ends[s] - ends[s - 1] for s in steps), 3),
            "rollout_s": med("time/rollout"), "update_s": med("time/update"), "wait_s": med("time/wait"),
            "reward_mean": round(statistics.mean(records[s]["reward/mean"] for s in records), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--workers", default="process", help="comma-separated: process, thread")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tokenmdp.base.store import ensure_tiny_base

    path = str(ensure_tiny_base(progress=True))
    tmp = Path(tempfile.mkdtemp())
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    rows = []
    for r in range(args.rounds):
        for staleness, worker in [(0, "process")] + [(1, w) for w in workers]:
            row = _run(path, tmp / f"{r}-{staleness}-{worker}", args, staleness, worker)
            rows.append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
    sync = statistics.median(x["s_per_step"] for x in rows if x["mode"] == "sync")
    ratios = {w: round(sync / statistics.median(x["s_per_step"] for x in rows if x["mode"] == f"async-{w}"), 2)
              for w in workers}
    summary = {"model": f"tiny base ({path})", "algo": args.algo, "batch": f"{args.prompts} x {args.group}",
               "steps": args.steps, "rounds": args.rounds, "sync_s_per_step": sync,
               "speedup_sync_over_async": ratios, "runs": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.algo}, Countdown, {args.prompts} prompts x {args.group} samples, {args.steps} steps, median s/step "
          f"over steps 2-{args.steps}, {args.rounds} round(s), learner 1 thread (+ sampler 1 thread)")
    for w, ratio in ratios.items():
        print(f"sync {sync:.3f} s/step; max_staleness=1 ({w}): "
              f"{statistics.median(x['s_per_step'] for x in rows if x['mode'] == f'async-{w}'):.3f} s/step; "
              f"sync / async = {ratio:.2f}x")


if __name__ == "__main__":
    main()
