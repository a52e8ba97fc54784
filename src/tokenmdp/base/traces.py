"""Derivational traces for Countdown: a visible search with dead ends, then the answer.

The embedded tiny base model (:mod:`tokenmdp.base.pretrain`) is pretrained on these traces so that it learns to
*search*. A trace is a sequence of **attempts**, each a full derivation from the given numbers: ``n - 1`` true steps
``a op b=c`` (:func:`tokenmdp.tasks.countdown_solve.format_step`; positive integer results only). An attempt that
misses the target is a **dead end**, its last line marked :data:`DEAD_END`; the last attempt reaches the target::

    Numbers: 3 5 7. Target: 56.
    <think>7-5=2
    3*2=6 no
    5+3=8
    8*7=56
    </think><answer>(5+3)*7</answer>

Attempts follow a seeded random-order depth-first search over the first move; an unreachable first move shows as
one dead end completed by its nearest miss. Kinds (a trace is a function of ``(numbers, target, seed)`` and these):

* **restart search** (default): at most ``max_failures`` dead ends, then a first move that reaches the target;
* **give-up search** (``give_up > 0``): after each dead end the writer stops with probability ``give_up`` (always
  after ``max_failures``) and answers its nearest miss (a wrong answer in the right format); with ``bluff`` it
  presents the attempt it stops at as a success instead;
* **direct answer** (``direct > 0``, the share of such writers): no search lines, the answer of the first attempt.

These leave RL room to choose: to keep searching, or which style to start with. When the target needs fractions
or negative intermediates, the trace falls back to :func:`tokenmdp.tasks.countdown_solve.solve_tree`, without dead
ends. What the base models built on each kind do is in ``benchmarks/RESULTS.md`` ("Tiny base model").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from collections.abc import Sequence

from tokenmdp.tasks.countdown_solve import format_step, solve_tree, to_expression, to_steps
from tokenmdp.tasks.countdown_verify import DEAD_END, apply_op

THINK_CLOSE = "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
OPS = ("+", "-", "*", "/")

# A step is (a, op, b, c); a pool entry is (value, tree) with the tree in countdown_solve's format.
Step = tuple[int, str, int, int]


@dataclass(frozen=True)
class Attempt:
    """One derivation of a trace: its steps, and whether it reached the target."""

    steps: tuple[Step, ...]
    reached: bool


def moves(values: Sequence[int]) -> list[tuple[int, int, str, int]]:
    """All legal merges of a pool: ``(i, j, op, c)`` with ``c = values[i] op values[j]`` a positive integer.

    Operands are ordered larger first (``values[i] >= values[j]``); ``+`` and ``*`` always apply, ``-`` only when
    the difference is positive and ``/`` only when it divides exactly. Duplicate merges of equal values are kept
    once. Example: ``moves([6, 2])`` gives ``6+2=8, 6-2=4, 6*2=12, 6/2=3``; ``moves([3, 3])`` gives ``3+3=6,
    3*3=9, 3/3=1`` (no ``3-3``).
    """
    out, seen = [], set()
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j or values[i] < values[j] or (values[i] == values[j] and i > j):
                continue
            for op in OPS:
                a, b = values[i], values[j]
                if (op == "-" and a == b) or (op == "/" and a % b):
                    continue
                c = int(apply_op(op, a, b))
                if c <= 0 or (a, op, b) in seen:
                    continue
                seen.add((a, op, b))
                out.append((i, j, op, c))
    return out


def _merge(pool: list[tuple[int, object]], i: int, j: int, op: str, c: int) -> list[tuple[int, object]]:
    rest = [e for k, e in enumerate(pool) if k not in (i, j)]
    return rest + [(c, (op, pool[i][1], pool[j][1], c))]


def _completions(pool: list[tuple[int, object]]) -> list[tuple[tuple[Step, ...], object]]:
    """Every full derivation of ``pool``: ``(steps, tree)`` down to one number (exhaustive; fine for n <= 4)."""
    if len(pool) == 1:
        return [((), pool[0][1])]
    out = []
    values = [v for v, _ in pool]
    for i, j, op, c in moves(values):
        step = (values[i], op, values[j], c)
        for steps, tree in _completions(_merge(pool, i, j, op, c)):
            out.append(((step,) + steps, tree))
    return out


def _final(tree: object) -> int:
    return tree[3] if isinstance(tree, tuple) else tree  # type: ignore[index]


def check_settings(max_failures: int, give_up: float, bluff: bool, direct: float = 0.0) -> None:
    """``ValueError`` naming the setting when ``(max_failures, give_up, bluff, direct)`` describe no corpus."""
    if not 0.0 <= direct < 1.0:
        raise ValueError(f"direct must be in [0, 1) (the share of direct answers), got {direct}")
    if not 0.0 <= give_up < 1.0:
        raise ValueError(f"give_up must be in [0, 1), got {give_up}")
    if give_up > 0 and max_failures < 1:
        raise ValueError(f"max_failures must be >= 1 when give_up > 0, got {max_failures}")
    if bluff and give_up == 0:
        raise ValueError("bluff needs give_up > 0 (a writer who never stops has nothing to bluff)")


def search(
    numbers: Sequence[int], target: int, rng: random.Random, max_failures: int, give_up: float = 0.0,
    bluff: bool = False,
) -> tuple[list[Attempt], object]:
    """The attempts of a seeded random-order search and the expression tree of its answer.

    ``give_up == 0`` (restart search): the answer is the last attempt's, which reaches the target; at most
    ``max_failures`` dead ends are shown and later ones are skipped. ``give_up > 0`` (give-up search): every dead end
    is shown; after each one the writer gives up with probability ``give_up``, and always after the
    ``max_failures``-th; a trace that gives up ends with its dead ends only, and its answer is the tree of its
    closest near miss (the first of equally close ones), which misses the target. With ``bluff`` the writer gives up
    by presenting its last attempt as if it had reached the target: that attempt comes back with ``reached=True``
    (it is not marked as a dead end) and the answer is its own tree. Returns ``([], None)`` when no derivation in
    this move set reaches ``target`` before the search stops.
    """
    check_settings(max_failures, give_up, bluff)
    return _search(numbers, target, rng, max_failures, give_up, bluff)


def _search(numbers: Sequence[int], target: int, rng: random.Random, max_failures: int, give_up: float,
            bluff: bool) -> tuple[list[Attempt], object]:
    """:func:`search` without the check of its settings (the caller has made it)."""
    pool: list[tuple[int, object]] = [(int(x), int(x)) for x in numbers]
    values = [v for v, _ in pool]
    firsts = moves(values)
    rng.shuffle(firsts)
    failures: list[Attempt] = []
    misses: list[object] = []
    for i, j, op, c in firsts:
        first = (values[i], op, values[j], c)
        paths = _completions(_merge(pool, i, j, op, c))
        hits = [p for p in paths if _final(p[1]) == target]
        if hits:
            steps, tree = rng.choice(hits)
            return failures + [Attempt((first,) + steps, True)], tree
        if len(failures) < max_failures and paths:
            best = min(abs(_final(t) - target) for _, t in paths)
            steps, miss = rng.choice([p for p in paths if abs(_final(p[1]) - target) == best])
            failures.append(Attempt((first,) + steps, False))
            misses.append(miss)
            if give_up > 0 and (len(failures) == max_failures or rng.random() < give_up):
                if bluff:
                    return failures[:-1] + [Attempt(failures[-1].steps, True)], miss
                closest = min(range(len(misses)), key=lambda k: abs(_final(misses[k]) - target))
                return failures, misses[closest]
    return [], None


def render_trace(attempts: Sequence[Attempt], answer: str) -> str:
    """The completion text of a trace (without EOS): attempts, ``</think>``, then ``<answer>answer</answer>``."""
    lines = []
    for att in attempts:
        for k, step in enumerate(att.steps):
            dead = not att.reached and k == len(att.steps) - 1
            lines.append(format_step(*step) + (DEAD_END if dead else ""))
    return "\n".join(lines) + "\n" + THINK_CLOSE + ANSWER_OPEN + answer + ANSWER_CLOSE


def countdown_trace(numbers: Sequence[int], target: int, *, seed: int = 0, max_failures: int = 2,
                    give_up: float = 0.0, bluff: bool = False, direct: float = 0.0) -> str:
    """The derivational trace (completion text, no EOS) of a Countdown problem; see the module docstring.

    Deterministic in ``(numbers, target, seed)`` (and the settings). Raises ``ValueError`` when ``target``
    cannot be reached from ``numbers`` at all. With ``give_up > 0`` the trace may end in dead ends and a wrong answer,
    or with ``bluff`` in an unmarked miss and its wrong answer (see :func:`search`). With probability ``direct``
    (its own seeded draw) it is a direct answer: ``</think>`` right away and the answer of the first attempt.
    """
    key = f"{seed}|{','.join(map(str, numbers))}|{target}"
    check_settings(max_failures, give_up, bluff, direct)
    if direct > 0:
        coin = random.Random(f"show|{key}")
        if coin.random() >= 1.0 - direct:  # the writer shows its work with probability 1 - direct
            return _direct_answer(numbers, target, coin)
    rng = random.Random(key)
    attempts, tree = _search(numbers, target, rng, max_failures, give_up, bluff)
    if tree is None:
        tree = _reference_tree(numbers, target)
        attempts = [Attempt(tuple(to_steps(tree)), True)]
    return render_trace(attempts, to_expression(tree))


def _direct_answer(numbers: Sequence[int], target: int, rng: random.Random) -> str:
    """A direct answer: no search lines, the answer of the first attempt (right or its near miss)."""
    _, tree = _search(numbers, target, rng, 1, 0.5, False)  # gives up at its first dead end
    if tree is None:
        tree = _reference_tree(numbers, target)
    return THINK_CLOSE + ANSWER_OPEN + to_expression(tree) + ANSWER_CLOSE


def _reference_tree(numbers: Sequence[int], target: int) -> object:
    """The task's reference solution, for a target this move set cannot reach; ``ValueError`` when none exists."""
    tree = solve_tree(list(numbers), target)
    if tree is None:
        raise ValueError(f"no solution: numbers {list(numbers)}, target {target}")
    return tree


_LINE = re.compile(rf"^(\d+)([-+*/])(\d+)=(\d+)({re.escape(DEAD_END)})?$")


def parse_trace(completion: str) -> tuple[list[Attempt], str]:
    """Parse a trace back into attempts and the answer text (inverse of :func:`render_trace` on its outputs).

    Raises ``ValueError`` naming the first line that does not follow the format.
    """
    think, sep, rest = completion.partition(THINK_CLOSE)
    if not sep or not rest.startswith(ANSWER_OPEN) or not rest.endswith(ANSWER_CLOSE):
        raise ValueError("trace must end with '</think><answer>...</answer>'")
    attempts: list[Attempt] = []
    current: list[Step] = []
    if not think:  # a direct answer
        return attempts, rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
    for lineno, line in enumerate(think.rstrip("\n").split("\n"), start=1):
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"line {lineno} is not a step: {line!r}")
        current.append((int(m[1]), m[2], int(m[3]), int(m[4])))
        if m[5]:
            attempts.append(Attempt(tuple(current), False))
            current = []
    if current:
        attempts.append(Attempt(tuple(current), True))
    return attempts, rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]


def problem_numbers(problem) -> tuple[list[int], int]:
    """``(numbers, target)`` of a Countdown :class:`~tokenmdp.tasks.task.Problem` (``metadata["nums"]``, ``answer``)."""
    return [int(x) for x in problem.metadata["nums"]], int(problem.answer)


__all__ = [
    "Attempt", "DEAD_END", "check_settings", "countdown_trace", "moves", "parse_trace", "problem_numbers",
    "render_trace", "search",
]
