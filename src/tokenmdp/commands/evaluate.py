"""`tokenmdp eval`: held-out greedy / sampled pass@1, pass@k, majority vote, best-of-n and lengths of a model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tokenmdp.commands._common import console, emit_json
from tokenmdp.progress import progress_bar
from tokenmdp.commands.tasks import TASKS
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import config_choices

PERCENT = ("greedy/pass@1", "sampled/pass@1", "pass@k", "majority@k", "best_of_k", "greedy/format_rate",
           "sampled/format_rate", "sampled/truncated_rate")


def eval_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help="Model folder, .gguf file or hub id "
                                     "(default: the embedded tiny base model, built on first use)."),
    task: str | None = typer.Option(None, "--task", "-t", help=f"{TASKS} or pkg.module:Class "
                                    "(default: the model folder's tokenmdp.json, else countdown)."),
    data: Path | None = typer.Option(None, "--data", help="A local JSONL/Parquet file of problems (else the split)."),
    split: str = typer.Option("test", "--split", help="The task split when --data is not given."),
    n: int = typer.Option(500, "--n", min=1, help="Number of problems."),
    k: int = typer.Option(8, "--k", min=1, help="Samples per problem for sampled pass@1, pass@k, majority, best-of-k."),
    n_samples: int | None = typer.Option(None, "--n-samples", help="Samples drawn (>= k) for the unbiased pass@k."),
    template: str | None = typer.Option(None, "--template", help="Prompt template (default: from tokenmdp.json)."),
    option: list[str] | None = typer.Option(None, "--task-option", "-o", help="Task option KEY=VALUE, repeatable."),
    chat: bool = typer.Option(False, "--chat", help="Each prompt as the user turn of the model's chat template."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default: tokenmdp.json, else 128."),
    engine: str = typer.Option("fast", "--engine", help="Rollout engine: " + ", ".join(
        config_choices("rollout", "engine")) + "."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Sequences per generate call."),
    no_greedy: bool = typer.Option(False, "--no-greedy", help="Skip the greedy completion."),
    seed: int = typer.Option(0, "--seed", help="Seed of the problem draw and of sampling."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or auto."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: 1 for the "
                                       "embedded tiny model, the fastest on a small CPU; else torch's default)."),
    env_from: Path | None = typer.Option(None, "--env-from", help="Evaluate through the environment (task.env) of "
                                         "this run folder or training config: e.g. a two-LLM run's hint generator "
                                         "with its frozen base."),
    out: Path | None = typer.Option(None, "--out", help="Write metrics, settings and per-problem records as JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics and settings as one JSON document."),
) -> None:
    """Evaluate a model on a task's held-out split (or a local problems file).

    Greedy pass@1, sampled pass@1 (mean over the k samples), pass@k (unbiased estimator), majority vote, best-of-k
    with the verifier, format rate, and the mean length (tokens) of correct and incorrect responses.
    """
    result = run_eval_command(model=model, task=task, data=data, split=split, n=n, k=k, n_samples=n_samples,
                              template=template, option=option, temperature=temperature,
                              max_new_tokens=max_new_tokens, engine=engine, batch_size=batch_size,
                              greedy=not no_greedy, seed=seed, device=device, dtype=dtype, threads=threads,
                              chat=chat, env_from=env_from)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if as_json:
        emit_json({key: result[key] for key in ("metrics", "settings", "time_s")})
        return
    _print_table(result)


def run_eval_command(*, model, task, data, split, n, k, n_samples, template, option, temperature, max_new_tokens,
                     engine, batch_size, greedy, seed, device, dtype, threads, chat: bool = False,
                     env_from: Path | None = None) -> dict:
    """Resolve the defaults (the embedded model, ``tokenmdp.json``), load, evaluate with a progress bar."""
    from tokenmdp.commands.tasks import parse_options
    from tokenmdp.train.heldout import evaluate, load_eval_problems, resolve_eval_setup
    from tokenmdp.policy.model import load_policy
    from tokenmdp.tasks import get_task

    if model is None:
        from tokenmdp.base.store import ensure_tiny_base

        model = str(ensure_tiny_base())
        threads = threads or 1
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    setup = resolve_eval_setup(model, task, parse_options(option), template, max_new_tokens)
    task_obj = get_task(setup["task"], **setup["task_kwargs"])
    problems = load_eval_problems(task_obj, data=data, split=split, n=n, seed=seed)
    policy = load_policy(model, dtype=dtype, device=device)
    env = None if env_from is None else _environment(env_from, task_obj, policy.tokenizer, device)
    total = len(problems) * ((n_samples or k) + (1 if greedy else 0))
    with progress_bar() as bar:
        job = bar.add_task("eval", total=total, info=f"{len(problems)} problems x {n_samples or k} + greedy")
        result = evaluate(policy, None, task_obj, problems, k=k, n_samples=n_samples, engine=engine,
                          temperature=temperature, max_new_tokens=setup["max_new_tokens"], greedy=greedy,
                          batch_size=batch_size, seed=seed, template=setup["template"], chat=chat,
                          progress=lambda m: bar.update(job, advance=m), env=env)
    result["settings"].update(model=str(model), data=str(data) if data else None, split=None if data else split,
                              task_kwargs=setup["task_kwargs"])
    return result


def _environment(env_from: Path, task, tokenizer, device):
    """``--env-from``: the environment of a run folder's ``config.yaml`` (or a training config file), built for
    the evaluated model's tokenizer (a two-LLM environment loads its frozen base: the run's start model unless
    ``task.env.base_path`` names another)."""
    from tokenmdp.train.config import load_config
    from tokenmdp.train.environment import build_environment
    from tokenmdp.train.setup import resolve_settings

    path = Path(env_from).expanduser()
    file = path / "config.yaml" if path.is_dir() else path
    if not file.is_file():
        raise TokenMDPError(f"--env-from: no training config at {file}")
    config = load_config(file)
    if config.task.env.kind == "none":
        raise TokenMDPError(f"--env-from: {file} has no environment (task.env.kind is 'none')")
    return build_environment(config, resolve_settings(config), task, tokenizer, device)


def _print_table(result: dict) -> None:
    from rich.table import Table

    m, s = result["metrics"], result["settings"]
    table = Table(title=f"{s['task']} - {m['n_problems']} problems, k={m['k']}, {result['time_s']:.1f} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in m.items():
        if value is None:
            text = "n/a"
        elif key in PERCENT or key.startswith("pass@"):
            text = f"{100 * value:.1f}%"
        elif isinstance(value, float):
            text = f"{value:.2f}"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
