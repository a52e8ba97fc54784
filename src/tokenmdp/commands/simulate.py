"""`tokenmdp simulate`: the simulated tier, sampled training of many seeds on an enumerable token MDP against its
exact infinite-batch path, swept over learning rates and group sizes."""

from __future__ import annotations

from pathlib import Path

import typer

from tokenmdp.commands._common import console, emit_json, err_console, split_list
from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.simulated.sweep import DEFAULTS, run_sweep, save_sweep, sweep_markdown
from tokenmdp.progress import plain_log, progress_bar

D = DEFAULTS


def _numbers(values: list[str] | None, default: list, option: str, kind: type = float) -> list:
    """A comma-separated option as numbers of ``kind`` (``default`` when not given); one error naming it."""
    items = split_list(values)
    if not items:
        return list(default)
    try:
        return [kind(x) for x in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise TokenMDPError(f"simulate: {option} takes comma-separated {what}, got {','.join(items)!r}") from None


def simulate_cmd(
    presets: list[str] | None = typer.Option(None, "--presets", help="Comma-separated presets (default: "
                                             f"{','.join(D['presets'])})."),
    lrs: list[str] | None = typer.Option(None, "--lrs", help="Comma-separated learning rates (default: "
                                         f"{','.join(map(str, D['lrs']))})."),
    group_sizes: list[str] | None = typer.Option(None, "--group-sizes", help="Comma-separated group sizes "
                                                 f"(default: {','.join(map(str, D['group_sizes']))}; at most 10)."),
    seeds: int = typer.Option(D["seeds"], "--seeds", min=2, help="Policies trained side by side per setting."),
    steps: int = typer.Option(D["steps"], "--steps", min=1, help="Steps of each run (one group a step)."),
    optimizer: str = typer.Option(D["optimizer"], "--optimizer", help="adam (as the trainers) or sgd (whose "
                                  "small-lr mean path is the exact one)."),
    untied: bool = typer.Option(False, "--untied", help="A logit table per state only, without the token bias "
                                "shared by every state."),
    start_seed: int = typer.Option(D["start_seed"], "--start-seed", help="Seed of the start policy."),
    seed: int = typer.Option(D["seed"], "--seed", help="Seed of the sampling."),
    out: Path | None = typer.Option(None, "--out", help="Write sim.json, summary.md and plots/*.png here."),
    as_json: bool = typer.Option(False, "--json", help="Print sim.json instead of the tables."),
) -> None:
    """Sampled training of hundreds of seeds on an enumerable token MDP (tabular softmax policy, the project's own
    losses, Adam), each setting next to the exact path of its expected update: collapse rates, the drift of the
    wrong answers' length, entropy."""
    names = split_list(presets) or list(D["presets"])
    rates = _numbers(lrs, D["lrs"], "--lrs")
    sizes = _numbers(group_sizes, D["group_sizes"], "--group-sizes", int)
    total = len(names) * len(rates) * len(sizes) * steps
    log, done = plain_log(not as_json), [0]

    def advance(n: int) -> None:
        bar.update(job, advance=n)
        done[0] += n
        if log is not None and done[0] % steps == 0:
            log(f"[simulate] {done[0] // steps} of {total // steps} settings done")

    with progress_bar(not as_json) as bar:
        job = bar.add_task("simulate", total=total, info=f"{len(names)} presets x {len(rates)} lrs x {len(sizes)} "
                           f"group sizes x {seeds} seeds")
        doc = run_sweep(presets=names, lrs=rates, group_sizes=sizes, seeds=seeds, steps=steps, optimizer=optimizer,
                        tied=not untied, start_seed=start_seed, seed=seed, progress=advance)
    if out is not None:
        from tokenmdp.experiments.simulated.plots import sim_figures  # matplotlib: only when --out asks for figures

        path = save_sweep(doc, out, sim_figures(doc))
        err_console.print(f"wrote {path}, {path.parent / 'summary.md'} and {path.parent / 'plots'}", highlight=False)
    if as_json:
        emit_json(doc)
        return
    console.print(sweep_markdown(doc), markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)
