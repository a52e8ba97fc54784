"""`tokenmdp tasks list | show NAME`: the verifiable tasks, sample problems, prompts and reference solutions."""

from __future__ import annotations

from typing import Any

import typer

from tokenmdp.commands._common import console, emit_json
from tokenmdp.tasks.registry import known_tasks
from tokenmdp.values import parse_assignments

tasks_app = typer.Typer(help="Verifiable tasks: list them, show sample problems with prompts and a solution.",
                        no_args_is_help=True)

TASKS = ", ".join(known_tasks())  # the registry's names, for help texts that cannot go stale
JSON_HELP = "Print one JSON document on stdout instead of tables."
OPTION_HELP = (
    "A task constructor option KEY=VALUE (VALUE read as YAML), repeatable: e.g. -o num_count=3, "
    "-o data_dir=~/data/gsm8k, -o extraction=flexible, -o 'rewards=[1, 0.1, 0]'."
)


def register(app: typer.Typer) -> None:
    app.add_typer(tasks_app, name="tasks")


def parse_options(options: list[str] | None) -> dict[str, Any]:
    """``["num_count=3", "rewards=[1, 0, 0]"]`` -> ``{"num_count": 3, "rewards": [1, 0, 0]}``
    (:func:`tokenmdp.values.parse_value`)."""
    return parse_assignments(options, option="task option", example="num_count=3")


def _accepts(name: str, option: str) -> bool:
    import inspect

    from tokenmdp.tasks.registry import task_class

    try:
        return option in inspect.signature(task_class(name)).parameters
    except (TypeError, ValueError):
        return False


@tasks_app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the built-in tasks with their templates."""
    from rich.table import Table

    from tokenmdp.tasks.registry import known_tasks, task_class

    rows = []
    for name in known_tasks():
        cls = task_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        templates = list(getattr(cls, "templates", ()))
        rows.append({"name": name, "templates": templates, "description": doc[0] if doc else ""})
    if json_out:
        emit_json(rows)
        return
    table = Table(title="tasks (or any 'package.module:Class')")
    for col in ("name", "templates", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["templates"]), r["description"])
    console.print(table)


@tasks_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="A task name (see `tokenmdp tasks list`) or 'package.module:Class'."),
    n: int = typer.Option(5, "--n", min=1, help="How many problems to show."),
    split: str = typer.Option("train", "--split", help="train or test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the problem draw."),
    template: str = typer.Option(None, "--template", help="Prompt template (default: the task's)."),
    option: list[str] = typer.Option(None, "--option", "-o", help=OPTION_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Print sample problems: id, rendered prompt, one reference solution and its score."""
    from rich.panel import Panel
    from rich.text import Text

    from tokenmdp.tasks import get_task

    options = parse_options(option)
    if template is not None and "template" not in options and _accepts(name, "template"):
        options["template"] = template  # so that the verifier extracts in the template's format
    task = get_task(name, **options)
    items = []
    for p in task.problems(split, n=n, seed=seed):
        ref = task.reference(p, template)
        score = task.score(p, ref) if ref is not None and (template or task.template) == task.template else None
        items.append({
            "problem": task.problem_to_dict(p),
            "prompt": task.render(p, template),
            "reference": ref,
            "reference_score": None if score is None else {"reward": score.reward, "correct": score.correct},
        })
    if json_out:
        emit_json({"task": task.name, "split": split, "seed": seed, "template": task.resolve_template(template),
                   "problems": items})
        return
    for item in items:
        body = Text(item["prompt"], style="cyan")
        if item["reference"] is not None:
            body.append(item["reference"], style="green")
        sc = item["reference_score"]
        sub = f"answer {item['problem']['answer']!r}" + ("" if sc is None else f", reference reward {sc['reward']:g}")
        console.print(Panel(body, title=item["problem"]["id"], subtitle=sub, title_align="left"))
