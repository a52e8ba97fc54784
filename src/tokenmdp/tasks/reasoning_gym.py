"""Tasks from reasoning-gym (106 procedural data sets with their own scorers): ``reasoning_gym:<dataset>``.

``get_task("reasoning_gym:leg_counting", size=500, seed=0, **options)`` builds ``reasoning_gym.create_dataset(
dataset, size=size, seed=seed, **options)``. A fixed share of its entries (``test_size``, drawn by the seed) is the
test split, and the rest is the train stream. The verifier is the data set's own ``score_answer``, applied to the
answer the completion gives:
- template ``answer_tag`` (the default) asks for ``<answer>...</answer>``;
- template ``plain`` shows the question alone.

Either way the answer is the last ``<answer>`` tag, else the completion's last non-empty line.

The reward is the scorer's value (0 to 1; some data sets give partial credit). A sample is correct when it
scores 1. It is formatted when it answers in an ``<answer>`` tag (under ``answer_tag``), or when it answers at
all (when the task was built with ``template="plain"``).
"""

from __future__ import annotations

import math
import random
import re

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.task import Problem, Score, Task, check_split, shuffled_passes

PREFIX = "reasoning_gym:"
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
INSTRUCTION = "\nGive your final answer inside <answer></answer> tags."


def _import():
    try:
        import reasoning_gym
    except ImportError:
        raise TokenMDPError("reasoning-gym tasks need the reasoning-gym package: pip install 'tokenmdp[rg]'") from None
    return reasoning_gym


class ReasoningGymTask(Task):
    """A reasoning-gym data set, scored by its own ``score_answer``."""

    name = "reasoning_gym"
    templates = ("answer_tag", "plain")

    def __init__(self, dataset: str, size: int = 500, seed: int = 0, test_size: float | int = 0.2,
                 template: str | None = None, **options):
        rg = _import()
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            close = [n for n in sorted(DATASETS) if dataset[:4] in n][:5]
            raise TokenMDPError(f"unknown reasoning-gym data set {dataset!r} ({len(DATASETS)} known"
                                + (f"; did you mean {', '.join(close)}?" if close else
                                   f"; for example {', '.join(sorted(DATASETS)[:5])}") + ")")
        if not isinstance(size, int) or size < 2:
            raise TokenMDPError(f"task option 'size' must be an integer >= 2, got {size!r}")
        try:
            self.data = rg.create_dataset(dataset, size=size, seed=seed, **options)
        except (TypeError, ValueError, AssertionError) as exc:
            raise TokenMDPError(f"reasoning-gym data set {dataset!r} rejects its options {options}: "
                                f"{type(exc).__name__}: {exc}") from None
        self.dataset, self.seed = dataset, seed
        self.name = f"{PREFIX}{dataset}"
        self.template = self.resolve_template(template or "answer_tag")
        n_test = int(test_size) if test_size >= 1 else math.ceil(float(test_size) * size)
        if not 0 < n_test < size:
            raise TokenMDPError(f"task option 'test_size' {test_size} leaves no train or no test entries of {size}")
        order = list(range(size))
        random.Random(f"reasoning-gym-{dataset}-{seed}").shuffle(order)
        test = set(order[:n_test])
        self._rows = {"train": [i for i in range(size) if i not in test], "test": sorted(test)}

    def _problem(self, i: int) -> Problem:
        entry = self.data[i]
        return Problem(id=f"{self.dataset}-{self.seed}-{i}", question=str(entry["question"]),
                       answer=entry["answer"], metadata={"index": i})

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        rows = self._rows[check_split(split)]
        if split == "test" and n is not None and n > len(rows):
            raise TokenMDPError(f"the {self.name} test split holds {len(rows)} entries, not {n} (raise 'size')")
        return [self._problem(i) for i in shuffled_passes(rows, split, n, f"reasoning-gym-{split}-{seed}")]

    def num_problems(self, split: str = "train") -> int | None:
        return len(self._rows[check_split(split)])

    def render(self, problem: Problem, template: str | None = None) -> str:
        kind = self.resolve_template(template)
        return problem.question + (INSTRUCTION if kind == "answer_tag" else "")

    @staticmethod
    def extract(completion: str) -> str | None:
        """The answer a completion gives: its last ``<answer>`` tag, else its last non-empty line (the ``plain``
        template's convention; the scorer then judges it); None for an empty completion."""
        found = ANSWER_TAG.findall(completion)
        if found:
            return found[-1].strip()
        lines = [x.strip() for x in completion.strip().splitlines() if x.strip()]
        return lines[-1] if lines else None

    def score(self, problem: Problem, completion: str) -> Score:
        answer = self.extract(completion)
        if answer is None:
            return Score(0.0, False, False, "no answer found")
        entry = self.data[problem.metadata["index"]]
        value = float(self.data.score_answer(answer=answer, entry=entry))
        tagged = bool(ANSWER_TAG.search(completion)) or self.template == "plain"  # the format the prompt asked for
        return Score(value, value >= 1.0, tagged, f"{self.dataset} scorer: {value:g}")


__all__ = ["PREFIX", "ReasoningGymTask"]
