"""Orchestration: the training config, the on-policy loop over every algorithm, checkpoints and run folders.

``load_config(path, overrides) -> TrainConfig``; ``train(config, resume=False) -> Path`` (the run folder);
``prompt_stream(task, seed=, steps=, prompts_per_step=)`` (the prompts of every step, a function of the seed only).
"""

from __future__ import annotations

from tokenmdp.train.config import TrainConfig, load_config
from tokenmdp.train.data import prompt_stream


def train(config, *, resume: bool = False, progress: bool = True, callbacks=None):
    """See :func:`tokenmdp.train.trainer.train` (imported lazily: it pulls in torch and transformers)."""
    from tokenmdp.train.trainer import train as _train

    return _train(config, resume=resume, progress=progress, callbacks=callbacks)


__all__ = ["TrainConfig", "load_config", "prompt_stream", "train"]
