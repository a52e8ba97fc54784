"""Statistics for evaluations and comparisons: unbiased pass@k, Student-t confidence intervals over seeds,
majority vote and best-of-n.

Everything here is pure (numbers in, numbers out); no model, no file system.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

from tokenmdp.errors import TokenMDPError

__all__ = [
    "pass_at_k",
    "t_quantile",
    "t_cdf",
    "MeanCI",
    "mean_ci",
    "majority_vote",
    "best_of_n",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    ``pass@k = 1 - C(n - c, k) / C(n, k)``: one minus the probability that ``k`` samples drawn without replacement
    from the ``n`` are all wrong. Computed as a product, stable for large ``n``::

        C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)      (and 1 when n - c < k)

    Hand-computed values checked by the tests: ``pass_at_k(5, 2, 2) = 1 - 3/10 = 0.7``;
    ``pass_at_k(8, 3, 4) = 1 - 5/70 = 13/14``; ``pass_at_k(4, 1, 1) = 0.25`` (pass@1 is the fraction correct);
    ``pass_at_k(10, 0, 5) = 0``; ``pass_at_k(5, 3, 3) = 1`` (fewer than k wrong samples).
    """
    if n < 1 or k < 1:
        raise TokenMDPError(f"pass@k needs n >= 1 and k >= 1, got n={n}, k={k}")
    if k > n:
        raise TokenMDPError(f"pass@k needs k <= n (samples per problem), got k={k} > n={n}")
    if not 0 <= c <= n:
        raise TokenMDPError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --- Student t ---------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom: ``F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2`` for t >= 0."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t: the ``t`` with ``t_cdf(t, df) = p`` (bisection to 1e-12).

    Checked against closed forms (df = 1: ``tan(pi (p - 1/2))``; df = 2: ``(2p - 1) / sqrt(2 p (1 - p))``) and the
    table values ``t_{0.975}`` = 12.7062 (df 1), 4.3027 (df 2), 2.7764 (df 4), 2.2622 (df 9).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile needs df > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanCI:
    """Mean over seeds with a two-sided Student-t confidence interval (``low``/``high`` are None when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    half_width: float | None
    std: float | None
    n: int
    confidence: float = 0.95

    @property
    def has_interval(self) -> bool:
        return self.half_width is not None

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.400 ± 0.497"``, or ``"0.400 (n=1, no CI)"`` for one seed; ``"n/a"`` when there is no value."""
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        if self.half_width is None:
            return f"{self.mean * scale:.{digits}f} (n=1, no CI)"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean and ``confidence`` interval of the mean over seeds, Student t with ``n - 1`` degrees of freedom.

    ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation (``n - 1`` in the
    denominator). With one value there is no interval (``low = high = half_width = None``); NaN values (a metric
    missing for a seed) are dropped. Hand computation checked by the tests: ``[0.2, 0.4, 0.6]``: mean 0.4,
    s = 0.2, half width ``4.302653 * 0.2 / sqrt(3) = 0.496827``.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return MeanCI(float("nan"), None, None, None, None, 0, confidence)
    mean = sum(xs) / n
    if n == 1:
        return MeanCI(mean, None, None, None, None, 1, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, half, std, n, confidence)


# --- selection among samples -----------------------------------------------------------------------------------


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    """Index of a sample carrying the most frequent answer, ignoring ``None`` (no parseable answer).

    Ties go to the answer seen first. Returns None when no sample has an answer. Example:
    ``["7", None, "5", "7", "5"]`` -> 0 (``"7"`` and ``"5"`` tie at 2; ``"7"`` came first).
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, a in enumerate(answers):
        if a is not None and counts[a] == best:
            return i
    return None  # pragma: no cover


def best_of_n(rewards: Sequence[float]) -> int:
    """Index of the sample with the highest verifier reward (first one on ties). ``[0.1, 1.0, 0.0, 1.0]`` -> 1."""
    if len(rewards) == 0:
        raise ValueError("best_of_n needs at least one sample")
    best = 0
    for i, r in enumerate(rewards):
        if r > rewards[best]:
            best = i
    return best
