"""A task from any data set with a ``prompt`` column, scored by reward functions written as for TRL or verl.

``get_task("dataset", path=..., rewards=[...])`` (``--task dataset -o path=... -o rewards=[pkg.mod:fn]``):

* **The data**: a local JSONL, JSON, Parquet or Arrow file, a folder written by ``Dataset.save_to_disk``, or a hub
  name (read through ``datasets``; ``hub_split`` picks its split). It must have a ``prompt`` column
  (``prompt_column``), holding text or chat messages (a list of ``{"role", "content"}``; rendered by the model's
  chat template, so they need ``task.chat_template``). Every other column travels with the row.
* **The splits**: a fixed share of the rows (``test_size``: a fraction, or a count) is the test split, drawn by
  ``split_seed``; the train split is the rest, as a stream that repeats in a new order each pass.
* **The reward**: one or more functions, ``pkg.module:function``. A function with TRL's signature is called as
  ``f(prompts=[...], completions=[...], completion_ids=None, **columns)`` and returns a list of floats or None (None:
  the function does not apply to that sample, and counts 0). A function with verl's signature,
  ``compute_score(data_source, solution_str, ground_truth, extra_info)``, returns a float or a dict with a
  ``score``; its ground truth is ``reward_model.ground_truth`` (verl's rows) or a ``ground_truth`` column. The
  reward is ``sum_k w_k f_k`` (``reward_weights``, default 1 each), and each function's value is logged per step as
  ``reward/<function name>``.
* **Correct**, which the claims need, is decided by one function: ``correct_reward`` (default the first) at least
  ``correct_threshold`` (default 1.0). For TRL's pattern of a correctness function and a format function, this is
  the correctness function equal to 1. "Formatted" means any function gave more than 0.

Scoring calls each function once per completion, with lists of one. A function that raises, or that returns the
wrong number of values, a non-number or NaN, is one error naming the function and the row.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path


from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.task import Problem, Score, Task, check_split

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
VERL_PARAMS = ("data_source", "solution_str", "ground_truth")


def load_rows(path: str, hub_split: str = "train") -> list[dict]:
    """The rows of a local file or folder, or of a hub data set, as plain dicts (through ``datasets``)."""
    try:
        import datasets
    except ImportError:
        raise TokenMDPError("the dataset task reads data through the datasets package: pip install "
                            "'tokenmdp[hub]'") from None
    local = Path(path).expanduser()
    try:
        if local.is_dir():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                data = data[hub_split]
        elif local.is_file():
            kind = LOCAL_FORMATS.get(local.suffix.lower())
            if kind is None:
                raise TokenMDPError(f"task option 'path': {path} is not a {', '.join(LOCAL_FORMATS)} file")
            data = datasets.load_dataset(kind, data_files=str(local), split="train")
        elif path.startswith(("/", ".", "~")):
            raise TokenMDPError(f"task option 'path': file not found: {path}")
        else:
            data = datasets.load_dataset(path, split=hub_split)
    except TokenMDPError:
        raise
    except Exception as exc:  # datasets raises many kinds (no network, bad file, unknown name)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenMDPError(f"task option 'path': cannot read {path}: {type(exc).__name__}: {first}") from None
    return [dict(row) for row in data]


def load_function(spec: str) -> Callable:
    """``pkg.module:function`` -> the function (one error naming the spec)."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise TokenMDPError(f"task option 'rewards': {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise TokenMDPError(f"task option 'rewards': cannot import {module_name!r} ({exc})") from None
    except AttributeError:
        raise TokenMDPError(f"task option 'rewards': module {module_name!r} has no function {attr!r}") from None
    if not callable(fn):
        raise TokenMDPError(f"task option 'rewards': {spec!r} is not callable")
    return fn


def _is_verl(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(p in params for p in VERL_PARAMS)


class DatasetTask(Task):
    """Any data set with a prompt column, scored by TRL-style reward functions or a verl compute_score."""

    name = "dataset"
    templates = ("plain",)

    def __init__(self, path: str | None = None, rewards: str | Sequence[str] | None = None,
                 reward_weights: Sequence[float] | None = None, prompt_column: str = "prompt",
                 test_size: float | int = 0.1, split_seed: int = 0, hub_split: str = "train",
                 correct_reward: str | None = None, correct_threshold: float = 1.0, template: str | None = None):
        if not path:
            raise TokenMDPError("the dataset task needs task option 'path' (a JSONL/Parquet/Arrow file, a saved "
                                "folder, or a hub name)")
        specs = [rewards] if isinstance(rewards, str) else list(rewards or [])
        if not specs:
            raise TokenMDPError("the dataset task needs task option 'rewards': one or more 'pkg.module:function'")
        self.functions = [load_function(s) for s in specs]
        self.verl = [_is_verl(f) for f in self.functions]  # the signature, read once (scoring calls per sample)
        self.reward_names = [s.rpartition(":")[2] for s in specs]
        if len(set(self.reward_names)) != len(self.reward_names):
            raise TokenMDPError(f"task option 'rewards': two functions share a name: {self.reward_names}")
        weights = [1.0] * len(specs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(specs):
            raise TokenMDPError(f"task option 'reward_weights' has {len(weights)} values for {len(specs)} rewards")
        self.weights = weights
        self.correct_reward = correct_reward or self.reward_names[0]
        if self.correct_reward not in self.reward_names:
            raise TokenMDPError(f"task option 'correct_reward' is {correct_reward!r}; choose one of "
                                f"{', '.join(self.reward_names)}")
        self.correct_threshold = float(correct_threshold)
        rows = load_rows(path, hub_split)
        if not rows:
            raise TokenMDPError(f"task option 'path': {path} holds no rows")
        if prompt_column not in rows[0]:
            raise TokenMDPError(f"{path}: no {prompt_column!r} column (task option 'prompt_column'); its columns "
                                f"are {', '.join(rows[0])}")
        self.prompt_column, self.path = prompt_column, str(path)
        self.template = self.resolve_template(template or "plain")
        n_test = int(test_size) if test_size >= 1 else math.ceil(float(test_size) * len(rows))
        if not 0 < n_test < len(rows):
            raise TokenMDPError(f"task option 'test_size' {test_size} leaves no train or no test rows of "
                                f"{len(rows)}")
        order = list(range(len(rows)))
        random.Random(f"dataset-split-{split_seed}").shuffle(order)
        test = set(order[:n_test])
        self._rows = {"train": [i for i in range(len(rows)) if i not in test], "test": sorted(test)}
        self._problems = [self._problem(i, row) for i, row in enumerate(rows)]

    def _problem(self, i: int, row: dict) -> Problem:
        prompt = row[self.prompt_column]
        messages = prompt if isinstance(prompt, list) else None
        if messages is not None and not all(isinstance(m, dict) and "content" in m for m in messages):
            raise TokenMDPError(f"{self.path}, row {i}: column {self.prompt_column!r} must be text or chat messages "
                                "({'role', 'content'} each)")
        question = prompt if messages is None else str(messages[-1]["content"])
        columns = {k: v for k, v in row.items() if k != self.prompt_column}
        answer = columns.get("answer", columns.get("ground_truth"))
        digest = hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return Problem(id=f"row-{i}-{digest}", question=question, answer=answer,
                       metadata={"row": i, "columns": columns, "messages": messages, "prompt": prompt})

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        rows = self._rows[check_split(split)]
        if split == "test":
            if n is not None and n > len(rows):
                raise TokenMDPError(f"the dataset task's test split holds {len(rows)} rows, not {n}")
            order = list(rows)
            random.Random(f"dataset-test-{seed}").shuffle(order)
            return [self._problems[i] for i in order[:n]]
        rng, order = random.Random(f"dataset-train-{seed}"), []
        for _ in range(1 if n is None else -(-n // len(rows))):  # passes over the rows, each in a new order
            one_pass = list(rows)
            rng.shuffle(one_pass)
            order += one_pass
        return [self._problems[i] for i in order[:n]]

    def num_problems(self, split: str = "train") -> int | None:
        return len(self._rows[check_split(split)])

    def render(self, problem: Problem, template: str | None = None) -> str:
        self.resolve_template(template)
        return problem.question

    def chat_messages(self, problem: Problem) -> list[dict] | None:
        """The row's chat messages, when its prompt is a list of them (rendered by the model's chat template)."""
        return problem.metadata.get("messages")

    def _call(self, k: int, problem: Problem, completion: str) -> float | None:
        fn, name = self.functions[k], self.reward_names[k]
        cols = problem.metadata["columns"]
        where = f"reward function {name!r} on row {problem.metadata['row']} of {self.path}"
        try:
            if self.verl[k]:
                truth = (cols.get("reward_model") or {}).get("ground_truth", cols.get("ground_truth"))
                got = fn(data_source=cols.get("data_source"), solution_str=completion, ground_truth=truth,
                         extra_info=cols.get("extra_info"))
                got = [got["score"] if isinstance(got, dict) else got]
            else:
                got = fn(prompts=[problem.metadata["prompt"]], completions=[completion], completion_ids=None,
                         **{c: [v] for c, v in cols.items()})
        except Exception as exc:  # the user's code: any error, named with its function and row
            raise TokenMDPError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(got, (list, tuple)) or len(got) != 1:
            size = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
            raise TokenMDPError(f"{where} returned {size} values for 1 completion (it must return a list, one value "
                                "per completion)")
        value = got[0]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TokenMDPError(f"{where} returned {value!r}: a reward must be a finite number or None")
        return float(value)

    def score(self, problem: Problem, completion: str) -> Score:
        parts = {name: self._call(k, problem, completion) for k, name in enumerate(self.reward_names)}
        total = sum(w * (v or 0.0) for w, v in zip(self.weights, parts.values()))
        key = parts[self.correct_reward]
        correct = key is not None and key >= self.correct_threshold
        reason = ", ".join(f"{n}={'none' if v is None else f'{v:g}'}" for n, v in parts.items())
        return Score(total, correct, any((v or 0.0) > 0 for v in parts.values()), reason,
                     {n: (0.0 if v is None else v) for n, v in parts.items()})


__all__ = ["DatasetTask", "load_function", "load_rows"]
