"""Verifiable tasks: the :class:`Task` interface, Countdown, GSM8K and the registry ``get_task``."""

from __future__ import annotations

from tokenmdp.tasks.task import Problem, Score, StepScore, Task
from tokenmdp.tasks.countdown import Countdown
from tokenmdp.tasks.gsm8k import GSM8K
from tokenmdp.tasks.registry import get_task, known_tasks, register_task

__all__ = ["Problem", "Score", "StepScore", "Task", "Countdown", "GSM8K", "get_task", "known_tasks", "register_task"]
