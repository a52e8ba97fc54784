"""Helpers shared by the command modules: JSON output and rich tables."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tokenmdp.progress import console, err_console

__all__ = ["console", "emit_json", "err_console", "split_list"]


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout (for scripts: ``--json``)."""
    print(json.dumps(obj, default=_default, indent=2))


def split_list(values: list[str] | None) -> list[str] | None:
    """``["grpo,dr_grpo", "ppo"]`` -> ``["grpo", "dr_grpo", "ppo"]`` (repeatable, comma-separated options)."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]
