"""The Countdown verifier: a safe parser of the answer equation and a checker of the reasoning steps.

Nothing here calls ``eval``. The answer is the text inside the LAST ``<answer>...</answer>`` pair of the
completion. Its grammar, checked before and while parsing with :mod:`ast`::

    answer := expr [ "=" INT ]          # an optional trailing "= <target>"; the integer must equal the target
    expr   := INT | "-" expr | "(" expr ")" | expr ("+" | "-" | "*" | "/") expr

with ``INT`` a non-negative integer literal in ASCII digits. Anything else is rejected with a reason: ``**``
(exponentiation, rejected before parsing, so ``9**9**9`` costs microseconds), ``//``, ``%``, names, calls,
attributes, floats, unary plus, non-ASCII digits or letters, and expressions longer than ``max_chars``. Values are
exact: integers stay ``int`` and a non-integral quotient becomes a :class:`fractions.Fraction`; division by zero
makes the answer wrong, not a crash. The multiset of integer literals must equal the multiset of given numbers.

Steps (:func:`score_steps`) are the matches of ``a op b = c`` inside the reasoning (the text before the first
``</think>``, or the whole completion when there is none). Operands are integers, or parenthesised negative
integers or fractions such as ``(-3)`` or ``(7/2)``; ``op`` is one of ``+ - * /`` (``x``, ``×`` and ``÷`` are
read as ``*`` and ``/``); the result may also be written ``-3`` or ``7/2``. A step is correct when its arithmetic
is true and both operands are available: the pool starts as the given numbers, a correct step consumes its two
operands and adds its result. A step followed by ``" no"`` (:data:`DEAD_END`, the marker of an abandoned attempt
in the tiny base model's search traces, :mod:`tokenmdp.base.traces`) resets the pool to the given numbers.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from collections.abc import Sequence

from tokenmdp.tasks.task import StepScore

Number = int | Fraction

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_CLOSE = "</think>"
DEFAULT_MAX_CHARS = 256
DEAD_END = " no"  # after a step: that attempt is abandoned; the next step starts again from the given numbers

_BAD_CHAR = re.compile(r"[^0-9+\-*/() \t\n=]")
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class Reject(Exception):
    """The expression is not acceptable; the message is the reason."""


def extract_answer(completion: str) -> str | None:
    """The stripped text inside the last ``<answer>...</answer>`` pair, or ``None`` when there is no pair."""
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(ANSWER_OPEN) : end].strip()


def divide(a: Number, b: Number) -> Number:
    """Exact ``a / b``: an ``int`` when it divides evenly, else a :class:`Fraction`. Raises ZeroDivisionError."""
    if b == 0:
        raise ZeroDivisionError
    if type(a) is int and type(b) is int:
        q, r = divmod(a, b)
        return q if r == 0 else Fraction(a, b)
    v = Fraction(a) / b
    return v.numerator if v.denominator == 1 else v


def apply_op(op: str, a: Number, b: Number) -> Number:
    """``a op b`` exactly, for op in ``+ - * /`` (see :func:`divide`)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return divide(a, b)


def _evaluate(node: ast.AST, literals: list[int]) -> Number:
    """Evaluate an allowed AST node exactly, appending every integer literal to ``literals``."""
    kind = type(node)
    if kind is ast.BinOp:
        left = _evaluate(node.left, literals)
        right = _evaluate(node.right, literals)
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise Reject(f"operator {type(node.op).__name__} not allowed")
        if op == "/" and right == 0:
            raise Reject("division by zero")
        return apply_op(op, left, right)
    if kind is ast.Constant:
        value = node.value
        if type(value) is not int:
            raise Reject(f"literal {value!r} is not an integer")
        literals.append(value)
        return value
    if kind is ast.UnaryOp:
        if type(node.op) is not ast.USub:
            raise Reject(f"unary {type(node.op).__name__} not allowed")
        return -_evaluate(node.operand, literals)
    raise Reject(f"{kind.__name__} not allowed")


def parse_expression(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[Number, list[int], int | None]:
    """Parse and evaluate an answer expression safely.

    Returns ``(value, literals, claimed)`` where ``literals`` are the integer literals in order of appearance and
    ``claimed`` is the integer after a trailing ``=`` (``None`` without one). Raises :class:`Reject` with the reason
    otherwise. Example: ``parse_expression("(3+5)*7 = 56") == (56, [3, 5, 7], 56)``.
    """
    if not text:
        raise Reject("empty answer")
    if len(text) > max_chars:
        raise Reject(f"expression too long ({len(text)} > {max_chars} characters)")
    bad = _BAD_CHAR.search(text)
    if bad:
        ch = bad.group()
        if ch.isdigit():
            raise Reject(f"non-ASCII digit {ch!r} not allowed")
        if ch == ".":
            raise Reject("decimal point not allowed (integers only)")
        raise Reject(f"character {ch!r} not allowed")
    if "**" in text:
        raise Reject("exponentiation not allowed")
    if "//" in text:
        raise Reject("floor division not allowed")
    claimed = None
    if "=" in text:
        text, _, rhs = text.partition("=")
        rhs = rhs.strip()
        if not rhs.isdigit():
            raise Reject(f"right-hand side {rhs!r} of '=' is not a single integer")
        claimed = int(rhs)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise Reject("syntax error") from None
    literals: list[int] = []
    try:
        value = _evaluate(tree.body, literals)
    except RecursionError:
        raise Reject("expression nested too deeply") from None
    return value, literals, claimed


def check_numbers(literals: Sequence[int], nums: Sequence[int]) -> str | None:
    """``None`` when ``literals`` use each of ``nums`` exactly once, else the reason (first difference found)."""
    if len(literals) == len(nums) and sorted(literals) == sorted(nums):
        return None
    used, given = Counter(literals), Counter(nums)
    for n in sorted(used):
        if n not in given:
            return f"number {n} is not given"
        if used[n] > given[n]:
            return f"number {n} used {used[n]} times, given {given[n]}"
    missing = sorted((given - used).elements())
    return f"number{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} not used"


def verify_equation(text: str, nums: Sequence[int], target: int, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """``None`` when ``text`` is a correct equation for ``(nums, target)``, else the reason it is not."""
    try:
        value, literals, claimed = parse_expression(text, max_chars)
    except Reject as exc:
        return str(exc)
    if claimed is not None and claimed != target:
        return f"equation claims {claimed}, target is {target}"
    reason = check_numbers(literals, nums)
    if reason:
        return reason
    if value != target:
        return f"value {value} is not the target {target}"
    return None


# ----------------------------------------------------------------------------------------------------------- steps
_OPERAND = r"(?:[0-9]+|\(\s*-?[0-9]+(?:\s*/\s*[0-9]+)?\s*\))"
_RESULT = r"(?:-?[0-9]+(?:/[0-9]+)?|\(\s*-?[0-9]+(?:\s*/\s*[0-9]+)?\s*\))"
STEP_PATTERN = re.compile(
    rf"(?<![0-9A-Za-z_.)+\-*/])({_OPERAND})\s*([-+*/x×÷])\s*({_OPERAND})\s*=\s*({_RESULT})(?!\.?[0-9])(?!\s*/)"
)
OP_ALIASES = {"x": "*", "×": "*", "÷": "/"}


MAX_STEP_DIGITS = 30  # no Countdown step needs a longer number; Python refuses to read ints over 4,300 digits


def parse_number(text: str) -> Number:
    """An operand or result as an exact number: ``"7" -> 7``, ``"(-3)" -> -3``, ``"(7/2)"`` and ``"7/2" -> 7/2``.

    Raises ZeroDivisionError for a zero denominator, ValueError for a numeral longer than
    :data:`MAX_STEP_DIGITS` digits (found by fuzzing: a 5,000-digit operand raised from inside ``int``).
    """
    text = text.strip().strip("()").replace(" ", "")
    if sum(ch.isdigit() for ch in text) > MAX_STEP_DIGITS:
        raise ValueError(f"number longer than {MAX_STEP_DIGITS} digits")
    if "/" in text:
        p, q = text.split("/")
        return divide(int(p), int(q))
    return int(text)


def reasoning_span(completion: str) -> tuple[int, int]:
    """``(0, end)``: the reasoning is everything before the first ``</think>`` (all of it if there is none)."""
    end = completion.find(THINK_CLOSE)
    return 0, (len(completion) if end < 0 else end)


def score_steps(completion: str, nums: Sequence[int]) -> list[StepScore]:
    """Check every ``a op b = c`` step of the reasoning in order (see the module docstring).

    Example with nums ``[3, 5, 7]``: ``"3+5=8\\n8*7=56\\n"`` gives two correct steps; ``"3+5=9"`` is wrong
    ("3+5 is 8, not 9"); ``"5+5=10"`` after ``"3+5=8"`` is true arithmetic but uses an unavailable 5.
    """
    start, end = reasoning_span(completion)
    pool: Counter = Counter(nums)
    out: list[StepScore] = []
    for m in STEP_PATTERN.finditer(completion, start, end):
        a_txt, op, b_txt, c_txt = m.groups()
        op = OP_ALIASES.get(op, op)
        correct, reason = False, "ok"
        try:
            a, b, c = parse_number(a_txt), parse_number(b_txt), parse_number(c_txt)
            value = apply_op(op, a, b)
        except ZeroDivisionError:
            reason = "division by zero"
        except ValueError as exc:
            reason = str(exc)
        else:
            if value != c:
                reason = f"{a}{op}{b} is {value}, not {c}"
            else:
                need = Counter([a, b])
                missing = [x for x in need if pool[x] < need[x]]
                if missing:
                    reason = f"operand {missing[0]} not available"
                else:
                    pool -= need
                    pool[c] += 1
                    correct = True
        out.append(StepScore(text=m.group(), correct=correct, reason=reason, start=m.start(), end=m.end()))
        if completion.startswith(DEAD_END, m.end()):
            pool = Counter(nums)
    return out
