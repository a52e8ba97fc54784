"""`tokenmdp compare`: the algorithms side by side on the same prompts and seeds, held-out evaluation, report."""

from __future__ import annotations

from pathlib import Path

import typer

from tokenmdp.commands._common import split_list
from tokenmdp.commands.report import print_summary
from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.compare.settings import EXECUTORS, presets_help
from tokenmdp.train.config import config_choices


def parse_mapping(text: str | None, option: str, shape: str) -> dict | None:
    """``--arms`` / ``--extra-evals``: a YAML file's path, or YAML/JSON text, holding a mapping; one error naming
    ``option`` otherwise (``shape`` says what the mapping holds)."""
    if text is None:
        return None
    import yaml

    path = Path(text).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # inline YAML longer than a file name may be
        is_file = False
    source = path.read_text() if is_file else text
    try:
        value = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise TokenMDPError(f"{option}: not valid YAML or JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TokenMDPError(f"{option}: expected a mapping of {shape}, got {value!r}")
    return value


def parse_arms(text: str | None) -> dict | None:
    """``--arms``: a mapping of arm names (:func:`parse_mapping`)."""
    return parse_mapping(text, "--arms", "arm names to {algo, set, steps}")


def compare_cmd(
    algos: list[str] | None = typer.Option(None, "--algos", help="Comma-separated presets "
                                           "(default: grpo,dr_grpo,ppo,rloo,isft+,isft+-)."),
    preset: str | None = typer.Option(None, "--preset", help=presets_help()),
    seeds: int | None = typer.Option(None, "--seeds", min=1, help="Number of seeds (0..n-1; default 3)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Training steps per run (default: sized for CPU)."),
    model: str | None = typer.Option(None, "--model", help="Base model folder (default: the embedded tiny model)."),
    task: str | None = typer.Option(None, "--task", help="countdown (default), gsm8k or pkg.module:Class."),
    option: list[str] | None = typer.Option(None, "--task-option", "-o", help="Task option KEY=VALUE, repeatable."),
    template: str | None = typer.Option(None, "--template", help="Prompt template (default: from tokenmdp.json)."),
    chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Each prompt as the user turn of the model's "
                                     "chat template, in training and evaluation (default: off)."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Output folder."),
    eval_n: int | None = typer.Option(None, "--eval-n", min=1, help="Held-out problems (test split, never trained "
                                      "on; default 500)."),
    k: int | None = typer.Option(None, "--k", min=1, help="Held-out samples per problem (pass@k, majority@k)."),
    prompts_per_step: int | None = typer.Option(None, "--prompts-per-step", min=1, help="Prompts per training step."),
    group_size: int | None = typer.Option(None, "--group-size", min=1, help="Samples per prompt in training."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default: tokenmdp.json."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate of every algorithm (default: 1e-4 "
                                      "for the embedded tiny model, else the trainer's)."),
    engine: str | None = typer.Option(None, "--engine", help="Rollout engine: " + ", ".join(
        config_choices("rollout", "engine")) + " (default: fast)."),
    eval_every: int | None = typer.Option(None, "--eval-every", min=0, help="Steps between the trainer's held-out "
                                          "accuracy points (default: steps // 4; 0: off)."),
    report_to: str | None = typer.Option(None, "--report-to", help="Trackers, comma-separated: " + ", ".join(
        config_choices("run", "report_to")) + " (default: none; accelerate's trackers, writing in each run folder)."),
    executor: str | None = typer.Option(None, "--executor", help="Where the runs go: " + "; ".join(
        f"{k}: {v}" for k, v in EXECUTORS.items()) + " (default: local)."),
    address: str | None = typer.Option(None, "--address", help="--executor ray: the Ray cluster's address (default: "
                                       "start a local Ray with --workers x --threads CPUs)."),
    gpus_per_run: float | None = typer.Option(None, "--gpus-per-run", min=0, help="--executor ray: GPUs each run "
                                              "asks of the cluster (default 0)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Training config override key=value, repeatable."),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Where the embedded base model is cached."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: 1 for the "
                                       "embedded tiny model, the fastest on a small CPU; else torch's default)."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Runs trained in parallel processes "
                                       "(default: 2 for the embedded tiny model on a machine with 2+ CPUs, else 1)."),
    arms: str | None = typer.Option(None, "--arms", help="Named arms, as YAML/JSON or a YAML file: {name: {algo: "
                                    "PRESET, set: [config overrides], steps: N}}; list the names in --algos."),
    extra_evals: str | None = typer.Option(None, "--extra-evals", help="More held-out evaluations of every final "
                                           "model and the base, as YAML/JSON or a YAML file: {name: {temperature, k, "
                                           "n, greedy}} (n: the first n problems; a missing key: the main one's; "
                                           "replaces a preset's own)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain runs already finished in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary rows as one JSON document."),
) -> None:
    """Train each algorithm for each seed on the same prompt stream, evaluate every final model and the base model
    on one fixed held-out set, and write summary.csv, summary.md, plots/ and report.html into --out."""
    from tokenmdp.commands.tasks import parse_options
    from tokenmdp.experiments.compare import compare

    opts = {"task_kwargs": parse_options(option) or None, "template": template, "chat": chat,
            "max_new_tokens": max_new_tokens,
            "lr": lr, "engine": engine, "eval_every": eval_every, "report_to": report_to,
            "overrides": list(set_) if set_ else None, "cache_dir": cache_dir, "threads": threads,
            "workers": workers, "arms": parse_arms(arms), "executor": executor, "address": address,
            "gpus_per_run": gpus_per_run,
            "extra_evals": parse_mapping(extra_evals, "--extra-evals", "names to {temperature, k, n, greedy}")}
    for name, value in (("prompts_per_step", prompts_per_step), ("group_size", group_size)):
        if value is not None:
            opts[name] = value
    kw = {"steps": steps} if steps is not None else {}
    if k is not None:
        kw["k"] = k
    folder = compare(split_list(algos), seeds, model=model, task=task, out=out, eval_n=eval_n, preset=preset,
                     overwrite=overwrite, **kw, **opts)
    print_summary(folder, [folder], as_json)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_cmd)
