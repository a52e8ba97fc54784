"""The simulated tier's sweep: every preset at every learning rate and group size (:func:`run_sweep`), each run's
summary over seeds (:func:`summarize`) and the tables (:func:`sweep_markdown`) of ``sim.json`` / ``summary.md``.

Per configuration, over the seeds: ``P(correct)`` at the end (mean with its 95% t interval, and the 10th / 50th /
90th percentiles), the *collapse rate* (the share of seeds whose ``P(correct)`` ever fell below half the start's,
with its exact Clopper-Pearson interval) and the share still below at the end, the median step of the collapse,
the *drift* of ``E[length | incorrect]`` (end minus start, mean and 95% t interval) and the final entropy; beside
them the exact infinite-batch path's end point, lowest ``P(correct)`` and drift. Curves are kept every
``curve_every`` steps (mean and percentiles; about 200 points) for the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact.tier import run_threads
from tokenmdp.experiments.simulated.tier import (COLLAPSE_FRACTION, START_SEED, SimRun, collapse_steps, resolve,
                                                 simulate)
from tokenmdp.experiments.simulated.types import check_group_size
from tokenmdp.stats import mean_ci

DEFAULTS: dict[str, Any] = {
    "presets": ["grpo_nokl", "dr_grpo", "isft+", "isft-", "isft+-"], "lrs": [0.01, 0.03, 0.1, 0.3, 1.0],
    "group_sizes": [4, 8], "seeds": 200, "steps": 1000, "optimizer": "adam", "tied": True,
    "start_seed": START_SEED, "seed": 0,
}


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of ``k`` successes in ``n`` (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def _ci(values: np.ndarray) -> dict[str, float | None]:
    c = mean_ci(values.tolist())
    return {"mean": c.mean, "low": c.low, "high": c.high}


def summarize(run: SimRun, curve_every: int | None = None) -> dict[str, Any]:
    """The summary over seeds of one configuration (module docstring); curves kept every ``curve_every`` steps
    (default: about 200 points)."""
    pc, li, ent = (run.curves[k] for k in ("p_correct", "len_incorrect", "entropy"))
    curve_every = curve_every or max(1, (pc.shape[0] - 1) // 200)
    n = pc.shape[1]
    first = collapse_steps(pc)
    collapsed = int((first >= 0).sum())
    ended = int((pc[-1] < COLLAPSE_FRACTION * pc[0]).sum())
    drift = li[-1] - li[0]
    keep = np.arange(0, pc.shape[0], curve_every)
    if keep[-1] != pc.shape[0] - 1:
        keep = np.append(keep, pc.shape[0] - 1)
    curves = {k: {"mean": v[keep].mean(1).tolist(),
                  **{f"q{q}": np.percentile(v[keep], q, axis=1).tolist() for q in (10, 50, 90)}}
              for k, v in run.curves.items()}
    out: dict[str, Any] = {
        "preset": run.preset, "lr": run.lr, "group_size": run.group_size, "seeds": n, "steps": pc.shape[0] - 1,
        "start": {"p_correct": float(pc[0, 0]), "len_incorrect": float(li[0, 0]), "entropy": float(ent[0, 0])},
        "p_correct_end": {**_ci(pc[-1]), **{f"q{q}": float(np.percentile(pc[-1], q)) for q in (10, 50, 90)}},
        "collapse_rate": collapsed / n, "collapse_ci": clopper_pearson(collapsed, n),
        "ended_collapsed": ended / n, "ended_collapsed_ci": clopper_pearson(ended, n),
        "collapse_step_median": float(np.median(first[first >= 0])) if collapsed else None,
        "len_incorrect_drift": _ci(drift), "entropy_end": float(ent[-1].mean()),
        "seconds": run.seconds, "curve_steps": keep.tolist(), "curves": curves,
    }
    if run.exact is not None:
        e = run.exact
        out["exact"] = {"p_correct_end": float(e["p_correct"][-1]), "p_correct_min": float(e["p_correct"].min()),
                        "collapsed": bool((e["p_correct"] < COLLAPSE_FRACTION * e["p_correct"][0]).any()),
                        "len_incorrect_drift": float(e["len_incorrect"][-1] - e["len_incorrect"][0]),
                        "entropy_end": float(e["entropy"][-1]),
                        "curves": {k: v[keep].tolist() for k, v in e.items()}}
    return out


def run_sweep(*, presets: list[str], lrs: list[float], group_sizes: list[int], seeds: int, steps: int,
              optimizer: str, tied: bool, start_seed: int, seed: int, progress=None) -> dict[str, Any]:
    """Every configuration of the grid, summarized: the ``sim.json`` document. ``progress(n)`` advances by steps
    (``len(presets) * len(lrs) * len(group_sizes) * steps`` in all)."""
    if not presets or not lrs or not group_sizes:
        raise TokenMDPError("simulate: --presets, --lrs and --group-sizes each need at least one value")
    for name in presets:  # every setting checked before the first runs
        resolve(name)
    for g in group_sizes:
        check_group_size(g)
    if any(not lr > 0 for lr in lrs):
        raise TokenMDPError(f"simulate: every learning rate must be > 0, got {lrs}")
    t0 = time.perf_counter()
    runs = []
    with run_threads(1):  # tensors of a few hundred thousand numbers: one thread is fastest, by far on a busy machine
        for g in group_sizes:
            for lr in lrs:
                for name in presets:
                    run = simulate(name, lr=lr, group_size=g, steps=steps, seeds=seeds, optimizer=optimizer,
                                   seed=seed, start_seed=start_seed, tied=tied, progress=progress)
                    runs.append(summarize(run))
    settings = {"presets": presets, "lrs": lrs, "group_sizes": group_sizes, "seeds": seeds, "steps": steps,
                "optimizer": optimizer, "tied": tied, "start_seed": start_seed, "seed": seed,
                "collapse_fraction": COLLAPSE_FRACTION}
    return {"settings": settings, "mdp": mdp_description(tied, start_seed), "runs": runs,
            "seconds": time.perf_counter() - t0}


def mdp_description(tied: bool, start_seed: int) -> str:
    params = ("a logit table per state plus a token bias shared by every state (tied: a step on one state's "
              "token moves that token everywhere, as an LM's shared layers do)" if tied
              else "a logit table per state (untied)")
    return (f"token MDP, vocab 3 (EOS = 0, answer a = 1, b = 2), max_len 6, one prompt: 127 responses; reward 1 iff "
            f"the response ends 'a EOS'; softmax policy with {params}; start logits N(0, 1) with seed {start_seed}")


def _fmt_ci(d: dict, digits: int = 3) -> str:
    if d.get("low") is None:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def sweep_markdown(doc: dict[str, Any]) -> str:
    """``summary.md``: the settings, then one table per group size."""
    s = doc["settings"]
    lines = ["# The simulated tier", "", doc["mdp"] + ".", "",
             f"{s['seeds']} seeds x {s['steps']} steps per configuration, optimizer {s['optimizer']}, one group a "
             f"step; collapse: P(correct) below {s['collapse_fraction']:g} x the start's at some step. Intervals: "
             "95% (t for means, Clopper-Pearson for rates). The exact path: the same optimizer fed the expected "
             f"update of a group (infinite batch). {doc['seconds']:.0f} s in all.", ""]
    lines += [f"- {line}" for line in sim_reading(doc)] + [""]
    for g in s["group_sizes"]:
        lines += [f"## G = {g}", "", "| preset | lr | P(correct) end | exact | collapse rate | ended collapsed | "
                  "collapse step (median) | drift of E[len \\| incorrect] | exact drift | entropy end |",
                  "|---|---:|---|---:|---|---:|---:|---|---:|---:|"]
        for r in (r for r in doc["runs"] if r["group_size"] == g):
            e = r.get("exact")
            lo, hi = r["collapse_ci"]
            step = r["collapse_step_median"]
            cells = [r["preset"], f"{r['lr']:g}", _fmt_ci(r["p_correct_end"]),
                     f"{e['p_correct_end']:.3f}" if e else "-", f"{r['collapse_rate']:.1%} [{lo:.1%}, {hi:.1%}]",
                     f"{r['ended_collapsed']:.1%}", "-" if step is None else str(int(step)),
                     _fmt_ci(r["len_incorrect_drift"], 2), f"{e['len_incorrect_drift']:+.2f}" if e else "-",
                     f"{r['entropy_end']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _rate(r: dict) -> str:
    lo, hi = r["collapse_ci"]
    return f"{r['collapse_rate']:.0%}" if r["collapse_rate"] == 0 else \
        f"{r['collapse_rate']:.1%} [{lo:.1%}, {hi:.1%}]"


def sim_reading(doc: dict[str, Any]) -> list[str]:
    """One line per preset and group size: its collapse rate at each learning rate (and whether the exact path
    collapses), then its drift of ``E[length | incorrect]`` at each rate beside the exact path's."""
    lines = []
    s = doc["settings"]
    for g in s["group_sizes"]:
        for name in s["presets"]:
            rows = sorted((r for r in doc["runs"] if r["preset"] == name and r["group_size"] == g),
                          key=lambda r: r["lr"])
            if not rows:
                continue
            collapse = ", ".join(f"{_rate(r)} at lr {r['lr']:g}" for r in rows)
            exact = [r["lr"] for r in rows if r.get("exact", {}).get("collapsed")]
            ex_text = ("its exact path never does" if not exact and all(r.get("exact") for r in rows) else
                       f"its exact path does at lr {', '.join(f'{x:g}' for x in exact)}" if exact else
                       "no exact path")
            drift = ", ".join(f"{r['len_incorrect_drift']['mean']:+.2f} [{r['len_incorrect_drift']['low']:+.2f}, "
                              f"{r['len_incorrect_drift']['high']:+.2f}]"
                              + (f" (exact {r['exact']['len_incorrect_drift']:+.2f})" if r.get("exact") else "")
                              + f" at {r['lr']:g}" for r in rows)
            lines.append(f"**{name}** (G = {g}): seeds that collapse: {collapse}; {ex_text}. Drift of "
                         f"E[length | incorrect] in tokens: {drift}.")
    return lines


def _rounded(x: Any) -> Any:
    """Floats to 6 significant digits, all the way down (the curves need no more; the file shrinks fourfold)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def save_sweep(doc: dict[str, Any], out: str | Path, figures: dict[str, bytes] | None = None) -> Path:
    """Write ``sim.json``, ``summary.md`` and ``plots/<name>.png`` into ``out``; returns the json path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sim.json"
    path.write_text(json.dumps(_rounded(doc), separators=(",", ":")) + "\n")
    (folder / "summary.md").write_text(sweep_markdown(doc) + "\n")
    for name, png in (figures or {}).items():
        (folder / "plots").mkdir(exist_ok=True)
        (folder / "plots" / f"{name}.png").write_bytes(png)
    return path


__all__ = ["DEFAULTS", "clopper_pearson", "mdp_description", "run_sweep", "save_sweep", "sim_reading", "summarize",
           "sweep_markdown"]
