"""The report's evaluation variants (``compare --extra-evals``): for each extra held-out evaluation, every
algorithm's sampled pass@1, greedy accuracy and pass@k up to its k (mean and 95% t interval over seeds, the base
beside them), and the claims that read the held-out evaluation (C2, C3) judged again under it, marked where the
verdict moves. Written to ``variants.json``, ``summary.md`` and ``report.html`` by
:func:`tokenmdp.experiments.report.build_report`."""

from __future__ import annotations

import html
import io
import math
from typing import Any

from tokenmdp.experiments.claims import evaluate_claims
from tokenmdp.experiments.runs import Collection
from tokenmdp.stats import mean_ci

EVAL_CLAIMS = ("C2", "C3")  # the claims that read the held-out evaluation


def _names(col: Collection) -> list[str]:
    names = {n for r in col.runs for n in r.extra_evals} | set(col.base_extra_evals)
    return sorted(names)


def _ks(docs: list[dict]) -> list[int]:
    """The pass@k keys (powers of two, as the evaluation writes them) common to ``docs``."""
    keys = [{int(k[5:]) for k in d.get("metrics", {}) if k.startswith("pass@") and k[5:].isdigit()} for d in docs]
    return sorted(set.intersection(*keys)) if keys else []


def _stats(docs: list[dict], ks: list[int]) -> dict[str, Any]:
    out = {}
    for key in ["sampled/pass@1", "greedy/pass@1"] + [f"pass@{k}" for k in ks]:
        values = [d["metrics"][key] for d in docs if key in d.get("metrics", {})]
        if values:
            c = mean_ci(values)
            out[key] = {"mean": c.mean, "low": c.low, "high": c.high, "n": c.n}
    return out


def variant_analysis(col: Collection, claims: dict) -> dict[str, Any]:
    """``{name: {"settings", "algos": {algo: stats}, "claims": {id: {verdict, summary, main, moved}}}}``."""
    out: dict[str, Any] = {}
    for name in _names(col):
        base = col.base_extra_evals.get(name, [])
        groups = {"base": base} if base else {}
        for algo in col.algos:
            docs = [r.extra_evals[name] for r in col.runs_of(algo) if name in r.extra_evals]
            if docs:
                groups[algo] = docs
        every = [d for docs in groups.values() for d in docs]
        ks = _ks(every)
        first = every[0].get("settings", {}) if every else {}
        settings = {k: first.get(k) for k in ("temperature", "k", "n_samples", "greedy") if k in first}
        settings["problems"] = every[0].get("metrics", {}).get("n_problems") if every else None
        judged = evaluate_claims(col.with_evals(name))
        out[name] = {
            "settings": settings, "ks": ks, "algos": {a: _stats(docs, ks) for a, docs in groups.items()},
            "claims": {c: {"verdict": judged[c]["verdict"], "summary": judged[c]["summary"],
                           "main": claims[c]["verdict"], "moved": judged[c]["verdict"] != claims[c]["verdict"]}
                       for c in EVAL_CLAIMS if c in judged and c in claims},
        }
    return out


def _pct(s: dict | None) -> str:
    if not s:
        return "n/a"
    if s["low"] is None or not math.isfinite(s["low"]):
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ± {100 * (s['high'] - s['mean']):.1f}"


def _setting_text(v: dict) -> str:
    s = v["settings"]
    return (f"temperature {s.get('temperature')}, {s.get('k')} samples of each of {s.get('problems')} problems"
            + ("" if s.get("greedy", True) else ", no greedy answer"))


def _table(v: dict) -> tuple[list[str], list[list[str]]]:
    high = [k for k in v["ks"] if k > 1]
    header = ["algorithm", "sampled pass@1", "greedy"] + [f"pass@{k}" for k in high]
    rows = [[a, _pct(st.get("sampled/pass@1")), _pct(st.get("greedy/pass@1"))] + [_pct(st.get(f"pass@{k}"))
                                                                                   for k in high]
            for a, st in v["algos"].items()]
    return header, rows


def _claim_line(cid: str, c: dict) -> str:
    move = f"moved from {c['main']}" if c["moved"] else "as under the main evaluation"
    return f"{cid}: **{c['verdict']}** ({move}): {c['summary']}"


def variants_markdown(doc: dict[str, Any]) -> str:
    """The section's markdown (empty without extra evaluations)."""
    if not doc:
        return ""
    lines = ["## Evaluation variants", "", "The final models and the base evaluated again (mean ± 95% half width "
             "over seeds, %), and the claims that read the held-out evaluation judged under each.", ""]
    for name, v in doc.items():
        header, rows = _table(v)
        lines += [f"### {name}: {_setting_text(v)}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
        lines += [f"- {_claim_line(cid, c)}" for cid, c in v["claims"].items()] + [""]
    return "\n".join(lines)


def variants_html(doc: dict[str, Any]) -> str:
    """The section's HTML, with its own heading (empty without extra evaluations)."""
    if not doc:
        return ""
    parts = ["<h2>Evaluation variants</h2><p class='note'>The final models and the base evaluated again (mean ± "
             "95% half width over seeds, %), and the claims that read the held-out evaluation judged under each."
             "</p>"]
    for name, v in doc.items():
        header, rows = _table(v)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        claims = "".join(f"<li>{html.escape(_claim_line(cid, c)).replace('**', '')}</li>"
                         for cid, c in v["claims"].items())
        parts.append(f"<h3>{html.escape(name)}: {html.escape(_setting_text(v))}</h3><table><thead><tr>{head}</tr>"
                     f"</thead><tbody>{body}</tbody></table><ul>{claims}</ul>")
    return "".join(parts)


def passk_figure(doc: dict[str, Any]) -> bytes | None:
    """pass@k against k (log 2 scale) per algorithm, one panel per variant with k >= 8; None without one."""
    shown = {n: v for n, v in doc.items() if max(v["ks"] or [0]) >= 8}
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], shown.items()):
        for algo, st in v["algos"].items():
            ks = [k for k in v["ks"] if f"pass@{k}" in st]
            ax.plot(ks, [100 * st[f"pass@{k}"]["mean"] for k in ks], marker="o", ms=3, label=algo,
                    color="k" if algo == "base" else None, ls="--" if algo == "base" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(f"{name}: {_setting_text(v)}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


__all__ = ["EVAL_CLAIMS", "passk_figure", "variant_analysis", "variants_html", "variants_markdown"]
