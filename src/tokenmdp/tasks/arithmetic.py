"""Arithmetic with a difficulty knob: ``a op b op c ...`` with integers of ``digits`` digits, for real models.

A generated task whose difficulty is set by three options, so that a small instruct model's pass@1 can be placed
where training has signal (neither near 0 nor near 1): ``digits`` (operand size), ``terms`` (operands per
expression) and ``ops`` (a string of ``+``, ``-``, ``*``; ``x`` also means ``*``, since a value starting with ``*``
is not plain YAML on a command line: ``-o ops=x``). The expression is evaluated exactly (integers, the usual
precedence, no ``eval``). Train and test are disjoint by expression (a fifth of the expressions, by a stable hash,
are test), and each split's stream is a function of its seed only and prefix-stable. The train split is a
stream (expressions may repeat, as epochs over a data set do); the test split holds each expression at most once,
so a held-out score counts distinct problems (one-digit products have 25 test expressions; asking for more is an
error that says so).

Scoring is GSM8K's (:func:`tokenmdp.tasks.gsm8k.extract`): by default the last number of the reply
(``extraction="flexible"``); rewards ``(correct, formatted but wrong, no number)``, default ``(1, 0, 0)``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.gsm8k import EXTRACTIONS, extract, to_fraction
from tokenmdp.tasks.task import Problem, Score, Task, check_split

INSTRUCT = "Calculate {question}. End your reply with 'The answer is N.' where N is the result."
PLAIN = "{question} ="
OPS = "+-*"


def _value(operands: list[int], ops: list[str]) -> int:
    """The exact value of ``a0 o0 a1 o1 a2 ...`` with ``*`` before ``+`` and ``-``: ``[2, 3, 4]``, ``["+", "*"]``
    -> 14."""
    terms, sign, product = [], 1, operands[0]
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            product *= b
        else:
            terms.append(sign * product)
            sign, product = (1 if op == "+" else -1), b
    terms.append(sign * product)
    return sum(terms)


def _is_test(expression: str) -> bool:
    return hashlib.sha256(expression.encode()).digest()[0] % 5 == 0


class Arithmetic(Task):
    """``digits``-digit integers joined by ``terms - 1`` operators drawn from ``ops``; answer: the exact value."""

    name = "arithmetic"
    templates = ("instruct", "plain")

    def __init__(self, digits: int = 1, terms: int = 2, ops: str = "*", extraction: str = "flexible",
                 rewards: Sequence[float] = (1.0, 0.0, 0.0), template: str | None = None):
        if not isinstance(digits, int) or not 1 <= digits <= 6:
            raise TokenMDPError(f"task option 'digits' must be an integer in 1..6, got {digits!r}")
        if not isinstance(terms, int) or not 2 <= terms <= 8:
            raise TokenMDPError(f"task option 'terms' must be an integer in 2..8, got {terms!r}")
        if isinstance(ops, str):
            ops = ops.replace("x", "*")
        if not isinstance(ops, str) or not ops or set(ops) - set(OPS):
            raise TokenMDPError(f"task option 'ops' must be a non-empty string of {OPS!r}, got {ops!r}")
        if extraction not in EXTRACTIONS:
            raise TokenMDPError(f"task option 'extraction' is {extraction!r}; choose one of {', '.join(EXTRACTIONS)}")
        if len(rewards) != 3:
            raise TokenMDPError(f"task option 'rewards' must be (correct, formatted, unformatted), got {rewards!r}")
        self.digits, self.terms, self.ops, self.extraction = digits, terms, ops, extraction
        self.rewards = tuple(float(r) for r in rewards)
        self.template = self.resolve_template(template or "instruct")

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        check_split(split)
        if n is None:
            raise TokenMDPError("the arithmetic task generates problems: give n")
        rng = random.Random(f"arithmetic-{split}-{seed}-{self.digits}-{self.terms}-{self.ops}")
        low, high = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        out: list[Problem] = []
        seen: set[str] = set()
        for _ in range(1000 * (n + 1)):
            if len(out) == n:
                break
            operands = [rng.randint(low, high) for _ in range(self.terms)]
            ops = [rng.choice(self.ops) for _ in range(self.terms - 1)]
            text = " ".join(f"{a} {o}" for a, o in zip(operands, ops)) + f" {operands[-1]}"
            if _is_test(text) != (split == "test") or (split == "test" and text in seen):
                continue
            seen.add(text)
            out.append(Problem(id=f"{split}-{len(out)}", question=text, answer=str(_value(operands, ops)),
                               metadata={"operands": operands, "ops": ops}))
        if len(out) < n:
            raise TokenMDPError(f"the arithmetic task found only {len(out)} {split} problems of {n} (too few distinct "
                                f"expressions for digits={self.digits}, terms={self.terms}, ops={self.ops!r})")
        return out

    def render(self, problem: Problem, template: str | None = None) -> str:
        text = {"instruct": INSTRUCT, "plain": PLAIN}[self.resolve_template(template)]
        return text.format(question=problem.question)

    def reference(self, problem: Problem, template: str | None = None) -> str | None:
        return f" The answer is {problem.answer}."

    def score(self, problem: Problem, completion: str) -> Score:
        raw = extract(completion, self.extraction)
        if raw is None:
            return Score(self.rewards[2], False, False, f"no answer found ({self.extraction} extraction)")
        got = to_fraction(raw)
        if got is None:
            return Score(self.rewards[1], False, True, f"answer {raw!r} is not a number")
        if got == int(problem.answer):
            return Score(self.rewards[0], True, True, "correct")
        return Score(self.rewards[1], False, True, f"answer {got} is not {problem.answer}")


__all__ = ["Arithmetic"]
