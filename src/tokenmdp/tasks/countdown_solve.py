"""An exhaustive Countdown solver over exact rationals, memoised over multisets of numbers.

``values(M)`` maps every value reachable from the multiset ``M`` (each number used exactly once, binary ``+ - * /``,
any bracketing) to one expression tree of it. It is built from every split of ``M`` into two non-empty
sub-multisets ``(A, B)``: ``values(M) = U_{A,B} { a op b : a in values(A), b in values(B), op in + - * / }`` with
both operand orders and no division by zero; at most ``|values(A)| * |values(B)| * 6`` operations per split.

``solve(nums, target)`` does not build ``values(nums)``: for each split it walks the smaller side ``a in values(A)``
and looks the one operand ``b`` that would give the target up in ``values(B)`` (``b = t - a``, ``a - t``,
``t + a``, ``t / a``, ``a / t``, ``t * a``), so solving 4 numbers needs only the values of sub-multisets of at
most 3 numbers. Among equal values it prefers expressions whose intermediate results are non-negative integers
(fewer fractions and negatives), so that the reasoning steps of a reference solution read naturally.

Expression trees are ``int`` leaves or tuples ``(op, left, right, value)``. Hand-checked numbers used by the tests:
``solve([3, 5, 7], 56) == "(3+5)*7"``; ``solve([1, 1, 1], 5) is None``; the values of ``[2, 3]`` are
``{5, -1, 1, 6, 2/3, 3/2}``; ``[4, 4, 10, 10]`` reaches 24 only through a fraction: ``(10*10-4)/4``.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from itertools import combinations
from collections.abc import Sequence

from tokenmdp.tasks.countdown_verify import Number

Tree = int | tuple
# (badness, tree): badness counts the intermediate results that are negative or not integers.
Entry = tuple[int, Tree]

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _bad(value: Number) -> int:
    return 0 if (type(value) is int and value >= 0) else 1


def _norm(v: Number) -> Number:
    if type(v) is Fraction and v.denominator == 1:
        return v.numerator
    return v


def _splits(ms: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Distinct unordered splits ``(A, B)`` of a sorted multiset, ``|A| <= |B|``, both non-empty."""
    n = len(ms)
    seen, out = set(), []
    for k in range(1, n // 2 + 1):
        for idx in combinations(range(n), k):
            a = tuple(ms[i] for i in idx)
            b = tuple(ms[i] for i in range(n) if i not in idx)
            key = (a, b) if (len(a), a) <= (len(b), b) else (b, a)
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out


def _ops(p1: int, q1: int, p2: int, q2: int) -> tuple[tuple[str, bool, int, int], ...]:
    """``(op, swapped, n, d)`` for the six results ``x op y`` / ``y op x`` of ``x = p1/q1``, ``y = p2/q2``."""
    d = q1 * q2
    return (
        ("+", False, p1 * q2 + p2 * q1, d),
        ("*", False, p1 * p2, d),
        ("-", False, p1 * q2 - p2 * q1, d),
        ("-", True, p2 * q1 - p1 * q2, d),
        ("/", False, p1 * q2, q1 * p2),
        ("/", True, p2 * q1, q2 * p1),
    )


def _rational(n: int, d: int) -> Number:
    """``n / d`` (``d != 0``) as an int when integral, else a normalised Fraction."""
    if n % d == 0:
        return n // d
    return Fraction(n, d)


@lru_cache(maxsize=4096)
def _values(ms: tuple[int, ...]) -> dict[Number, Entry]:
    """``values(M)`` for a sorted tuple ``ms`` (memoised; callers must not mutate the result)."""
    if len(ms) == 1:
        return {ms[0]: (_bad(ms[0]), ms[0])}
    out: dict[Number, Entry] = {}
    for a, b in _splits(ms):
        va, vb = _values(a), _values(b)
        pb = [(y.numerator, y.denominator, ey) for y, ey in vb.items()]
        for x, ex in va.items():
            p1, q1 = x.numerator, x.denominator
            for p2, q2, ey in pb:
                for op, swapped, n, d in _ops(p1, q1, p2, q2):
                    if d == 0:
                        continue
                    v = _rational(n, d)
                    left, right = (ey, ex) if swapped else (ex, ey)
                    bad = left[0] + right[0] + _bad(v)
                    old = out.get(v)
                    if old is None or bad < old[0]:
                        out[v] = (bad, (op, left[1], right[1], v))
    return out


def all_values(nums: Sequence[int]) -> set[Number]:
    """Every value (int or Fraction) reachable from ``nums`` using each number exactly once."""
    return set(_values(tuple(sorted(nums))))


def reachable_targets(nums: Sequence[int], low: int, high: int) -> list[int]:
    """The sorted integers in ``[low, high]`` reachable from ``nums`` (each used once).

    Equal to ``sorted(v for v in all_values(nums) if v is an integer in [low, high])`` but faster: the last
    operation of ``p1/q1 op p2/q2`` is done on the integer numerator ``n`` and denominator ``d`` of the result
    (e.g. ``n = p1 q2 + p2 q1, d = q1 q2`` for ``+``) and kept only when ``d`` divides ``n`` and ``n / d`` lies in
    range, so no Fraction is built for the full set.
    """
    ms = tuple(sorted(nums))
    if len(ms) == 1:
        return [ms[0]] if low <= ms[0] <= high else []
    found: set[int] = set()
    for a, b in _splits(ms):
        pb = _pairs(b)
        for p1, q1 in _pairs(a):
            for p2, q2 in pb:
                for _, _, n, d in _ops(p1, q1, p2, q2):
                    if d and n % d == 0 and low <= n // d <= high:
                        found.add(n // d)
    return sorted(found)


@lru_cache(maxsize=4096)
def _pairs(ms: tuple[int, ...]) -> list[tuple[int, int]]:
    """The values of ``ms`` as ``(numerator, denominator)`` pairs of ints (for integer-only arithmetic)."""
    return [(v.numerator, v.denominator) for v in _values(ms)]


def _candidates(a: Number, t: Number) -> list[tuple[str, Number, bool]]:
    """``(op, b, a_first)`` such that ``a op b == t`` (a_first) or ``b op a == t`` (not a_first)."""
    out = [("+", t - a, True), ("-", a - t, True), ("-", t + a, False)]
    if a != 0:
        out.append(("*", _norm(Fraction(t) / a), True))
        out.append(("/", _norm(Fraction(t) * a), False))
        if t != 0:
            out.append(("/", _norm(Fraction(a) / t), True))
    return out


def solve_tree(nums: Sequence[int], target: int) -> Tree | None:
    """An expression tree with value ``target`` using each of ``nums`` once (the least "bad" one), or ``None``."""
    ms = tuple(sorted(nums))
    if len(ms) == 1:
        return ms[0] if ms[0] == target else None
    best: tuple[int, Tree] | None = None
    for a, b in _splits(ms):
        va, vb = _values(a), _values(b)
        for x, ex in va.items():
            if x == 0 and target == 0:  # 0 * b == 0 for every b
                y, ey = next(iter(vb.items()))
                return ("*", ex[1], ey[1], 0)
            for op, y, x_first in _candidates(x, target):
                ey = vb.get(y)
                if ey is None or (op == "/" and (y if x_first else x) == 0):
                    continue
                bad = ex[0] + ey[0]
                if best is None or bad < best[0]:
                    tree = (op, ex[1], ey[1], target) if x_first else (op, ey[1], ex[1], target)
                    best = (bad, tree)
                    if bad == 0:
                        return tree
    return None if best is None else best[1]


def to_expression(tree: Tree, spaced: bool = False) -> str:
    """Infix text of a tree with only the parentheses precedence needs: ``("*", ("+", 3, 5, 8), 7, 56)`` ->
    ``"(3+5)*7"`` (``"(3 + 5) * 7"`` when ``spaced``)."""
    return _infix(tree, spaced)[0]


def _infix(tree: Tree, spaced: bool) -> tuple[str, int]:
    if not isinstance(tree, tuple):
        return str(tree), 3
    op, left, right, _ = tree
    ls, lp = _infix(left, spaced)
    rs, rp = _infix(right, spaced)
    prec = _PREC[op]
    if lp < prec:
        ls = f"({ls})"
    if rp < prec or (rp == prec and op in "-/"):
        rs = f"({rs})"
    sep = " " if spaced else ""
    return f"{ls}{sep}{op}{sep}{rs}", prec


def to_steps(tree: Tree) -> list[tuple[Number, str, Number, Number]]:
    """The binary operations of a tree in evaluation order, as ``(a, op, b, c)`` with ``c = a op b``."""
    steps: list[tuple[Number, str, Number, Number]] = []

    def walk(node: Tree) -> Number:
        if not isinstance(node, tuple):
            return node
        op, left, right, value = node
        a, b = walk(left), walk(right)
        steps.append((a, op, b, value))
        return value

    walk(tree)
    return steps


def format_number(v: Number, operand: bool) -> str:
    """Step notation: ``7`` -> ``"7"``; as an operand ``-3`` -> ``"(-3)"`` and ``7/2`` -> ``"(7/2)"``; as a result
    ``-3`` -> ``"-3"`` and ``7/2`` -> ``"7/2"``."""
    if type(v) is int and v >= 0:
        return str(v)
    text = str(v)
    return f"({text})" if operand else text


def format_step(a: Number, op: str, b: Number, c: Number, spaced: bool = False) -> str:
    """``(3, "+", 5, 8)`` -> ``"3+5=8"`` (``"3 + 5 = 8"`` when ``spaced``)."""
    sep = " " if spaced else ""
    return f"{format_number(a, True)}{sep}{op}{sep}{format_number(b, True)}{sep}={sep}{format_number(c, False)}"


def solve(nums: Sequence[int], target: int) -> str | None:
    """One expression (compact infix, e.g. ``"(3+5)*7"``) equal to ``target`` using each of ``nums`` once."""
    tree = solve_tree(nums, target)
    return None if tree is None else to_expression(tree)
