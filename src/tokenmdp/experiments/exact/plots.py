"""Figures of the exact tier (matplotlib, Agg backend), from the ``exact.json`` document of
:func:`tokenmdp.experiments.exact.run_exact`; each returns PNG bytes.

* ``exact_directions``: per preset, the cosine of its expected update with ``grad J``, its relative per-sample
  variance (log scale) and the first-order change of E[length | incorrect] along it;
* ``exact_dynamics``: J, E[length | correct], E[length | incorrect] and P(truncated) along the exact dynamics.
  Presets whose trajectories coincide (every expected update that is a positive multiple of ``grad J`` does,
  with unit-length steps) share one line, labelled ``a = b = ...``.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANELS = [("J", "J = P(correct)"), ("len_correct", "E[length | correct]"),
          ("len_incorrect", "E[length | incorrect]"), ("p_truncated", "P(truncated)")]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bars(ax, names: list[str], values: list[float], title: str, *, log: bool = False, ref: float | None = None):
    x = np.arange(len(names))
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    ax.bar(x, vals, color=["C3" if v < 0 else "C0" for v in np.nan_to_num(vals)])
    if ref is not None:
        ax.axhline(ref, color="k", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def directions_figure(result: dict[str, Any]) -> bytes:
    """Cosine with grad J, relative variance, and d E[length | incorrect] per unit step, one bar per preset."""
    names = list(result["presets"])
    rows = [result["presets"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    cos = [r["cosine"] for r in rows]
    _bars(axes[0], names, cos, "cosine(expected update, grad J)", ref=1.0)
    low = min(c for c in cos if c is not None)
    axes[0].set_ylim(max(-1.0, low - 0.1 * (1 - low) - 1e-3), 1.0 + 0.05 * (1 - low) + 1e-3)
    _bars(axes[1], names, [r["relative_variance"] for r in rows],
          f"per-sample variance / |E update|^2 (G = {result['group_size']})", log=True)
    _bars(axes[2], names, [r["len_incorrect_slope"] for r in rows],
          "d E[length | incorrect] per unit step (start)", ref=0.0)
    mdp = result["mdp"]
    fig.suptitle(f"Exact expected updates: vocab {mdp['vocab']}, max_len {mdp['max_len']}, "
                 f"{mdp['num_groups']} groups of {result['group_size']}", fontsize=10)
    return _png(fig)


def _merged(dynamics: dict[str, list[dict]]) -> list[tuple[str, list[dict]]]:
    """Trajectories with identical J and lengths (to 1e-9) merged into one labelled ``a = b = ...``."""
    keys = [k for k, _ in PANELS]
    out: list[tuple[list[str], list[dict]]] = []
    for name, recs in dynamics.items():
        arr = np.array([[r[k] for k in keys] for r in recs], dtype=float)
        for names, other in out:
            ref = np.array([[r[k] for k in keys] for r in other], dtype=float)
            if ref.shape == arr.shape and np.allclose(ref, arr, rtol=0, atol=1e-9, equal_nan=True):
                names.append(name)
                break
        else:
            out.append(([name], recs))
    return [(" = ".join(names), recs) for names, recs in out]


def dynamics_figure(result: dict[str, Any]) -> bytes:
    """The exact dynamics: one panel per quantity of :data:`PANELS`, one line per distinct trajectory."""
    lines = _merged(result["dynamics"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2))
    for i, (label, recs) in enumerate(lines):
        steps = [r["step"] for r in recs]
        style = ["-", "--", ":", "-."][(i // 10) % 4]
        for ax, (key, _) in zip(axes.flat, PANELS):
            ax.plot(steps, [r[key] for r in recs], style, color=f"C{i % 10}", lw=1.4,
                    label=textwrap.fill(label, 70))
    for ax, (_, title) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2)
    step = "lr * U / |U| (unit-length steps)" if result.get("normalize", True) else "lr * U (plain SGD)"
    fig.suptitle(f"Exact dynamics from one start: theta += {step}, lr {result['lr']:g}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def exact_figures(result: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of the exact tier, by file stem."""
    figures = {"exact_directions": directions_figure(result)}
    if result["steps"] > 0:
        figures["exact_dynamics"] = dynamics_figure(result)
    return figures


__all__ = ["directions_figure", "dynamics_figure", "exact_figures"]
