"""Figures of the simulated tier (matplotlib, Agg backend) from the ``sim.json`` document of
:func:`tokenmdp.experiments.simulated.run_sweep`; each returns PNG bytes.

* ``sim_paths_G<g>``: per preset (rows) and learning rate (columns), ``P(correct)`` over the steps: the seeds'
  median with the 10-90% band, and the exact infinite-batch path dashed;
* ``sim_collapse``: the collapse rate over seeds against the learning rate, per preset, with Clopper-Pearson bars;
* ``sim_length``: the drift of ``E[length | incorrect]`` against the learning rate, per preset (mean with its 95%
  interval; the exact path's drift hollow).
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def paths_figure(doc: dict[str, Any], group_size: int, key: str = "p_correct") -> bytes:
    s = doc["settings"]
    presets, lrs = s["presets"], s["lrs"]
    runs = {(r["preset"], r["lr"]): r for r in doc["runs"] if r["group_size"] == group_size}
    fig, axes = plt.subplots(len(presets), len(lrs), figsize=(2.6 * len(lrs), 1.9 * len(presets)), sharex=True,
                             sharey=True, squeeze=False)
    for i, name in enumerate(presets):
        for j, lr in enumerate(lrs):
            ax, r = axes[i, j], runs.get((name, lr))
            if r is None:
                continue
            x, c = r["curve_steps"], r["curves"][key]
            ax.fill_between(x, c["q10"], c["q90"], color="C0", alpha=0.25, lw=0)
            ax.plot(x, c["q50"], color="C0", lw=1.2)
            if r.get("exact"):
                ax.plot(x, r["exact"]["curves"][key], color="k", ls="--", lw=1)
            if key == "p_correct":
                ax.axhline(0.5 * r["start"]["p_correct"], color="C3", lw=0.7, ls=":")
            if i == 0:
                ax.set_title(f"lr {lr:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
            ax.set_xscale("symlog", linthresh=10)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{key} over the steps, G = {group_size}: seeds' median and 10-90% band; exact path dashed; "
                 "collapse line dotted", fontsize=10)
    return _png(fig)


def _by_preset(doc: dict[str, Any], group_size: int):
    for name in doc["settings"]["presets"]:
        rows = sorted((r for r in doc["runs"] if r["preset"] == name and r["group_size"] == group_size),
                      key=lambda r: r["lr"])
        yield name, rows


def _per_group_size(doc: dict[str, Any], ylabel: str, draw) -> bytes:
    """One panel per group size, a line per preset against the learning rate (log scale), drawn by
    ``draw(ax, lr, rows)``; the lrs of the presets fanned out a little so their bars do not overlap."""
    gs = doc["settings"]["group_sizes"]
    fig, axes = plt.subplots(1, len(gs), figsize=(4.6 * len(gs), 3.4), sharey=True, squeeze=False)
    for ax, g in zip(axes[0], gs):
        for k, (name, rows) in enumerate(_by_preset(doc, g)):
            draw(ax, np.array([r["lr"] for r in rows]) * (1 + 0.04 * (k - 2)), rows, name)
        ax.set_xscale("log")
        ax.set_xlabel(f"learning rate ({doc['settings']['optimizer']})")
        ax.set_title(f"G = {g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, -1].legend(fontsize=8)
    return _png(fig)


def _draw_collapse(ax, lr, rows, name) -> None:
    rate = np.array([r["collapse_rate"] for r in rows])
    ci = np.array([r["collapse_ci"] for r in rows])
    ax.errorbar(lr, rate, yerr=[rate - ci[:, 0], ci[:, 1] - rate], marker="o", ms=4, capsize=2, label=name)


def _draw_length(ax, lr, rows, name) -> None:
    d = [r["len_incorrect_drift"] for r in rows]
    mean = np.array([x["mean"] for x in d])
    low = np.array([x["low"] if x["low"] is not None else x["mean"] for x in d])
    high = np.array([x["high"] if x["high"] is not None else x["mean"] for x in d])
    line = ax.errorbar(lr, mean, yerr=[mean - low, high - mean], marker="o", ms=4, capsize=2, label=name)
    exact = [r["exact"]["len_incorrect_drift"] if r.get("exact") else np.nan for r in rows]
    ax.plot(lr, exact, marker="o", ms=5, mfc="none", ls="none", color=line[0].get_color())
    ax.axhline(0, color="k", lw=0.8)


def collapse_figure(doc: dict[str, Any]) -> bytes:
    return _per_group_size(doc, "share of seeds that collapse", _draw_collapse)


def length_figure(doc: dict[str, Any]) -> bytes:
    return _per_group_size(doc, "drift of E[length | incorrect] (tokens)", _draw_length)


def sim_figures(doc: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of the module docstring, by file name (without ``.png``)."""
    out = {f"sim_paths_G{g}": paths_figure(doc, g) for g in doc["settings"]["group_sizes"]}
    out["sim_collapse"] = collapse_figure(doc)
    out["sim_length"] = length_figure(doc)
    return out


__all__ = ["collapse_figure", "length_figure", "paths_figure", "sim_figures"]
