"""Rendering the section beyond the degenerate MDP (:mod:`tokenmdp.experiments.beyond`) for ``summary.md`` and
``report.html``, and the exact tier's two-LLM case beside it."""

from __future__ import annotations

import math

from tokenmdp.experiments.beyond.analysis import KEY


def _pm(mean: float, half: float | None, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    sign = "+" if signed else ""
    text = f"{mean * scale:{sign}.{digits}f}"
    return text + (f" ± {half * scale:.{digits}f}" if half is not None and math.isfinite(half) else "")


def _diff(d: dict | None, scale: float = 100.0, unit: str = " pts") -> str:
    if not d:
        return "n/a"
    if not math.isfinite(d.get("low", math.nan)):
        return f"{d['mean'] * scale:+.1f}{unit} (n={d['n']})"
    return (f"{d['mean'] * scale:+.1f}{unit} [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}], "
            f"p={d['p_value']:.2g}, MDD {d['mdd'] * scale:.1f} (n={d['n']})")


def _what(kind: dict) -> str:
    bits = [kind["algo"]]
    if kind["env"] != "none":
        bits.append(f"env {kind['env']}")
    if kind["credit"] == "process":
        to_go = ", returns to go" if kind["returns"] == "to_go" else ""
        bits.append(f"process credit ({kind.get('process_final') or 'residual'} final reward{to_go})")
    return ", ".join(bits)


def _no_cosine(kind: dict) -> str:
    if kind["algo"].startswith("isft"):
        return "n/a (filtered SFT itself)"
    if kind["algo"].startswith("ppo"):
        return "n/a (a critic's per-token GAE)"
    return "not logged (run.equivalence off)"


def beyond_markdown(result: dict) -> str:
    """The section of ``summary.md``: one table, one reading per arm, and the two-LLM hints."""
    if not result:
        return ""
    ref = result["reference"]
    lines = [f"Reference arms (the plain token MDP): each arm against the plain arm of its own algorithm, else "
             f"**{ref}**. Base model alone: held-out sampled pass@1 "
             f"{_pm(result['base'][KEY], None, 100)}%. Intervals: 95% Student t over seeds; paired differences "
             f"with their p-value and the minimum detectable difference (MDD) at 80% power. Over seeds, the "
             f"population is training runs (what a rerun with new seeds would see: the test to trust); over "
             f"problems, it is the held-out problems for these very runs (each problem's pass@1 averaged over the "
             f"seeds), which leaves the seed-to-seed spread out and so reads narrower.", "",
             "| arm | what it changes | seeds | on-policy cosine GRPO vs weighted SFT (mean over steps; min) | "
             "slope of incorrect length (tokens/step) | held-out sampled pass@1 (%) | vs reference, over problems "
             "| vs base alone, over problems | train CPU min/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, row in result["arms"].items():
        c = row.get("cosine")
        cos = _no_cosine(row["kind"]) if c is None else \
            f"{_pm(c['mean'], c['half_width'], 1, 4)}; min {c['min']:.4f} ({'holds' if c['holds'] else 'broken'})"
        sl = row.get("length_slope") or {}
        h = row["heldout"]
        vs_ref = (row.get("vs_reference") or {}).get("over_problems")
        own = row.get("reference")
        lines.append(f"| {arm} | {_what(row['kind'])} | {len(row['seeds'])} | {cos} | "
                     f"{_pm(sl.get('mean', math.nan), sl.get('half_width'), 1, 2, True)} | "
                     f"{_pm(h['mean'], h['half_width'], 100)} | "
                     f"{f'{_diff(vs_ref)} vs {own}' if vs_ref else '(reference)'} | "
                     f"{_diff(row['vs_base']['over_problems'])} | {_pm(row['train_cpu_min'], None, 1, 1)} |")
    lines.append("")
    for arm, row in result["arms"].items():
        if not row.get("vs_reference"):
            continue
        parts = [f"against {row['reference']}"]
        c = row.get("cosine")
        if c is not None:
            parts.append(f"the paper's equivalence {'holds' if c['holds'] else 'is broken'}: on-policy cosine "
                         f"{c['mean']:.4f} on average, {c['min']:.4f} at worst over {c['steps']} logged steps")
        else:
            parts.append(f"the equivalence is {_no_cosine(row['kind'])}")
        v = (row.get("length_slope") or {}).get("vs_reference")
        if v:
            parts.append(f"incorrect length slope minus the reference's: {_diff(v, 1.0, ' tokens/step')} over seeds")
        vr = row.get("vs_reference") or {}
        if vr:
            parts.append(f"held-out accuracy minus the reference's: {_diff(vr.get('over_seeds'))} over seeds, "
                         f"{_diff(vr.get('over_problems'))} over problems")
        peer = row.get("vs_grpo_same_mdp")
        if peer:
            parts.append(f"against {peer['arm']} (GRPO in the same formulation, the paper's comparison there): "
                         f"{_diff(peer.get('over_seeds'))} over seeds, "
                         f"{_diff(peer.get('over_problems'))} over problems")
        lines.append(f"- **{arm}**: " + "; ".join(parts) + ".")
    for arm, row in result["arms"].items():
        hints = row.get("hints")
        if not hints:
            continue
        lines += ["", f"Most frequent first lines of **{arm}** (the generator's hint; {hints['distinct_heldout']} "
                  f"distinct among {hints['n_heldout']} held-out samples):", "",
                  "| held-out, final models | count | first training step | count | last training step | count |",
                  "|---|---|---|---|---|---|"]
        cols = [hints["heldout"], hints["first_step"], hints["last_step"]]
        for i in range(max(len(c) for c in cols)):
            cells = []
            for c in cols:
                cells += [f"`{c[i][0]}`", str(c[i][1])] if i < len(c) else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        classes = hints.get("classes") or {}
        if any(classes.values()):
            lines += ["", f"What kind of step the hints of **{arm}** are (share of samples; the base's accuracy after "
                      "such a hint):", "",
                      "| hint | first training step | last training step | held-out, final models |",
                      "|---|---|---|---|"]
            names = next(v for v in classes.values() if v)
            for name in names:
                cells = []
                for key in ("first_step", "last_step", "heldout"):
                    c = (classes.get(key) or {}).get(name)
                    acc = "" if not c or c["accuracy"] is None else f", {100 * c['accuracy']:.0f}% correct"
                    cells.append("n/a" if not c else f"{100 * c['share']:.1f}% (n={c['n']}{acc})")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def beyond_html(markdown: str, heading: str = "Beyond the degenerate MDP") -> str:
    """The section's markdown (:func:`beyond_markdown`, :func:`exact_two_llm_markdown`; or another section's,
    under ``heading``) for ``report.html``: its tables as HTML tables, its other lines as paragraphs; "" for no
    text."""
    if not markdown.strip():
        return ""
    import html

    out, table = [], []

    def cells(r: str, tag: str) -> str:
        return "".join(f"<{tag}>{html.escape(c.strip().replace(chr(92) + '|', '|'))}</{tag}>"
                       for c in r.strip("|").split(" | "))

    def flush() -> None:
        if table:
            head, body = table[0], [r for r in table[2:]]
            out.append("<table><tr>" + cells(head, "th") + "</tr>"
                       + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in body) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line.lstrip('- ').replace('**', ''))}</p>")
    flush()
    return f"<h2>{html.escape(heading)}</h2>" + "".join(out)


EXACT_PRESETS = ("grpo_nokl", "isft+-adv", "isft+", "isft-", "isft+_seqsum_const", "dr_grpo", "reinforce")


def exact_two_llm_markdown(exact: dict | None) -> str:
    """The exact tier's two-LLM case (``exact.json``'s ``two_llm``, :mod:`tokenmdp.experiments.exact.env`): each
    preset's cosine with grad J in both variants next to the degenerate MDP, and the identities; "" without it."""
    two = (exact or {}).get("two_llm")
    if not two or not two.get("comparison"):
        return ""
    variants = [v for v in ("alternate", "hint") if v in two.get("variants", {})]
    lines = ["Exact tier, two LLMs (every group enumerated, no sampling): a frozen random base writes tokens between "
             "or after the policy's; the cosine of each preset's expected update with grad J.", "",
             "| preset | " + " | ".join(variants) + " | degenerate MDP |", "|---" * (len(variants) + 2) + "|"]
    for name in EXACT_PRESETS:
        row = two["comparison"].get(name)
        if row:
            cells = [f"{row[v]['cosine']:.4f}" if v in row else "n/a" for v in variants + ["degenerate"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in variants:
        ids = two["variants"][v].get("identities", {})
        lines.append(f"- {v}: isft+-adv equals grpo_nokl group by group (relative difference "
                     f"{ids.get('isft+-adv_vs_grpo_nokl_group_rel_diff', float('nan')):.1e}); the base's rows get an "
                     f"update of {ids.get('env_rows_max_abs_update', float('nan')):g}; SFT on the whole transcript "
                     f"(base tokens not masked) has cosine {ids.get('transcript_sft_cosine', float('nan')):.3f} with "
                     f"grad J.")
    return "\n".join(lines)


__all__ = ["beyond_markdown", "beyond_html", "exact_two_llm_markdown"]
