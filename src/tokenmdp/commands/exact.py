"""`tokenmdp exact`: every algorithm's exact expected update and dynamics on an enumerable token MDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tokenmdp.commands._common import console, emit_json, err_console, split_list

D = {"group_size": 4, "steps": 30, "lr": 0.1, "seed": 0, "max_len": 3, "vocab": 3, "init_scale": 1.0}
ENVS = ("both", "token", "two_llm")
ENV_D = {"max_len": 2, "vocab": 3, "env_after": "1", "base_seed": 1, "base_scale": 1.0}


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


def _print_env(env: dict[str, Any]) -> None:
    """The two-LLM case: per preset, cosine / norm ratio / J after the dynamics in each variant and on the
    degenerate MDP of the same budget; then each variant's identities."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    say = lambda text: console.print(escape(text), highlight=False)  # noqa: E731 - brackets are text here
    cases = {**env["variants"], "degenerate": env["degenerate"]}
    for name, doc in cases.items():
        mdp, start = doc["mdp"], doc["start"]
        say(f"{name}: {mdp['description']}")
        say(f"  {mdp['num_sequences']} episodes ({mdp['num_correct']} correct), {mdp['num_groups']} groups; start "
            f"J {start['J']:.4f}, |grad J| {doc['grad_J_norm']:.4g}")
    g = next(iter(cases.values()))["group_size"]
    table = Table(title=f"two-LLM case: exact expected updates, G = {g}", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("preset", no_wrap=True)
    for case in cases:
        table.add_column(case, justify="right", no_wrap=True)
    for preset, row in env["comparison"].items():
        table.add_row(escape(preset), *[f"{row[c]['cosine']:.4f} {row[c]['norm_ratio']:.3f} {row[c]['final_J']:.3f}"
                                        for c in cases])
    console.print(table)
    say("each cell: cosine with grad J, |U| / |grad J|, J after the dynamics; lengths and normalisers count the "
        "policy's tokens only")
    for name, doc in env["variants"].items():
        ids = doc["identities"]
        say(f"{name}: isft+-adv vs grpo_nokl group by group: max |diff| "
            f"{ids['isft+-adv_vs_grpo_nokl_group_max_abs_diff']:.3g} "
            f"(relative {ids['isft+-adv_vs_grpo_nokl_group_rel_diff']:.3g}); isft+_seqsum_const cosine "
            f"{ids['isft+_seqsum_cosine']:.6f}, scale {ids['isft+_seqsum_scale']:.4f} (1/L); dr_grpo scale "
            f"{ids['dr_grpo_scale']:.4f}; largest update on the {ids['env_rows']} base rows "
            f"{ids['env_rows_max_abs_update']:.3g}; SFT on the whole transcript (base tokens unmasked): cosine "
            f"{ids['transcript_sft_cosine']:.4f}, {ids['transcript_sft_env_share']:.0%} of it on base rows")
    say(f"two-LLM case: {env['seconds']:.1f} s")


def _env_after(text: str) -> tuple[int, ...]:
    from tokenmdp.errors import TokenMDPError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TokenMDPError(f"exact: --env-after takes comma-separated policy positions, got {text!r}") from None


def exact_cmd(
    group_size: int = typer.Option(D["group_size"], "--group-size", "-g", min=2, help="Responses per group (G)."),
    steps: int = typer.Option(D["steps"], "--steps", min=0, help="Steps of the exact dynamics."),
    lr: float = typer.Option(D["lr"], "--lr", help="Step length (unit-length steps) or SGD step size (--raw)."),
    max_len: int | None = typer.Option(None, "--max-len", min=1, help="Longest response (policy tokens, EOS "
                                       f"included; default {D['max_len']}, {ENV_D['max_len']} for --env two_llm; "
                                       "with --env both it sets the token MDP only)."),
    vocab: int | None = typer.Option(None, "--vocab", min=2, help="Vocabulary size: EOS plus vocab - 1 tokens "
                                     f"(default {D['vocab']}; with --env both it sets the token MDP only)."),
    env: str = typer.Option("both", "--env", help="token: the degenerate token MDP; two_llm: a frozen stochastic "
                            "base writes tokens between the policy's (masked out of every loss), next to the "
                            "degenerate MDP of the same budget; both (default)."),
    env_variant: list[str] | None = typer.Option(None, "--env-variant", help="two-LLM variants, comma-separated: "
                                                 "alternate, hint (default: both)."),
    env_after: str = typer.Option(ENV_D["env_after"], "--env-after", help="alternate: the base writes one token "
                                  "after each of these policy positions (comma-separated, 1..max-len)."),
    base_seed: int = typer.Option(ENV_D["base_seed"], "--base-seed", help="Seed of the frozen base's table."),
    base_scale: float = typer.Option(ENV_D["base_scale"], "--base-scale", help="The base's logits ~ scale * "
                                     "N(0, 1) (0: uniform)."),
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
    from tokenmdp.errors import TokenMDPError
    from tokenmdp.experiments.exact import run_exact, run_exact_env, save_exact

    if env not in ENVS:
        raise TokenMDPError(f"exact: unknown --env {env!r}; choose from {', '.join(ENVS)}")
    common = dict(group_size=group_size, steps=steps, lr=lr, seed=seed, presets=split_list(presets),
                  normalize=not raw, init_scale=init_scale)
    result: dict[str, Any] = {}
    if env != "two_llm":
        result = run_exact(max_len=max_len or D["max_len"], vocab=vocab or D["vocab"],
                           **common)  # type: ignore[arg-type]
    if env != "token":
        own = env == "two_llm"
        result["two_llm"] = run_exact_env(
            env_variants=split_list(env_variant) or ("alternate", "hint"), env_after=_env_after(env_after),
            max_len=(max_len if own and max_len else ENV_D["max_len"]), base_seed=base_seed,
            vocab=(vocab if own and vocab else ENV_D["vocab"]), base_scale=base_scale,
            **common)  # type: ignore[arg-type]
    if out is not None:
        from tokenmdp.experiments.exact.plots import exact_figures

        figures = exact_figures(result) if "presets" in result else {}
        for name, doc in result.get("two_llm", {}).get("variants", {}).items():
            figures.update({f"two_llm_{name}_{k.removeprefix('exact_')}": v for k, v in exact_figures(doc).items()})
        path = save_exact(result, out, figures)
        err_console.print(f"wrote {path} and {path.parent / 'plots'}", highlight=False)
    if as_json:
        emit_json(result)
        return
    if "presets" in result:
        _print(result)
    if "two_llm" in result:
        _print_env(result["two_llm"])


def register(app: typer.Typer) -> None:
    app.command("exact")(exact_cmd)
