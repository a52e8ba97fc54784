"""`tokenmdp mdp list | show NAME | solve NAME`: tabular MDPs printed and solved."""

from __future__ import annotations

from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmdp.commands._common import console, emit_json, err_console
from tokenmdp.errors import TokenMDPError

mdp_app = typer.Typer(
    help="Tabular MDPs: list the built-in ones, print P and r, solve them exactly or by sampling.",
    no_args_is_help=True,
)

JSON_HELP = "Print one JSON document on stdout instead of tables."
NAME_HELP = "A built-in MDP (see `tokenmdp mdp list`) or a .json/.yaml file with P, r, gamma."


def register(app: typer.Typer) -> None:
    app.add_typer(mdp_app, name="mdp")


@mdp_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in MDPs."""
    from rich.table import Table

    from tokenmdp.mdp.tabular_io import MDP_REGISTRY

    if json_out:
        emit_json([{"name": k, "description": d} for k, (_, d) in MDP_REGISTRY.items()])
        return
    table = Table(title="built-in MDPs")
    table.add_column("name")
    table.add_column("description")
    for name, (_, desc) in MDP_REGISTRY.items():
        table.add_row(name, desc)
    console.print(table)


def _summary(mdp) -> str:
    import numpy as np
    from rich.markup import escape

    term = ", ".join(mdp.state_names[s] for s in np.flatnonzero(mdp.terminal)) or "none"
    starts = np.flatnonzero(mdp.start > 0)
    start = ", ".join(f"{mdp.state_names[s]}:{mdp.start[s]:.3g}" for s in starts[:8])
    if starts.size > 8:
        start += f", ... ({starts.size} states)"
    return (
        f"[bold]{escape(mdp.name)}[/bold]: {mdp.n_states} states, {mdp.n_actions} actions "
        f"({escape(', '.join(mdp.action_names))}), gamma {mdp.gamma:g}\n"
        f"terminal: {escape(term)}\nstart: {escape(start)}"
    )


@mdp_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help=NAME_HELP),
    gamma: float = typer.Option(None, "--gamma", help="Override the discount."),
    seed: int = typer.Option(None, "--seed", help="Seed of the `random` MDP."),
    dense: bool = typer.Option(
        None, "--dense/--sparse", help="P as one matrix per action, or as a list of transitions "
        "(default: dense up to 8 states)."
    ),
    limit: int = typer.Option(60, "--limit", help="Most transitions listed in sparse form (0: all)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Print an MDP: its states, actions, start and terminal states, P and r."""
    from tokenmdp.mdp.tabular_io import get_mdp
    from tokenmdp.solvers.show import dense_tables, transition_table

    mdp = get_mdp(name, gamma=gamma, seed=seed)
    if json_out:
        emit_json(mdp.to_dict())
        return
    console.print(_summary(mdp))
    use_dense = mdp.n_states <= 8 if dense is None else dense
    for table in dense_tables(mdp) if use_dense else [transition_table(mdp, limit=limit)]:
        console.print(table)


def _progress_run(method: str, episodes: int, run: Any) -> Any:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(method, total=episodes)
        return run(lambda done: bar.update(task, completed=done))


@mdp_app.command("solve")
def solve_cmd(
    name: str = typer.Argument(..., help=NAME_HELP),
    method: str = typer.Option(
        "vi", "--method", "-m",
        help="vi | pi | eval (random policy, exact) | iterative-eval | q-learning | sarsa | expected-sarsa | "
        "reinforce.",
    ),
    gamma: float = typer.Option(None, "--gamma", help="Override the discount."),
    episodes: int = typer.Option(None, "--episodes", help="Episodes of sampling methods (TD 500, REINFORCE 1000)."),
    epsilon: float = typer.Option(0.1, "--epsilon", help="Exploration of the TD methods (epsilon-greedy)."),
    alpha: float = typer.Option(None, "--alpha", help="Step size of sampling methods (default 0.5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling methods and of the `random` MDP."),
    max_steps: int = typer.Option(None, "--max-steps", help="Longest episode of sampling methods."),
    limit: int = typer.Option(50, "--limit", help="Most states listed in the Q table (0: all)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Solve an MDP and print V, Q and the greedy policy (arrows on grid worlds)."""
    from rich.markup import escape

    from tokenmdp.mdp.tabular_io import get_mdp
    from tokenmdp.solvers import DP_METHODS, METHODS, solve
    from tokenmdp.solvers.show import greedy_path, path_picture, policy_picture

    if method not in METHODS:
        raise TokenMDPError(f"--method: unknown method '{method}'; known: {', '.join(METHODS)}")
    mdp = get_mdp(name, gamma=gamma, seed=seed)
    kw = dict(episodes=episodes, alpha=alpha, epsilon=epsilon, seed=seed, max_steps=max_steps)
    if method in DP_METHODS or json_out:
        result = solve(mdp, method, **kw)
    else:
        total = episodes or (1000 if method == "reinforce" else 500)
        result = _progress_run(method, total, lambda cb: solve(mdp, method, progress=cb, **kw))
    path = greedy_path(mdp, result.greedy)
    if json_out:
        out = {"mdp": mdp.name, "gamma": mdp.gamma, **result.to_dict(mdp), "history": result.history}
        out["picture"] = policy_picture(mdp, result.greedy)
        emit_json(out)
        return
    console.print(_summary(mdp))
    console.print(f"method {result.method}: {result.iterations} iterations, converged {result.converged}")
    for table in result.tables(mdp, limit=limit):
        console.print(table)
    if mdp.grid is not None:
        console.print("[bold]greedy policy[/bold] (argmax Q)")
        console.print(policy_picture(mdp, result.greedy), highlight=False, markup=False)
    console.print(
        f"[bold]greedy path[/bold] from {escape(mdp.state_names[path.states[0]])}: {path.steps} steps, "
        f"return {path.ret:.4g} (stopped: {path.reason})"
    )
    console.print(path_picture(mdp, path), highlight=False, markup=False)
