"""`tokenmdp exact`: every algorithm's exact expected update and dynamics on an enumerable token MDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tokenmdp.commands._common import console, emit_json, err_console, split_list

D = {"group_size": 4, "steps": 30, "lr": 0.1, "seed": 0, "max_len": 3, "vocab": 3, "init_scale": 1.0}


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _print(result: dict[str, Any]) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    mdp, start = result["mdp"], result["start"]
    say = lambda text: console.print(escape(text), highlight=False)  # noqa: E731 - brackets are text here
    say(mdp["description"])
    say(f"start: J {start['J']:.4f}, E[len | correct] {start['len_correct']:.3f}, E[len | incorrect] "
        f"{start['len_incorrect']:.3f}, P(truncated) {start['p_truncated']:.3f}; "
        f"|grad J| {result['grad_J_norm']:.4g}")
    table = Table(title=f"exact expected updates, G = {result['group_size']}", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for c in ["preset", "cosine", "ratio", "var", "relvar", "dLinc", "shift", "J end"]:
        table.add_column(c, justify="left" if c == "preset" else "right", no_wrap=True)
    for name, p in result["presets"].items():
        table.add_row(escape(name), f"{p['cosine']:.5f}", f"{p['norm_ratio']:.3f}", _fmt(p["variance"], ".3g"),
                      _fmt(p["relative_variance"], ".2f"), f"{p['len_incorrect_slope']:+.3f}",
                      f"{p['len_incorrect_shift']:+.3f}", f"{p['final_J']:.3f}")
    console.print(table)
    say("cosine: with grad J; ratio: |U| / |grad J|; var: per-sample variance G tr Cov(u_g); relvar: var / |U|^2; "
        "dLinc: d E[len | incorrect] per unit step at the start; shift: its change over the dynamics; J end: J "
        "after the dynamics")
    say("identities:")
    for key, value in result["identities"].items():
        text = ", ".join(f"{k} {v:+.4f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.6g}"
        say(f"  {key}: {text}")
    for name, why in result["skipped"].items():
        say(f"skipped {name}: {why}")
    step = "unit-length steps" if result["normalize"] else "plain SGD steps"
    say(f"{result['steps']} {step} of lr {result['lr']:g}; {result['seconds']:.1f} s")


def exact_cmd(
    group_size: int = typer.Option(D["group_size"], "--group-size", "-g", min=2, help="Responses per group (G)."),
    steps: int = typer.Option(D["steps"], "--steps", min=0, help="Steps of the exact dynamics."),
    lr: float = typer.Option(D["lr"], "--lr", help="Step length (unit-length steps) or SGD step size (--raw)."),
    max_len: int = typer.Option(D["max_len"], "--max-len", min=1, help="Longest response (tokens, EOS included)."),
    vocab: int = typer.Option(D["vocab"], "--vocab", min=2, help="Vocabulary size: EOS plus vocab - 1 tokens."),
    seed: int = typer.Option(D["seed"], "--seed", help="Seed of the start policy."),
    init_scale: float = typer.Option(D["init_scale"], "--init-scale", help="Start logits ~ scale * N(0, 1) "
                                     "(0: the uniform policy)."),
    presets: list[str] | None = typer.Option(None, "--presets", help="Comma-separated presets (default: all; "
                                             "those the identities need are always added)."),
    raw: bool = typer.Option(False, "--raw", help="Plain SGD theta += lr * U instead of unit-length steps."),
    out: Path | None = typer.Option(None, "--out", help="Write exact.json and plots/*.png into this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document."),
) -> None:
    """Exact expected update of every algorithm (cosine with grad J, norm ratio, per-sample variance) and its
    population dynamics on a token MDP small enough to enumerate: no sampling noise."""
    from tokenmdp.experiments.exact import run_exact, save_exact

    result = run_exact(group_size=group_size, steps=steps, lr=lr, seed=seed, max_len=max_len, vocab=vocab,
                       presets=split_list(presets), normalize=not raw, init_scale=init_scale)
    if out is not None:
        from tokenmdp.experiments.exact_plots import exact_figures

        path = save_exact(result, out, exact_figures(result))
        err_console.print(f"wrote {path} and {path.parent / 'plots'}", highlight=False)
    if as_json:
        emit_json(result)
        return
    _print(result)


def register(app: typer.Typer) -> None:
    app.command("exact")(exact_cmd)
