"""The task interface: a :class:`Problem`, a :class:`Score`, a :class:`StepScore` and the abstract :class:`Task`.

A task supplies problems for a split reproducibly from a seed, renders a problem's prompt through a named template,
and scores a completion (the text the policy generated after the prompt) with a verifier. The verifier's reward is
the terminal reward of the token MDP; :meth:`Task.score_steps` optionally scores intermediate steps for process
credit.

A new task subclasses :class:`Task`, sets ``name`` and ``templates``, and implements :meth:`Task.problems`,
:meth:`Task.render` and :meth:`Task.score`; it can then be used everywhere as ``--task my_module:MyTask``.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from tokenmdp.errors import TokenMDPError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One problem: a stable ``id``, the ``question`` text, the ground-truth ``answer`` and task ``metadata``.

    ``question`` is template-neutral; :meth:`Task.render` turns a problem into the full prompt.
    """

    id: str
    question: str
    answer: Any = field(hash=False)
    metadata: dict = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True, slots=True)
class Score:
    """The verifier's verdict on one completion.

    ``reward`` is the scalar reward, ``correct`` whether the answer is right, ``formatted`` whether an answer could
    be found where the template asks for it, and ``reason`` a short human-readable explanation.
    """

    reward: float
    correct: bool
    formatted: bool
    reason: str
    parts: dict | None = None  # the reward's named parts (several reward functions), logged as reward/<name>


@dataclass(frozen=True, slots=True)
class StepScore:
    """The verdict on one intermediate step: its ``text``, whether it is ``correct``, why, and its character span.

    ``completion[start:end] == text``.
    """

    text: str
    correct: bool
    reason: str
    start: int
    end: int


def check_split(split: str) -> str:
    """Return ``split`` if it is a known split, else raise :class:`TokenMDPError`."""
    if split not in SPLITS:
        raise TokenMDPError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return split


def shuffled_passes(items: list, split: str, n: int | None, key: str) -> list:
    """The first ``n`` of ``items`` (all when None) in orders drawn from ``random.Random(key)``: the train split
    passes over them again, each time in a new order, until it has ``n``; the test split is one pass. A function of
    its arguments only, and prefix-stable in ``n`` (what :meth:`Task.problems` promises)."""
    rng = random.Random(key)
    out: list = []
    while not out or (n is not None and len(out) < n and split == "train"):
        order = list(items)
        rng.shuffle(order)
        out += order
    return out[:n]


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)`` from a local JSONL or Parquet file (line numbers start at 1).

    JSONL lines that are blank are skipped; a line that is not valid JSON raises :class:`TokenMDPError` naming the
    file and line. Parquet rows are numbered like lines (row 0 is line 1).
    """
    path = Path(path)
    if not path.exists():
        raise TokenMDPError(f"file not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise TokenMDPError(f"{path}: cannot read Parquet file: {exc}") from exc
        yield from enumerate(rows, start=1)
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TokenMDPError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc


def require(record: Any, key: str, where: str) -> Any:
    """``record[key]``, or a :class:`TokenMDPError` that names the missing field and ``where`` it was expected."""
    if not isinstance(record, dict):
        raise TokenMDPError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record or record[key] is None:
        raise TokenMDPError(f"{where}: missing field {key!r}")
    return record[key]


class Task(ABC):
    """A verifiable task: problems, prompt templates, a verifier, and optionally a step verifier.

    Subclasses set ``name``, ``templates`` (template names; the first is the default) and ``template`` (the
    instance's default template), and implement :meth:`problems`, :meth:`render` and :meth:`score`.
    """

    name: str = "task"
    templates: tuple[str, ...] = ()
    template: str | None = None

    @abstractmethod
    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """Problems of ``split`` ("train" or "test"): a function of ``(split, n, seed)`` only, and prefix-stable:
        the first ``k`` problems of a call with ``n > k`` are those of the call with ``n = k`` (the prompt stream of
        a shorter run is then a prefix of a longer one's, :func:`tokenmdp.train.data.prompt_stream`)."""

    @abstractmethod
    def render(self, problem: Problem, template: str | None = None) -> str:
        """The full prompt text of ``problem`` under ``template`` (default: the task's template)."""

    @abstractmethod
    def score(self, problem: Problem, completion: str) -> Score:
        """Verify ``completion`` (the generated text after the prompt) against ``problem``."""

    def score_steps(self, problem: Problem, completion: str) -> list[StepScore]:
        """Scores of the intermediate steps of ``completion``; tasks without a step verifier return ``[]``."""
        return []

    def num_problems(self, split: str = "train") -> int | None:
        """How many distinct problems ``split`` holds, or None when unknown or too many to count (a generator).

        A training run that needs more prompts than this cycles over them in epochs
        (:func:`tokenmdp.train.data.prompt_stream`)."""
        return None

    def reference(self, problem: Problem, template: str | None = None) -> str | None:
        """One correct completion in ``template``'s format, or ``None`` if the task cannot produce one."""
        return None

    def resolve_template(self, template: str | None) -> str:
        """``template`` or the task's default, checked against ``templates``."""
        name = template or self.template or (self.templates[0] if self.templates else None)
        if name not in self.templates:
            raise TokenMDPError(
                f"unknown template {name!r} for task {self.name!r}; known templates: {', '.join(self.templates)}"
            )
        return name

    def problem_to_dict(self, problem: Problem) -> dict:
        """A JSON-serialisable dict of ``problem`` (inverse of :meth:`problem_from_dict`)."""
        return {
            "id": problem.id,
            "question": problem.question,
            "answer": problem.answer,
            "metadata": dict(problem.metadata),
        }

    def problem_from_dict(self, record: dict, where: str = "record") -> Problem:
        """A :class:`Problem` from a dict written by :meth:`problem_to_dict`; ``where`` names it in errors."""
        metadata = record.get("metadata") if isinstance(record, dict) else None
        if metadata is not None and not isinstance(metadata, dict):
            raise TokenMDPError(f"{where}: field 'metadata' must be an object")
        return Problem(
            id=str(require(record, "id", where)),
            question=str(require(record, "question", where)),
            answer=require(record, "answer", where),
            metadata=dict(metadata or {}),
        )

    def load_problems(self, path: str | Path) -> list[Problem]:
        """Problems from a local JSONL or Parquet file; a bad line raises :class:`TokenMDPError` with file and line."""
        return [self.problem_from_dict(rec, where=f"{path}:{lineno}") for lineno, rec in read_records(path)]

    def describe(self) -> str:
        """A one-line description (the first line of the class docstring)."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name
