"""Report figures (matplotlib, Agg backend): per-step curves averaged over seeds, and held-out accuracy bars.

Each function returns the PNG bytes of one figure (the report writes them to ``plots/`` and inlines them as
base64 in ``report.html``), or None when no run logged the metric.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tokenmdp.experiments.runs import Collection  # noqa: E402

# one figure per entry: file name, title, y label, [(metric key candidates, line style suffix)]
CURVES: list[tuple[str, str, str, list[tuple[tuple[str, ...], str]]]] = [
    ("reward", "Training reward (mean over the step's samples)", "reward", [(("reward/mean",), "")]),
    ("heldout_accuracy", "Held-out accuracy during training", "accuracy",
     [(("eval/accuracy", "eval/greedy_accuracy", "eval/pass@1"), "")]),
    ("length", "Response length of the training samples (tokens)", "tokens",
     [(("length/correct",), "correct"), (("length/incorrect",), "incorrect")]),
    ("kl", "KL to the base (or the reference) policy", "KL",
     [(("policy/kl_base", "policy/kl", "policy/kl_ref", "policy/approx_kl"), "")]),
    ("entropy", "Policy entropy (per token)", "nats", [(("policy/entropy",), "")]),
    ("logp", "Log-likelihood per token of the step's responses", "nats",
     [(("logp/positive",), "correct"), (("logp/negative",), "incorrect")]),
    ("frac_zero_std", "Groups whose rewards all agree (no group-relative signal)", "share of groups",
     [(("reward/frac_zero_std",), "")]),
    ("clip", "Clipped share of the tokens", "share", [(("policy/clip_frac",), "")]),
    ("ratio", "Importance ratio's range over the step's tokens", "ratio",
     [(("policy/ratio_max",), "max"), (("policy/ratio_min",), "min")]),
    ("equivalence", "Cosine(GRPO gradient, advantage/length weighted SFT gradient)", "cosine",
     [(("equiv/cosine",), "")]),
]

_STYLES = {"": "-", "correct": "-", "incorrect": "--", "max": "-", "min": "--"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _first_key(frames: Sequence[pd.DataFrame], candidates: tuple[str, ...]) -> str | None:
    for key in candidates:
        if any(key in f.columns and f[key].notna().any() for f in frames):
            return key
    return None


def seed_band(frames: Sequence[pd.DataFrame], key: str) -> pd.DataFrame:
    """Per step: mean over the seeds that logged ``key`` at that step, and the min and max across them.

    Steps are aligned by the ``step`` index. Two seeds with ``reward/mean`` [0, 1] and [1, 1] at steps 1, 2 give
    mean [0.5, 1.0], low [0, 1], high [1, 1].
    """
    series = [pd.to_numeric(f[key], errors="coerce").rename(i) for i, f in enumerate(frames) if key in f.columns]
    if not series:
        return pd.DataFrame(columns=["mean", "low", "high", "n"])
    table = pd.concat(series, axis=1)
    out = pd.DataFrame({"mean": table.mean(axis=1), "low": table.min(axis=1), "high": table.max(axis=1),
                        "n": table.notna().sum(axis=1)})
    return out[out["n"] > 0]


def curve_figure(col: Collection, name: str) -> bytes | None:
    """The per-step figure ``name`` of :data:`CURVES`: a line per algorithm (mean over seeds), band min..max over
    seeds; one panel per metric of the entry (the length figure: correct | incorrect)."""
    _, title, ylabel, lines = next(c for c in CURVES if c[0] == name)
    fig, axes = plt.subplots(1, len(lines), figsize=(6.4 * len(lines) ** 0.8, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for ax, (candidates, suffix) in zip(axes[0], lines):
        for i, algo in enumerate(col.algos):
            frames = [r.metrics for r in col.runs_of(algo, finished=True) if not r.metrics.empty]
            key = _first_key(frames, candidates)
            band = seed_band(frames, key) if key is not None else None
            if band is None or band.empty:
                continue
            color = colors[i % len(colors)]
            ax.plot(band.index, band["mean"], _STYLES[suffix], color=color, label=algo, lw=1.6,
                    marker="o" if len(band) < 4 else None, ms=3)
            if (band["n"] > 1).any():
                ax.fill_between(band.index, band["low"], band["high"], color=color, alpha=0.15, lw=0)
            drawn = True
        ax.set_title(f"{suffix} responses" if suffix else title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    if not drawn:
        plt.close(fig)
        return None
    if len(lines) > 1:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def heldout_bars(rows: Sequence[dict], metrics: Sequence[tuple[str, str]]) -> bytes | None:
    """Grouped bars of final held-out metrics per algorithm (base model first), error bars = 95% CI over seeds.

    ``rows`` are summary rows (``{"algo", "<key>_mean", "<key>_half_width", ...}``); ``metrics`` are
    ``(key, label)`` pairs such as ``("greedy/pass@1", "greedy")``.
    """
    present = [(k, lab) for k, lab in metrics if any(np.isfinite(r.get(f"{k}_mean", np.nan)) for r in rows)]
    if not rows or not present:
        return None
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(rows) * len(present) / 2), 3.6))
    width = 0.8 / len(present)
    x = np.arange(len(rows))
    for j, (key, label) in enumerate(present):
        means = np.array([r.get(f"{key}_mean", np.nan) for r in rows], dtype=float)
        errs = np.array([r.get(f"{key}_half_width", np.nan) for r in rows], dtype=float)
        ax.bar(x + (j - (len(present) - 1) / 2) * width, means, width, label=label,
               yerr=np.where(np.isfinite(errs), errs, 0.0), capsize=3)
    ax.set_xticks(x, [r["algo"] for r in rows], fontsize=8)
    ax.set_ylabel("held-out accuracy")
    tops = np.array([[r.get(f"{k}_mean", np.nan), r.get(f"{k}_half_width", np.nan)] for r in rows
                     for k, _ in present], dtype=float)
    top = max(float(np.nanmax(np.nan_to_num(tops[:, 0], nan=0.0) + np.nan_to_num(tops[:, 1], nan=0.0))), 0.05)
    ax.set_ylim(0, min(1.0, 1.2 * top + 0.02))
    ax.set_title("Final held-out accuracy (error bars: 95% CI over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def all_figures(col: Collection, rows: Sequence[dict], bar_metrics: Sequence[tuple[str, str]]) -> dict[str, bytes]:
    """Every figure of the report that has data, by file stem (``final_accuracy``, ``reward``, ``length``, ...)."""
    figures: dict[str, bytes] = {}
    bars = heldout_bars(rows, bar_metrics)
    if bars is not None:
        figures["final_accuracy"] = bars
    for name, *_ in CURVES:
        png = curve_figure(col, name)
        if png is not None:
            figures[name] = png
    return figures
