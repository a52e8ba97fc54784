"""``tokenmdp train`` (train a policy from a YAML config) and ``tokenmdp algos`` (the algorithm presets)."""

from __future__ import annotations

from pathlib import Path

import typer

from tokenmdp.commands._common import console, emit_json, err_console
from tokenmdp.errors import TokenMDPError

SUMMARY_KEYS = ("reward/mean", "reward/accuracy", "reward/format", "length/correct", "length/incorrect",
                "policy/entropy", "policy/kl_ref", "policy/approx_kl", "policy/clip_frac", "eval/accuracy",
                "eval/sampled_accuracy", "time/step")


def presets_table(as_json: bool) -> None:
    """Print the presets and their choices (a rich table, or JSON)."""
    from tokenmdp.algos.presets import PRESETS

    if as_json:
        emit_json({name: {"description": spec.description, **spec.choices()} for name, spec in PRESETS.items()})
        return
    from rich import box
    from rich.table import Table

    table = Table(title="algorithm presets: tokenmdp train --algo NAME [--set algo.FIELD=VALUE]",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("name", "kind", "advantage", "aggregation", "clip", "KL", "epochs"):
        table.add_column(col, no_wrap=True)
    for name, spec in PRESETS.items():
        clip_high = spec.clip_high if spec.clip_high is not None else spec.clip_low
        clip = "-" if spec.kind != "pg" else f"{spec.clip_low}/{clip_high}"
        kl = f"{spec.kl_coef} {spec.kl_estimator} in {spec.kl_in}" if spec.kind == "pg" and spec.kl_coef > 0 else "-"
        if spec.kind == "dpo":
            kl = f"beta {spec.dpo_beta}"
        adv = spec.advantage if spec.kind == "pg" or spec.isft_weighting == "advantage" else "-"
        table.add_row(name, spec.kind, adv, spec.aggregation if spec.kind != "dpo" else "-", clip, kl, str(spec.epochs))
    console.print(table)
    for name, spec in PRESETS.items():
        console.print(f"[bold]{name}[/bold]: {spec.description}", highlight=False)


def _config(config: Path | None, algo: str | None, sets: list[str], out: Path | None, resume: bool,
            overwrite: bool, steps: int | None, seed: int | None):
    from tokenmdp.train.config import load_config
    from tokenmdp.train.run_dir import nothing_done

    overrides = list(sets)
    if algo:
        overrides.insert(0, f"algo.name={algo}")
    for key, value in (("run.out", out), ("run.steps", steps), ("run.seed", seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if overwrite:
        overrides.append("run.overwrite=true")
    if config is None and resume:
        if out is None:
            raise TokenMDPError("--resume needs --out DIR (the run folder) or --config FILE")
        if (out / "config.yaml").is_file():
            config = out / "config.yaml"
        elif not nothing_done(out):
            raise TokenMDPError(f"cannot resume {out}: no config.yaml there")
        # else: killed before it wrote anything; the arguments given (those of the first command) start it afresh
    cfg = load_config(config, overrides)
    if not cfg.model.path:  # the embedded base model: train() is handed its folder
        from tokenmdp.base.store import ensure_tiny_base

        cfg.model.path = str(ensure_tiny_base(cfg.model.cache_dir))
    return cfg


def _summary(run_dir: Path, as_json: bool) -> None:
    from tokenmdp.train.log import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    last = records[-1] if records else {}
    evals = [r for r in records if r.get("eval/accuracy") is not None]
    if as_json:
        emit_json({"run_dir": str(run_dir), "steps": last.get("step", 0), "last": last,
                   "eval": evals[-1] if evals else None})
        return
    from rich.table import Table

    table = Table(title=f"{run_dir} (step {last.get('step', 0)})")
    table.add_column("metric")
    table.add_column("last step", justify="right")
    for key in SUMMARY_KEYS:
        value = last.get(key)
        if value is None and evals:
            value = evals[-1].get(key)
        if value is not None:
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (sections model, task, "
                                              "rollout, algo, optim, run); defaults: tiny base model on Countdown."),
        algo: str | None = typer.Option(None, "--algo", help="Algorithm preset (see --list-algos)."),
        sets: list[str] = typer.Option([], "--set", help="Override a field: --set optim.lr=3e-4 (repeatable)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<algo>-seed<seed>)."),
        steps: int | None = typer.Option(None, "--steps", help="Training steps (run.steps)."),
        seed: int | None = typer.Option(None, "--seed", help="Seed of the prompt stream and sampling (run.seed)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
        list_algos: bool = typer.Option(False, "--list-algos", help="Print the algorithm presets and exit."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Train a policy with one algorithm of the family; writes a run folder (metrics, samples, checkpoints)."""
        if list_algos:
            presets_table(as_json)
            return
        cfg = _config(config, algo, sets, out, resume, overwrite, steps, seed)
        from tokenmdp.train.run_dir import nothing_done
        from tokenmdp.train.trainer import train

        if resume and nothing_done(cfg.run_dir()):  # stopped before it wrote anything: nothing to continue
            err_console.print(f"{cfg.run_dir()}: nothing of the run was written yet; starting it from step 0",
                              soft_wrap=True, markup=False, highlight=False)
            resume = False

        run_dir = train(cfg, resume=resume, progress=not no_progress)
        _summary(run_dir, as_json)

    @app.command("algos")
    def algos_cmd(as_json: bool = typer.Option(False, "--json", help="Print the presets as JSON.")) -> None:
        """List the algorithm presets and the choice each makes on every axis."""
        presets_table(as_json)
