"""The task registry: ``get_task("countdown")``, ``get_task("gsm8k")`` or ``get_task("my_pkg.my_module:MyTask")``."""

from __future__ import annotations

import importlib
import inspect
from functools import partial
from typing import Any
from collections.abc import Callable

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.env_module import PREFIX as ENV_PREFIX, EnvModuleTask
from tokenmdp.tasks.reasoning_gym import ReasoningGymTask  # cheap: reasoning_gym itself is imported on use
from tokenmdp.tasks.task import Task

_FACTORIES: dict[str, str] = {
    "countdown": "tokenmdp.tasks.countdown:Countdown",
    "gsm8k": "tokenmdp.tasks.gsm8k:GSM8K",
    "arithmetic": "tokenmdp.tasks.arithmetic:Arithmetic",
    "dataset": "tokenmdp.tasks.dataset:DatasetTask",
}
_REGISTERED: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **kw)`` call ``factory(**kw)`` (a Task subclass or a function returning a Task)."""
    _REGISTERED[name] = factory


def known_tasks() -> list[str]:
    """The names ``get_task`` accepts besides ``module:Class`` specs."""
    return sorted(set(_FACTORIES) | set(_REGISTERED))


def _import(spec: str) -> Callable[..., Task]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TokenMDPError(f"task spec {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TokenMDPError(f"task spec {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TokenMDPError(f"task spec {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def _reasoning_gym(spec: str) -> Callable[..., Task]:
    """``reasoning_gym:<dataset>`` -> a factory of that data set's task (the name is not a module path)."""
    return partial(ReasoningGymTask, spec.split(":", 1)[1])


def task_class(spec: str) -> Callable[..., Task]:
    """The factory behind ``spec`` without calling it (for help texts and ``tokenmdp tasks list``)."""
    if spec.startswith("reasoning_gym:"):
        return _reasoning_gym(spec)
    if spec.startswith(ENV_PREFIX):  # env:<module>: an environment module (its name may hold a ':'-free path)
        return partial(EnvModuleTask, spec[len(ENV_PREFIX):])
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    if spec in _FACTORIES:
        return _import(_FACTORIES[spec])
    if ":" in spec:
        return _import(spec)
    raise TokenMDPError(f"unknown task {spec!r}; known tasks: {', '.join(known_tasks())} (or 'package.module:Class')")


def get_task(spec: str | Task, **kwargs: Any) -> Task:
    """A task instance from a name, a ``"package.module:ClassName"`` spec, or an existing Task (returned as is).

    Keyword arguments go to the constructor; one it does not take raises TokenMDPError naming it.
    """
    if isinstance(spec, Task):
        if kwargs:
            raise TokenMDPError(f"task options {sorted(kwargs)} given with an already built task")
        return spec
    factory = task_class(str(spec))
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if params and not takes_any and key not in params:
            known = ", ".join(k for k in params if k != "self")
            raise TokenMDPError(f"task {spec!r} has no option {key!r}; its options: {known}")
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise TokenMDPError(f"task spec {spec!r} did not produce a tokenmdp.tasks.Task (got {type(task).__name__})")
    return task
