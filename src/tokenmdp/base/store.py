"""Where the embedded base model lives: shipped in the package, else in a cache folder, else built there.

The package ships the default base model's folder (``tokenmdp/base/weights/tiny-countdown-v3``: safetensors,
tokenizer files, ``tokenmdp.json`` and a model card, built by ``tokenmdp pretrain`` with the default settings),
so the main job spends no time pretraining. :func:`ensure_tiny_base` returns it when it was built with the current
defaults; otherwise (the defaults changed, or a source tree without the weights) it finds or builds
``<cache>/tiny-countdown-v3``, the cache being ``$TOKENMDP_CACHE`` or ``~/.cache/tokenmdp``
(:func:`cache_root`, read in this one place).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenmdp.atomic import remove_leftovers
from tokenmdp.base.pretrain import BASE_TASK_KWARGS, PretrainSettings, pretrain
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.model import META_FILE, read_meta

BASE_NAME = "tiny-countdown-v3"
#: The shipped copy of the default base model (absent in a tree where it was never built).
SHIPPED = Path(__file__).resolve().parent / "weights" / BASE_NAME

# The embedded default base model: chosen so that it trains in minutes on 2 CPU cores and lands with room for RL
# (see benchmarks/RESULTS.md, "Tiny base model"), on Countdown with BASE_TASK_KWARGS.
BASE_SETTINGS: dict[str, Any] = PretrainSettings().recorded()
# The trace settings added after the v3 build, at the values that reproduce its traces (the restart search).
TRACE_DEFAULTS: dict[str, Any] = {"give_up": 0.0, "bluff": False, "direct": 0.0}
BASE_EVAL: dict[str, int] = {"eval_problems": 64, "eval_k": 8}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$TOKENMDP_CACHE``, else ``~/.cache/tokenmdp``."""
    root = cache_dir or os.environ.get("TOKENMDP_CACHE") or Path.home() / ".cache" / "tokenmdp"
    return Path(root).expanduser()


def is_current(path: Path) -> bool:
    """Whether ``path`` holds a base model built with the current defaults."""
    if not (path / META_FILE).is_file():
        return False
    meta = read_meta(path)
    wanted_task = {"template": "compact", **BASE_TASK_KWARGS}
    settings = {**TRACE_DEFAULTS, **meta.get("pretrain", {}).get("settings", {})}  # folders from before give_up
    return meta.get("task_kwargs") == wanted_task and settings == BASE_SETTINGS


def ensure_tiny_base(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The embedded base model's folder: the shipped copy (:data:`SHIPPED`) when current and no ``cache_dir`` is
    asked for, else ``<cache>/tiny-countdown-v3``, found there or pretrained there first.

    A cached folder built with other settings (an older default) is rebuilt in place (atomically). A folder without
    ``tokenmdp.json`` at that path (not written by :func:`pretrain`) raises :class:`TokenMDPError`. Processes that
    ask at the same time wait on a lock file (``<cache>/.tiny-countdown-v3.lock``) while one of them builds.
    """
    if cache_dir is None and is_current(SHIPPED):
        return SHIPPED
    path = cache_root(cache_dir) / BASE_NAME
    if is_current(path):
        return path
    if path.exists() and not (path / META_FILE).is_file():
        raise TokenMDPError(f"{path} exists but holds no {META_FILE}; remove it so the base model can be rebuilt")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{BASE_NAME}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # no fcntl (Windows): build without the lock
            pass
        if is_current(path):  # built by another process while this one waited
            return path
        remove_leftovers(path.parent)  # a build killed mid-write
        return pretrain("countdown", path, task_kwargs=dict(BASE_TASK_KWARGS), progress=progress, overwrite=True,
                        **BASE_SETTINGS, **BASE_EVAL)


__all__ = ["BASE_EVAL", "BASE_NAME", "BASE_SETTINGS", "BASE_TASK_KWARGS", "SHIPPED", "TRACE_DEFAULTS", "cache_root",
           "ensure_tiny_base", "is_current"]
