"""Where C1 stops holding: GRPO against its advantage-weighted SFT twin, with k optimizer steps per batch and with
a KL term.

The reduction of arXiv 2505.13697 needs one on-policy optimizer step per batch and no KL. For each ``k`` of
``--ks``, ``grpo_nokl`` and ``isft+-adv`` train from the embedded base on the same seed and prompt stream for
``--steps`` steps of ``--prompts`` x ``--group``, with ``optim.minibatch_size = batch / k``: ``k`` optimizer steps
a batch, each on a new minibatch. ``grpo_nokl`` logs its gradient's cosine with weighted SFT's (``run.equivalence``)
on the batch before its first step (1 up to rounding) and before each later step on it (the policy has moved
off the sampler, so the ratio leaves 1 and the clip acts). Then ``--kls``: ``grpo`` with that ``algo.kl_coef`` and
one step a batch, against the same twin. Printed per row: the mean cosines over the run, the first step at which
the twins' sampled batches differ, and the relative parameter difference of their final models; with several
``--seeds``, each as the mean over the seeds with its 95% t interval; and a plot (error bars over the seeds).

    .venv/bin/python scripts/c1_break.py [--ks 1,2,4,8] [--kls 0.001,0.04] [--steps 8] [--seeds 0,1,2]
        [--out runs/c1-break]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _train(job: tuple[str, str, list[str]]) -> str:
    import torch

    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    torch.set_num_threads(1)
    model, out, overrides = job
    train(load_config(None, [f"model.path={model}", f"run.out={out}", "run.save_every=0", "run.threads=1",
                             "run.overwrite=true", *overrides]), progress=False)
    return out


def _first_difference(a: Path, b: Path) -> int | None:
    """The first training step whose sampled completions differ between two run folders (None: none differ)."""
    import pyarrow.parquet as pq

    ta, tb = (pq.read_table(p / "samples.parquet", columns=["step", "completion"]).to_pydict() for p in (a, b))
    steps = sorted(set(ta["step"]))
    for s in steps:
        ca = [c for st, c in zip(ta["step"], ta["completion"]) if st == s]
        cb = [c for st, c in zip(tb["step"], tb["completion"]) if st == s]
        if ca != cb:
            return s
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,2,4,8", help="optimizer steps per batch")
    ap.add_argument("--kls", default="0.001,0.04", help="algo.kl_coef values for grpo, one step a batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each a twin pair per row)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/c1-break"))
    args = ap.parse_args()

    from tokenmdp.base.store import ensure_tiny_base
    from tokenmdp.experiments.claims.verdicts import param_difference
    from tokenmdp.train.log import read_metrics

    model = str(ensure_tiny_base(None, progress=False))
    batch = args.prompts * args.group
    seeds = [int(x) for x in args.seeds.split(",")]
    rows, jobs = [], []
    for seed in seeds:
        out = args.out if seeds == [0] else args.out / f"seed-{seed}"  # one seed: the folders of earlier runs
        common = [f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
                  f"run.steps={args.steps}", f"optim.lr={args.lr}", f"run.seed={seed}"]
        for k in (int(x) for x in args.ks.split(",")):
            mb = [f"optim.minibatch_size={batch // k}"] if k > 1 else []
            pair = {"row": f"k={k}", "k": k, "kl": 0.0, "seed": seed, "grpo": out / f"grpo_nokl-k{k}",
                    "twin": out / f"isft+-adv-k{k}"}
            jobs += [(model, str(pair["grpo"]), common + mb + ["algo.name=grpo_nokl", "run.equivalence=true"]),
                     (model, str(pair["twin"]), common + mb + ["algo.name=isft+-adv"])]
            rows.append(pair)
        for kl in (float(x) for x in args.kls.split(",") if x):
            pair = {"row": f"kl={kl:g}", "k": 1, "kl": kl, "seed": seed, "grpo": out / f"grpo-kl{kl:g}",
                    "twin": out / "isft+-adv-k1"}
            jobs.append((model, str(pair["grpo"]), common + ["algo.name=grpo", f"algo.kl_coef={kl}",
                                                             "run.equivalence=true"]))
            rows.append(pair)
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(_train, jobs))

    def mean(records, key):
        values = [r[key] for r in records if r.get(key) is not None]
        return statistics.mean(values) if values else None

    per_seed = []
    for pair in rows:
        metrics = read_metrics(pair["grpo"] / "metrics.jsonl")
        diff = param_difference(pair["grpo"] / "final", pair["twin"] / "final")
        per_seed.append({"row": pair["row"], "k": pair["k"], "kl": pair["kl"], "seed": pair["seed"],
                         "cosine_first": mean(metrics, "equiv/cosine"),
                         "cosine_later_mean": mean(metrics, "equiv/cosine_later_mean"),
                         "cosine_later_min": min((r["equiv/cosine_later_min"] for r in metrics
                                                  if "equiv/cosine_later_min" in r), default=None),
                         "clip_frac": mean(metrics, "policy/clip_frac"),
                         "first_differing_step": _first_difference(pair["grpo"], pair["twin"]),
                         "param_rel_diff": diff["rel"] if diff else None})
    table = _over_seeds(per_seed)
    (args.out / "c1_break.json").write_text(json.dumps({"seeds": seeds, "rows": table, "per_seed": per_seed},
                                                       indent=2) + "\n")
    print(f"{len(seeds)} seed(s); with several, each cell is the mean over the seeds [95% t interval]")
    print("| row | cosine before the batch's first step | later steps: mean | later steps: min | clip fraction "
          "| first step the twins' samples differ | final parameters, relative difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['row']} | {_cell(t, 'cosine_first', '.6f')} | {_cell(t, 'cosine_later_mean', '.4f')} | "
              f"{_cell(t, 'cosine_later_min', '.4f')} | {_cell(t, 'clip_frac', '.4f')} | "
              f"{_cell(t, 'first_differing_step', '.1f')} | {_cell(t, 'param_rel_diff', '.2e')} |")
    _plot(table, args.out / "c1_break.png")


KEYS = ("cosine_first", "cosine_later_mean", "cosine_later_min", "clip_frac", "first_differing_step",
        "param_rel_diff")


def _over_seeds(per_seed: list[dict]) -> list[dict]:
    """One row per setting: each key's mean over the seeds and its 95% t interval (``<key>_low``/``_high``)."""
    from tokenmdp.stats import mean_ci

    out = []
    for row in dict.fromkeys(r["row"] for r in per_seed):
        group = [r for r in per_seed if r["row"] == row]
        t = {"row": row, "k": group[0]["k"], "kl": group[0]["kl"], "n": len(group)}
        for key in KEYS:
            ci = mean_ci([r[key] for r in group if r[key] is not None])
            t[key] = None if ci.n == 0 else ci.mean
            t[f"{key}_low"], t[f"{key}_high"] = ci.low, ci.high
        out.append(t)
    return out


def _cell(t: dict, key: str, spec: str) -> str:
    if t[key] is None:
        return "-"
    if t.get(f"{key}_low") is None:
        return format(t[key], spec)
    return f"{format(t[key], spec)} [{format(t[f'{key}_low'], spec)}, {format(t[f'{key}_high'], spec)}]"


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [t for t in table if t["kl"] == 0.0]
    x = [t["k"] for t in ks]

    def bars(rows: list[dict], key: str):
        mean = [t[key] if t[key] is not None else float("nan") for t in rows]
        low = [m - (t[f"{key}_low"] if t[f"{key}_low"] is not None else m) for m, t in zip(mean, rows)]
        high = [(t[f"{key}_high"] if t[f"{key}_high"] is not None else m) - m for m, t in zip(mean, rows)]
        return mean, [low, high]

    # k = 1 has no later steps: its point is the cosine before the first (and only) step
    later = [t if t["cosine_later_mean"] is not None else
             {**t, **{f"cosine_later_mean{s}": t[f"cosine_first{s}"] for s in ("", "_low", "_high")}} for t in ks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    m, e = bars(later, "cosine_later_mean")
    a.errorbar(x, m, yerr=e, fmt="o-", capsize=3, label="mean over the batch's later steps")
    m, e = bars(ks, "cosine_first")
    a.errorbar(x, m, yerr=e, fmt="s--", capsize=3, label="before the first step")
    a.set_xscale("log", base=2)
    a.set_xlabel("optimizer steps per batch")
    a.set_ylabel("cosine(grad GRPO, grad weighted SFT)")
    a.legend(fontsize=8)
    m, e = bars(ks, "param_rel_diff")
    b.errorbar(x, m, yerr=e, fmt="o-", capsize=3)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("optimizer steps per batch")
    b.set_ylabel("final parameters: relative difference")
    n = max(t["n"] for t in table)
    fig.suptitle(f"Where C1 stops holding (GRPO without KL vs advantage-weighted SFT), {n} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
