"""`tokenmdp merge`: write the full model of a LoRA run's adapter (base weights + (alpha / r) B A)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        adapter: Path = typer.Argument(..., help="An adapter folder: a LoRA run's final/ or checkpoints/step-N/model."),
        out: Path = typer.Option(..., "--out", help="Folder for the merged full model (must not exist)."),
        base: str | None = typer.Option(None, "--base", help="The base model (default: the one the adapter "
                                           "records, its base_model_name_or_path)."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    ) -> None:
        """Merge a LoRA adapter into its base model and save the result as an ordinary model folder."""
        from tokenmdp.commands._common import console
        from tokenmdp.policy.adapters import merge_adapter

        folder = merge_adapter(adapter, out, base=base, dtype=dtype)
        console.print(f"merged {adapter} into {folder}")
