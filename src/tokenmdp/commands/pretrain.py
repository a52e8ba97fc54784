"""`tokenmdp pretrain`: build (or find) the embedded tiny base model and print its held-out figures."""

from __future__ import annotations

from pathlib import Path

import typer

from tokenmdp.errors import TokenMDPError
from tokenmdp.values import parse_assignments

FIGURES = [
    ("sampled_accuracy", "sampled accuracy (T=1)"),
    ("greedy_accuracy", "greedy accuracy"),
    ("mixed_fraction", "mixed groups"),
    ("all_correct_fraction", "all-correct groups"),
    ("all_wrong_fraction", "all-wrong groups"),
    ("format_rate", "formatted answers"),
    ("truncated_rate", "truncated"),
    ("mean_length", "mean completion length (tokens)"),
    ("mean_length_correct", "  of correct ones"),
    ("mean_length_incorrect", "  of incorrect ones"),
]


def parse_task_args(items: list[str]) -> dict:
    """``["high=20", "num_count=3"]`` -> ``{"high": 20, "num_count": 3}`` (:func:`tokenmdp.values.parse_value`)."""
    return parse_assignments(items, option="--task-arg", example="high=20")


def _print_summary(path: Path, meta: dict, figures: dict | None) -> None:
    from rich.table import Table

    from tokenmdp.commands._common import console

    pre = meta.get("pretrain", {})
    console.print(f"[bold]{path}[/]  task {meta.get('task')} {meta.get('task_kwargs')}, "
                  f"{pre.get('parameters', 0) / 1e6:.2f} M parameters, {pre.get('steps')} steps, "
                  f"trained in {pre.get('train_s')} s, final loss {pre.get('final_loss')}")
    if figures:
        table = Table(title=f"held-out figures ({figures['n_problems']} problems x {figures['k']} samples)")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key, label in FIGURES:
            value = figures.get(key)
            table.add_row(label, "-" if value is None else (f"{value:.1%}" if "length" not in key else f"{value:.1f}"))
        console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_cmd(
        task: str = typer.Option("countdown", "--task", help="Task whose derivational traces to train on."),
        out: Path | None = typer.Option(
            None, "--out", help="Output folder (default: the embedded base model in the cache, "
            "$TOKENMDP_CACHE or ~/.cache/tokenmdp, with the default settings)."),
        steps: int | None = typer.Option(None, "--steps", help="Optimiser steps (default 1500)."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per step."),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (warmup, then cosine)."),
        hidden_size: int | None = typer.Option(None, "--hidden-size", help="Model width."),
        num_layers: int | None = typer.Option(None, "--layers", help="Transformer layers."),
        num_heads: int | None = typer.Option(None, "--heads", help="Attention heads."),
        max_failures: int | None = typer.Option(None, "--max-failures", help="Most dead ends a trace shows "
                                                   "(default 2)."),
        give_up: float | None = typer.Option(None, "--give-up", help="Chance that a trace's writer stops after "
                                                "each dead end (default 0: never; the trace skips ahead to a "
                                                "first move that reaches the target)."),
        bluff: bool | None = typer.Option(None, "--bluff/--no-bluff", help="With --give-up: a writer who "
                                             "stops presents its last attempt as a success, or (default) marks it "
                                             "as a dead end and answers its closest near miss."),
        direct: float | None = typer.Option(None, "--direct", help="Share of traces whose writer answers "
                                               "directly, without search lines (default 0)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the problems, the traces and the initialisation."),
        task_arg: list[str] = typer.Option([], "--task-arg", help="Task setting KEY=VALUE (repeatable), "
                                           "e.g. --task-arg high=20 (default: the embedded base model's)."),
        evaluate: bool = typer.Option(False, "--eval", help="Measure held-out figures; on an existing --out folder, "
                                      "measure only (no training)."),
        eval_problems: int | None = typer.Option(None, "--eval-problems", help="Held-out problems to measure "
                                                 "(default 64; 0: none); giving it implies --eval."),
        k: int = typer.Option(8, "--k", help="Samples per held-out problem (the group size)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default 1: the "
                                              "fastest for a model this small)."),
    ) -> None:
        """Pretrain the tiny base model on derivational search traces (char tokenizer, small Qwen2)."""
        import torch

        from tokenmdp.base.measure import measure_base
        from tokenmdp.base.pretrain import DEFAULT_THREADS, pretrain
        from tokenmdp.base.store import BASE_EVAL, BASE_SETTINGS, cache_root, ensure_tiny_base
        from tokenmdp.commands._common import emit_json
        from tokenmdp.policy.model import read_meta

        if eval_problems is not None and eval_problems > 0:
            evaluate = True  # asking for a number of held-out problems is asking for the measurement
        eval_problems = BASE_EVAL["eval_problems"] if eval_problems is None else eval_problems

        given = {"steps": steps, "batch_size": batch_size, "lr": lr, "hidden_size": hidden_size,
                 "num_layers": num_layers, "num_heads": num_heads, "max_failures": max_failures,
                 "give_up": give_up, "bluff": bluff, "direct": direct}
        settings = {**BASE_SETTINGS, **{key: v for key, v in given.items() if v is not None}, "seed": seed}
        task_kwargs = parse_task_args(task_arg) if task_arg else None
        measure_only = evaluate and out is not None and out.exists() and not overwrite
        if measure_only:
            path = out
        elif out is None and not overwrite and settings == BASE_SETTINGS and task == "countdown" and not task_arg:
            path = ensure_tiny_base(cache_root(), progress=not quiet)  # built in the cache, not the shipped copy
        else:
            if out is None:
                raise TokenMDPError("--out is required when settings differ from the embedded base model's")
            path = pretrain(task, out, task_kwargs=task_kwargs, overwrite=overwrite, progress=not quiet,
                            eval_problems=eval_problems, eval_k=k, threads=threads, **settings)
        meta = read_meta(path)
        figures = meta.get("eval")
        if evaluate and (measure_only or figures is None or figures.get("n_problems") != eval_problems
                         or figures.get("k") != k):
            torch.set_num_threads(threads or DEFAULT_THREADS)
            figures = measure_base(path, n_problems=eval_problems, k=k, seed=seed, progress=not quiet)
        if as_json:
            emit_json({"path": str(path), "pretrain": meta.get("pretrain"), "max_new_tokens": meta["max_new_tokens"],
                       "task": meta.get("task"), "task_kwargs": meta.get("task_kwargs"),
                       "eval": figures if evaluate else meta.get("eval")})
        else:
            _print_summary(path, meta, figures if evaluate else meta.get("eval"))
