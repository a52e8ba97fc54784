"""`tokenmdp demo`: the main job (`tokenmdp compare` with its defaults); `tokenmdp demo --tabular`: the tabular demo.

:func:`tabular_demo` runs (1) exact and iterative evaluation of the random policy on Sutton & Barto's 4x4
gridworld (figure 4.1) and (2) Q-learning vs SARSA on cliff walking (example 6.6), printing values, greedy
policies and paths. It takes about a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from tokenmdp.commands._common import console as stdout_console
from tokenmdp.commands._common import emit_json, err_console
from tokenmdp.experiments.simulated.sweep import DEFAULTS, run_sweep, save_sweep
from tokenmdp.progress import progress_bar


def _gridworld_part(out: Console | None) -> dict[str, Any]:
    from tokenmdp.mdp.tabular import gridworld4x4
    from tokenmdp.solvers import evaluate_policy, iterative_evaluation, policy_picture, value_iteration
    from tokenmdp.solvers.show import value_table

    mdp = gridworld4x4()
    exact = evaluate_policy(mdp)
    sweep = iterative_evaluation(mdp, in_place=True, tol=1e-10)
    opt = value_iteration(mdp)
    diff = float(np.abs(exact.V - sweep.V).max())
    if out is not None:
        out.rule("1. Gridworld 4x4 (Sutton & Barto example 4.1), random policy, gamma 1")
        out.print(value_table(mdp, exact.V, "V of the random policy (exact linear solve)"))
        out.print(f"in-place iterative evaluation: {sweep.iterations} sweeps, max |difference| {diff:.1e}")
        out.print("greedy policy w.r.t. that V (already optimal here):")
        out.print(policy_picture(mdp, exact.greedy), markup=False, highlight=False)
        out.print(f"value iteration: optimal V(s) = -(steps to the nearest corner), {opt.iterations} sweeps\n")
    return {
        "V_random": exact.V.reshape(4, 4), "iterative_sweeps": sweep.iterations, "iterative_max_diff": diff,
        "V_optimal": opt.V.reshape(4, 4), "optimal_sweeps": opt.iterations,
    }


def _cliff_part(out: Console | None, *, seed: int, episodes: int, epsilon: float, alpha: float) -> dict:
    from tokenmdp.mdp.tabular import cliff_walking
    from tokenmdp.solvers import greedy_path, path_picture, td_control

    mdp = cliff_walking()
    if out is not None:
        out.rule(f"2. Cliff walking (example 6.6): epsilon {epsilon}, step size {alpha}, {episodes} episodes")
    summary: dict[str, Any] = {}
    table = Table(title="learned on cliff walking")
    for col in ("method", "greedy path steps", "greedy return", f"mean return, last {episodes // 5}"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for rule in ("q-learning", "sarsa"):
        res = td_control(mdp, rule, episodes=episodes, epsilon=epsilon, alpha=alpha, seed=seed)
        path = greedy_path(mdp, res.greedy)
        online = float(np.mean(res.history["return"][-max(1, episodes // 5):]))
        summary[rule] = {"path_steps": path.steps, "path_return": path.ret, "path_reason": path.reason,
                         "path": path.states, "online_return": online}
        table.add_row(rule, str(path.steps), f"{path.ret:g}", f"{online:.1f}")
        if out is not None:
            out.print(f"[bold]{rule}[/bold]: greedy path, {path.steps} steps ({path.reason})")
            out.print(path_picture(mdp, path), markup=False, highlight=False)
    if out is not None:
        out.print(table)
        out.print(
            "Q-learning learns the optimal path along the edge but, exploring, falls off the cliff often; SARSA "
            "learns the value of its exploring policy and keeps away from the edge, earning more while it learns."
        )
    return summary


def tabular_demo(
    *, seed: int = 0, episodes: int = 500, epsilon: float = 0.1, alpha: float = 0.5, console: Console | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the tabular demo, print it on ``console`` (stdout by default; nothing if ``quiet``) and return the
    figures: gridworld values, and each TD method's greedy path length and returns on cliff walking."""
    out = None if quiet else (console or stdout_console)
    return {
        "gridworld": _gridworld_part(out),
        "cliff": _cliff_part(out, seed=seed, episodes=episodes, epsilon=epsilon, alpha=alpha),
        "settings": {"seed": seed, "episodes": episodes, "epsilon": epsilon, "alpha": alpha},
    }


def main_job(out: str, *, json_out: bool = False) -> None:
    """The main job: (1) the exact tier (seconds; ``<out>/exact/``), (2) the simulated tier's sweep (a minute;
    ``<out>/sim/``), (3) ``tokenmdp compare --preset demo`` on the embedded base model (``<out>``) and its report,
    whose first section is the verdict on each of the paper's claims (``<out>/claims.json``, ``report.html``,
    ``summary.md``), with the simulated tier's section."""
    from tokenmdp.commands.compare import compare_cmd
    from tokenmdp.experiments.exact import run_exact, run_exact_env, save_exact
    from tokenmdp.experiments.exact.plots import exact_figures

    err_console.rule("1. The exact tier: expected updates on an enumerable token MDP")
    result = run_exact()
    result["two_llm"] = run_exact_env()  # the two-LLM case: a frozen stochastic base between policy tokens
    save_exact(result, Path(out) / "exact", exact_figures(result))
    err_console.print(f"exact tier: {len(result['presets'])} presets in {result['seconds']:.1f} s -> {out}/exact")
    err_console.rule("2. The simulated tier: 200 seeds of sampled training a setting, beside the exact path")
    _simulate(Path(out) / "sim")
    err_console.rule("3. The sampled tier: the embedded tiny model on Countdown (compare --preset demo)")
    _run_compare(compare_cmd, ["--preset", "demo", "--out", out] + (["--json"] if json_out else []))
    if not json_out:
        _print_claims(Path(out) / "claims.json")


#: the main job's simulated sweep (about a minute): the presets of C3 and C4 at a low, a high and a very high rate
DEMO_SIM = {"presets": ["grpo_nokl", "dr_grpo", "isft+", "isft-"], "lrs": [0.03, 0.3, 1.0], "group_sizes": [8],
            "seeds": 200, "steps": 500}


def _simulate(folder: Path) -> None:
    """The simulated tier's sweep of :data:`DEMO_SIM` into ``folder`` (the comparison's report picks it up)."""
    from tokenmdp.experiments.simulated.plots import sim_figures  # matplotlib: loaded only when the demo runs

    settings = {**DEFAULTS, **DEMO_SIM}
    total = len(settings["presets"]) * len(settings["lrs"]) * len(settings["group_sizes"]) * settings["steps"]
    with progress_bar() as bar:
        job = bar.add_task("simulate", total=total, info=f"{len(settings['presets'])} presets x "
                           f"{len(settings['lrs'])} lrs x {settings['seeds']} seeds")
        doc = run_sweep(**settings, progress=lambda n: bar.update(job, advance=n))
    save_sweep(doc, folder, sim_figures(doc))
    err_console.print(f"simulated tier: {len(doc['runs'])} settings in {doc['seconds']:.0f} s -> {folder}")


def _print_claims(path: Path) -> None:
    """The verdicts, one line each, at the end of the demo's output."""
    import json

    if not path.is_file():
        return
    stdout_console.rule("The paper's claims")
    for cid, c in json.loads(path.read_text()).items():
        stdout_console.print(f"{cid} {c['verdict']}: {c['summary']}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        tabular: bool = typer.Option(False, "--tabular", help="Run the tabular MDP demo instead (about a second)."),
        out: str = typer.Option("runs/demo", "--out", help="Output folder of the comparison."),
        seed: int = typer.Option(0, "--seed", help="Seed of the TD learners (--tabular)."),
        episodes: int = typer.Option(500, "--episodes", help="Episodes of Q-learning and SARSA (--tabular)."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    ) -> None:
        """The main job: the paper's claims tested exactly (the exact tier) and by sampling (`tokenmdp compare
        --preset demo` on the embedded tiny base model: GRPO without KL, its supervised twin isft+-adv, filtered
        SFT +-, + and -, and Dr. GRPO over 4 seeds), ending in a verdict for each claim (claims.json, report.html).
        With --tabular: gridworld values and cliff walking (Q-learning vs SARSA)."""
        if tabular:
            result = tabular_demo(seed=seed, episodes=episodes, quiet=json_out)
            if json_out:
                emit_json(result)
            return
        main_job(out, json_out=json_out)


def _run_compare(compare_cmd, args: list[str]) -> None:
    """Run `tokenmdp compare ARGS` in-process (the same command a user types)."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command()(compare_cmd)
    sub(args=args, standalone_mode=False)
