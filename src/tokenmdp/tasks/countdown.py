"""Countdown: combine the given numbers with ``+ - * /`` (each exactly once) to reach a target.

Problems
    A :class:`Problem` has ``answer`` = the target (int) and ``metadata["nums"]`` = the given numbers (list of int,
    in prompt order); ``id`` is ``"countdown-<n1>_<n2>_..._<target>"`` and ``question`` is
    ``"Numbers: 3 5 7. Target: 56."``. The generator draws ``num_count`` numbers uniformly from ``[low, high]``
    and then a target uniformly among the integers of ``[target_low, target_high]`` that the numbers can reach
    (so every problem is solvable; :func:`tokenmdp.tasks.countdown_solve.solve` finds one solution). A problem
    belongs to the test split when a hash of its sorted numbers falls in the first ``test_fraction`` of the hash
    range, so train and test never share even a multiset of numbers. Everything is a function of
    ``(split, n, seed)`` and the constructor arguments. With ``data=`` the problems come instead from the public
    3-to-4-number set (fields ``target``, ``nums``): a local JSONL/Parquet file, or a hub id read through
    ``datasets`` (``data="hub"`` means ``Jiayi-Pan/Countdown-Tasks-3to4``); the same hash splits it.

Templates (the prompt always ends with ``<think>``, so the completion starts inside the reasoning)
    ``r1``: an R1-style base-model conversation asking for reasoning in ``<think> </think>`` and the equation in
    ``<answer> </answer>``.

    ``compact`` (for the character-level tiny model; this format is a contract, keep it stable)::

        prompt     = f"Numbers: {' '.join(map(str, nums))}. Target: {target}.\\n<think>"
        completion = "3+5=8\\n8*7=56\\n</think><answer>(3+5)*7</answer>"

    The reasoning is one step ``a op b = c`` a line (no spaces; each line ends with ``\\n``), in evaluation order
    of the final expression; a non-integer or negative operand is written in parentheses, ``(7/2)`` or ``(-3)``.
    Then ``</think><answer>EXPR</answer>`` with EXPR the compact infix expression (no spaces, minimal parentheses).
    :meth:`Countdown.reference` returns exactly this for the solver's solution (the solver prefers solutions whose
    intermediate results are non-negative integers).

Scoring (the verifier is in :mod:`tokenmdp.tasks.countdown_verify`)
    The last ``<answer>...</answer>`` counts. No such pair: reward ``rewards[2]`` (0.0), not formatted. A pair
    whose content is a correct equation (each number exactly once, exact value equal to the target, an optional
    trailing ``= <target>``): ``rewards[0]`` (1.0). Any other content, including an empty or unparsable one:
    ``rewards[1]`` (0.1), formatted but wrong; ``Score.reason`` says why. A ``</think>`` is not required.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from pathlib import Path
from collections.abc import Sequence

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.task import Problem, Score, StepScore, Task, check_split
from tokenmdp.tasks.countdown_solve import format_step, reachable_targets, solve_tree, to_expression, to_steps
from tokenmdp.tasks.countdown_verify import (
    DEFAULT_MAX_CHARS,
    Reject,
    extract_answer,
    parse_expression,
    score_steps,
    verify_equation,
)

HUB_ID = "Jiayi-Pan/Countdown-Tasks-3to4"
#: What a first reasoning line (a two-LLM generator's hint) is, by :func:`classify_step`
STEP_CLASSES = ("on a solution path", "dead end", "false arithmetic", "unavailable operand", "not a step")

R1_TEMPLATE = (
    "A conversation between a User and an Assistant. The User gives a puzzle and the Assistant solves it. The "
    "Assistant first thinks the problem through step by step inside <think> </think>, then writes only the final "
    "equation inside <answer> </answer>.\n"
    "User: Use the numbers {nums} to make {target}. You may use +, -, * and / with parentheses, and every number "
    "must be used exactly once. Show your reasoning in <think> </think> and give the equation in "
    "<answer> </answer>, for example <answer>(6 - 2) * 5</answer>.\n"
    "Assistant: Let me work it out.\n<think>"
)
COMPACT_TEMPLATE = "Numbers: {nums}. Target: {target}.\n<think>"
DEFAULT_SIZES = {"train": 1000, "test": 200}
COUNTABLE = 5_000  # Countdown.num_problems counts the problems of at most this many number multisets (~1 ms each)


def _as_int(value: object, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise TokenMDPError(f"{where}: field {field!r} must be an integer, got {value!r}")
    return int(value)


def make_problem(nums: Sequence[int], target: int, id: str | None = None, metadata: dict | None = None) -> Problem:
    """A Countdown problem: ``make_problem([3, 5, 7], 56).id == "countdown-3_5_7-56"``."""
    nums = [int(n) for n in nums]
    target = int(target)
    pid = id or f"countdown-{'_'.join(map(str, nums))}-{target}"
    question = f"Numbers: {' '.join(map(str, nums))}. Target: {target}."
    return Problem(id=pid, question=question, answer=target, metadata={**(metadata or {}), "nums": nums})


def split_of(nums: Sequence[int], test_fraction: float) -> str:
    """``"test"`` when the hash of the sorted numbers lands in the first ``test_fraction`` of [0, 1), else train."""
    key = ",".join(map(str, sorted(nums))).encode()
    u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return "test" if u < test_fraction else "train"


class Countdown(Task):
    """Countdown: reach a target from 3-4 numbers with + - * / (each number once); R1-style or compact prompts."""

    name = "countdown"
    templates = ("r1", "compact")

    def __init__(
        self,
        num_count: int | Sequence[int] = (3, 4),
        low: int = 1,
        high: int = 99,
        target_low: int = 1,
        target_high: int = 100,
        template: str = "r1",
        rewards: Sequence[float] = (1.0, 0.1, 0.0),
        max_expr_chars: int = DEFAULT_MAX_CHARS,
        test_fraction: float = 0.1,
        data: str | Path | None = None,
    ) -> None:
        counts = [num_count] if isinstance(num_count, int) else list(num_count)
        if len(counts) == 2 and counts[0] < counts[1]:
            counts = list(range(counts[0], counts[1] + 1))
        if not counts or any(not isinstance(c, int) or c < 2 or c > 6 for c in counts):
            raise TokenMDPError(f"num_count must be an int in 2..6 or a (min, max) range, got {num_count!r}")
        if low > high or target_low > target_high:
            raise TokenMDPError(
                f"empty range: low={low}, high={high}, target_low={target_low}, target_high={target_high}"
            )
        if len(rewards) != 3:
            raise TokenMDPError(f"rewards must be (correct, formatted, unformatted), got {rewards!r}")
        if not 0.0 < test_fraction < 1.0:
            raise TokenMDPError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        self.counts = counts
        self.low, self.high, self.target_low, self.target_high = low, high, target_low, target_high
        self.template = template
        self.resolve_template(template)
        self.rewards = tuple(float(r) for r in rewards)
        self.max_expr_chars = max_expr_chars
        self.test_fraction = test_fraction
        self.data = data
        self._data_cache: dict[str, list[Problem]] | None = None
        self._sizes: dict[str, int] | None = None

    # ------------------------------------------------------------------------------------------------ problems
    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """``n`` problems of ``split``, a function of ``(split, n, seed)``.

        Generated problems: ``n`` defaults to ``DEFAULT_SIZES[split]``; the first ``k`` problems of a call with
        ``n > k`` are the problems of the call with ``n = k``. With ``data``: the rows of the split shuffled by
        ``seed``, all of them when ``n`` is None.
        """
        check_split(split)
        if self.data is None:
            return self.generate(split, DEFAULT_SIZES[split] if n is None else n, seed)
        rows = self._data_split(split)
        if n is not None and n > len(rows):
            raise TokenMDPError(f"asked for {n} {split} problems, the data {self.data} has {len(rows)}")
        order = list(range(len(rows)))
        random.Random(f"countdown-data/{split}/{seed}").shuffle(order)
        return [rows[i] for i in order[: len(rows) if n is None else n]]

    def num_problems(self, split: str = "train") -> int | None:
        """Distinct problems (sorted numbers, target) of ``split``: the data's rows, or for generated problems an
        exact count over every multiset of numbers when there are at most :data:`COUNTABLE` of them (else None).
        3 numbers in 1..10, targets 1..100: 2,616 train and 299 test problems at ``test_fraction`` 0.1."""
        check_split(split)
        if self.data is not None:
            return len(self._data_split(split))
        if self._sizes is None:
            multisets = sum(math.comb(self.high - self.low + c, c) for c in self.counts)
            if multisets > COUNTABLE:
                return None
            sizes = {"train": 0, "test": 0}
            for c in self.counts:
                for nums in itertools.combinations_with_replacement(range(self.low, self.high + 1), c):
                    sizes[split_of(nums, self.test_fraction)] += len(
                        reachable_targets(nums, self.target_low, self.target_high))
            self._sizes = sizes
        return self._sizes[split]

    def generate(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` distinct generated problems of ``split`` (see the module docstring for the distribution)."""
        rng = random.Random(f"countdown/{split}/{seed}")
        out: list[Problem] = []
        seen: set[tuple] = set()
        budget = 200 * n + 10_000
        while len(out) < n:
            budget -= 1
            if budget < 0:
                raise TokenMDPError(
                    f"could only generate {len(out)} of {n} distinct {split} problems; widen low/high or target range"
                )
            nums = [rng.randint(self.low, self.high) for _ in range(rng.choice(self.counts))]
            if split_of(nums, self.test_fraction) != split:
                continue
            targets = reachable_targets(nums, self.target_low, self.target_high)
            if not targets:
                continue
            target = rng.choice(targets)
            key = (tuple(sorted(nums)), target)
            if key in seen:
                continue
            seen.add(key)
            out.append(make_problem(nums, target))
        return out

    def _data_split(self, split: str) -> list[Problem]:
        if self._data_cache is None:
            rows = self._load_data()
            cache: dict[str, list[Problem]] = {"train": [], "test": []}
            for p in rows:
                cache[split_of(p.metadata["nums"], self.test_fraction)].append(p)
            self._data_cache = cache
        return self._data_cache[split]

    def _load_data(self) -> list[Problem]:
        if str(self.data) == "hub":
            self.data = HUB_ID
        path = Path(str(self.data))
        if path.exists():
            return self.load_problems(path)
        if str(self.data).endswith((".jsonl", ".json", ".parquet")):
            raise TokenMDPError(f"data file not found: {self.data}")
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise TokenMDPError(
                f"data {self.data!r} is not a local file and the `datasets` package is not installed "
                "(pip install 'tokenmdp[hub]'), so it cannot be read from the hub"
            ) from None
        try:
            ds = datasets.load_dataset(str(self.data), split="train")
        except Exception as exc:  # network, auth, unknown id
            raise TokenMDPError(f"cannot load {self.data!r} through datasets: {exc}") from exc
        return [self.problem_from_dict(row, where=f"{self.data} row {i}") for i, row in enumerate(ds)]

    def problem_from_dict(self, record: dict, where: str = "record") -> Problem:
        """Accepts this task's :meth:`problem_to_dict` form or a raw row ``{"target": 56, "nums": [3, 5, 7]}``."""
        if not isinstance(record, dict):
            raise TokenMDPError(f"{where}: expected a JSON object, got {type(record).__name__}")
        meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        nums = record.get("nums", meta.get("nums"))
        target = record.get("target", record.get("answer"))
        if nums is None:
            raise TokenMDPError(f"{where}: missing field 'nums'")
        if target is None:
            raise TokenMDPError(f"{where}: missing field 'target'")
        if isinstance(nums, (str, bytes)) or not hasattr(nums, "__iter__"):
            raise TokenMDPError(f"{where}: field 'nums' must be a list of integers, got {nums!r}")
        nums = [_as_int(x, "nums", where) for x in nums]
        if not nums:
            raise TokenMDPError(f"{where}: field 'nums' is empty")
        rid = record.get("id")
        target = _as_int(target, "target", where)
        return make_problem(nums, target, id=None if rid is None else str(rid), metadata=meta)

    # ------------------------------------------------------------------------------------------------ prompts
    def render(self, problem: Problem, template: str | None = None) -> str:
        name = self.resolve_template(template)
        nums = problem.metadata["nums"]
        if name == "compact":
            return COMPACT_TEMPLATE.format(nums=" ".join(map(str, nums)), target=problem.answer)
        return R1_TEMPLATE.format(nums=", ".join(map(str, nums)), target=problem.answer)

    def reference(self, problem: Problem, template: str | None = None) -> str | None:
        """The solver's solution as a completion in ``template``'s format (``None`` if unsolvable)."""
        name = self.resolve_template(template)
        tree = solve_tree(problem.metadata["nums"], problem.answer)
        if tree is None:
            return None
        steps = to_steps(tree)
        if name == "compact":
            lines = "".join(format_step(*s) + "\n" for s in steps)
            return f"{lines}</think><answer>{to_expression(tree)}</answer>"
        nums = ", ".join(map(str, problem.metadata["nums"]))
        lines = "".join(format_step(*s, spaced=True) + "\n" for s in steps)
        expr = to_expression(tree, spaced=True)
        return (
            f" I need to reach {problem.answer} using {nums}, each once.\n{lines}"
            f"That uses every number once, so the equation is {expr}.\n</think>\n<answer>{expr}</answer>"
        )

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, problem: Problem, completion: str) -> Score:
        text = extract_answer(completion)
        if text is None:
            return Score(self.rewards[2], False, False, "no <answer>...</answer> tag")
        reason = verify_equation(text, problem.metadata["nums"], problem.answer, self.max_expr_chars)
        if reason is None:
            return Score(self.rewards[0], True, True, "correct")
        return Score(self.rewards[1], False, True, reason)

    def answer_key(self, problem: Problem, completion: str) -> tuple | None:
        """The normalised answer for majority vote (used by ``tokenmdp eval``): the exact value and the sorted
        numbers of the answer equation, so equivalent equations such as ``(3+5)*7`` and ``7*(5+3)`` vote together
        (and all correct ones agree); None when there is no parseable answer."""
        text = extract_answer(completion)
        if text is None:
            return None
        try:
            value, literals, claimed = parse_expression(text, self.max_expr_chars)
        except (Reject, ZeroDivisionError):
            return None
        return (value, tuple(sorted(literals)), claimed in (None, problem.answer))

    def score_steps(self, problem: Problem, completion: str) -> list[StepScore]:
        """Every ``a op b = c`` step of the reasoning, checked for truth and available operands."""
        return score_steps(completion, problem.metadata["nums"])

    def problem_to_dict(self, problem: Problem) -> dict:
        out = super().problem_to_dict(problem)
        out["nums"], out["target"] = list(problem.metadata["nums"]), problem.answer
        return out


def classify_step(line: str, nums: Sequence[int], target: int) -> str:
    """What the first ``a op b = c`` step of ``line`` is on the problem ``(nums, target)``, one of
    :data:`STEP_CLASSES`: a true step with available operands after which the target is still reachable from the
    numbers left (``"on a solution path"``) or no longer (``"dead end"``), ``"false arithmetic"``, ``"unavailable
    operand"`` (or a division by zero), or ``"not a step"`` (no step in the line).

    Hand examples with nums ``[3, 5, 7]``, target 56: ``"3+5=8"`` is on a path (8 * 7); ``"3*5=15"`` is a dead end
    (15 and 7 cannot make 56); ``"3+5=9"`` is false arithmetic; ``"5+5=10"`` uses an unavailable 5.
    """
    steps = score_steps(line, nums)
    if not steps:
        return "not a step"
    first = steps[0]
    if not first.correct:
        return "false arithmetic" if ", not " in first.reason else "unavailable operand"
    a, op, b, c = step_numbers(first.text)
    left = list(nums)
    for x in (a, b):
        left.remove(x)
    return "on a solution path" if solve_tree(left + [c], target) is not None else "dead end"


def step_numbers(text: str) -> tuple:
    """``"3+5=8"`` -> ``(3, "+", 5, 8)`` (operands and result as exact numbers)."""
    from tokenmdp.tasks.countdown_verify import OP_ALIASES, STEP_PATTERN, parse_number

    a, op, b, c = STEP_PATTERN.search(text).groups()
    return parse_number(a), OP_ALIASES.get(op, op), parse_number(b), parse_number(c)


def parse_question(text: str) -> tuple[list[int], int] | None:
    """``(nums, target)`` from a prompt or question holding ``"Numbers: 3 5 7. Target: 56."`` (the compact
    template), or from a problem id ``"countdown-3_5_7-56"``; None otherwise."""
    import re

    m = re.search(r"Numbers: ([0-9 ]+)\. Target: (-?[0-9]+)\.", text) or re.fullmatch(
        r"countdown-([0-9_]+)-(-?[0-9]+)", text)
    if m is None:
        return None
    return [int(x) for x in m.group(1).replace("_", " ").split()], int(m.group(2))


__all__ = ["Countdown", "HUB_ID", "STEP_CLASSES", "classify_step", "make_problem", "parse_question", "split_of",
           "step_numbers"]
