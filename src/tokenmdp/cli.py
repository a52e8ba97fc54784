"""The `tokenmdp` command line.

Each command group lives in its own module under :mod:`tokenmdp.commands` and exposes ``register(app)``.
Errors a user can cause are :class:`tokenmdp.errors.TokenMDPError`; they are printed as one line on stderr with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from tokenmdp import __version__
from tokenmdp.errors import TokenMDPError

COMMAND_MODULES = [
    "demo",
    "mdp",
    "tasks",
    "score",
    "pretrain",
    "train",
    "merge",
    "evaluate",
    "compare",
    "exact",
    "simulate",
    "report",
]

app = typer.Typer(
    name="tokenmdp",
    help="Post-training language models with RL on an explicit Markov decision process.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tokenmdp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tokenmdp: tabular MDPs, the token MDP of an LLM, and the RL post-training family on top of it."""


def _register_all() -> None:
    """Import every command module of :data:`COMMAND_MODULES` and let it register its commands. A module that
    fails to import stops the CLI: a missing one (a typo in the list) is one error naming it, any other import
    error propagates as it is, so no command is ever dropped without a word."""
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tokenmdp.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tokenmdp.commands.{name}":
                raise ImportError(f"command module tokenmdp.commands.{name} (named in tokenmdp.cli.COMMAND_MODULES) "
                                  f"does not exist", name=exc.name) from exc
            raise
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user errors into one line on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=False)
    except TokenMDPError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # click usage errors and friends
        import click

        usage_errors: tuple[type, ...] = (click.ClickException,)
        try:  # typer >= 0.2x vendors its own click: its usage errors are not click's
            from typer._click.exceptions import ClickException as TyperClickException

            usage_errors += (TyperClickException,)
        except ImportError:
            pass
        if isinstance(exc, usage_errors):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
