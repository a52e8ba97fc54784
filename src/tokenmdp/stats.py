"""Statistics for evaluations and comparisons: unbiased pass@k, Student-t confidence intervals over seeds, paired
differences with their p-value and minimum detectable difference, bootstrap intervals, verdict helpers, least-squares
slopes, majority vote and best-of-n.

The distributions come from ``scipy.stats`` (t quantiles, the paired t test, the noncentral t of the power
calculation, the bootstrap); ``scipy`` is imported on first use. Everything here is pure (numbers in, numbers out);
no model, no file system.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tokenmdp.errors import TokenMDPError

__all__ = [
    "pass_at_k",
    "t_quantile",
    "t_cdf",
    "MeanCI",
    "mean_ci",
    "PairedDiff",
    "paired_difference",
    "min_detectable_difference",
    "BootstrapCI",
    "bootstrap_ci",
    "SUPPORTED",
    "CONTRADICTED",
    "INCONCLUSIVE",
    "equivalence_verdict",
    "direction_verdict",
    "ls_slope",
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


# --- Student t (scipy.stats) -------------------------------------------------------------------------------------


def _scipy_stats():
    """``scipy.stats``, imported on first use: it takes most of a second, and evaluate/the CLI import this module."""
    import scipy.stats

    return scipy.stats


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom (``scipy.stats.t.cdf``)."""
    return float(_scipy_stats().t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t: the ``t`` with ``t_cdf(t, df) = p`` (``scipy.stats.t.ppf``).

    Checked against closed forms (df = 1: ``tan(pi (p - 1/2))``; df = 2: ``(2p - 1) / sqrt(2 p (1 - p))``) and the
    table values ``t_{0.975}`` = 12.7062 (df 1), 4.3027 (df 2), 2.7764 (df 4), 2.2622 (df 9).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile needs df > 0, got {df}")
    return float(_scipy_stats().t.ppf(p, df))


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


# --- paired differences over seeds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDiff:
    """Mean of the paired differences ``a_i - b_i`` (one pair a seed) with its two-sided Student-t interval, the
    sample standard deviation ``sd`` of the differences, the two-sided paired-t ``p_value`` and ``mdd``, the smallest
    true difference the test detects with probability ``power`` at level ``alpha`` with this ``n`` and ``sd``.

    With one pair there is no interval: ``low``, ``high``, ``sd`` and ``p_value`` are NaN and ``mdd`` is infinite.
    """

    n: int
    mean: float
    low: float
    high: float
    sd: float
    p_value: float
    mdd: float
    confidence: float = 0.95
    power: float = 0.8
    alpha: float = 0.05

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def _two_sided_t_power(nc: float, df: int, crit: float) -> float:
    """``P(|T| > crit)`` for ``T ~ nct(df, nc)``, ``nc >= 0``. scipy's far tail can come back NaN where it is below
    1e-15 or so: it counts as 0."""
    st = _scipy_stats()
    upper = float(st.nct.sf(crit, df, nc))
    if not math.isfinite(upper):
        upper = 1.0 - float(st.nct.cdf(crit, df, nc))
    lower = float(st.nct.cdf(-crit, df, nc))
    return upper + (lower if math.isfinite(lower) else 0.0)


def min_detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean difference ``delta`` that a two-sided one-sample (paired) t test of level ``alpha`` on
    ``n`` differences of standard deviation ``sd`` rejects with probability ``power``.

    Exact, from the noncentral t: the test statistic is ``T ~ nct(df = n - 1, nc = delta sqrt(n) / sd)`` and
    ``power(delta) = P(T > c) + P(T < -c)``, ``c = t_{1 - alpha/2, n-1}``; ``delta`` is found by root finding
    (``scipy.optimize.brentq``). The textbook approximation ``(t_{1-alpha/2,n-1} + t_{power,n-1}) sd / sqrt(n)``
    (which drops the far tail and uses a central t) is close for large ``n`` and is the starting bracket.
    Checked by the tests: ``sd = 1, n = 10`` gives ``delta = 0.9960`` (a d = 1 effect with 10 pairs has power
    0.8031); ``n = 3``: 3.264 (the approximation says 3.097); ``n = 100``: 0.2829 (as the approximation).
    ``n < 2``: infinite (no test); ``sd = 0``: zero.
    """
    if not 0.0 < alpha < power < 1.0:
        raise ValueError(f"min_detectable_difference needs 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if n < 2 or not math.isfinite(sd):
        return math.inf
    if sd == 0.0:
        return 0.0
    from scipy.optimize import brentq

    st = _scipy_stats()
    df = n - 1
    crit = float(st.t.ppf(1.0 - alpha / 2.0, df))
    hi = 2.0 * (crit + float(st.t.ppf(power, df)))
    while _two_sided_t_power(hi, df, crit) < power:
        hi *= 2.0
    nc = brentq(lambda x: _two_sided_t_power(x, df, crit) - power, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return float(nc) * sd / math.sqrt(n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, power: float = 0.8,
                      alpha: float = 0.05) -> PairedDiff:
    """Paired comparison of ``a`` and ``b`` (``a[i]`` and ``b[i]`` measured on the same seed, so on the same prompts):
    mean of ``d_i = a_i - b_i`` with ``mean ± t_{(1+confidence)/2, n-1} sd / sqrt(n)``, the two-sided paired t test
    (``scipy.stats.ttest_rel``) and :func:`min_detectable_difference` at ``power`` and ``alpha``.

    Pairs where either value is None or NaN are dropped. No pair left: :class:`TokenMDPError`. One pair: NaN
    interval, NaN p-value, infinite ``mdd``. All differences equal (``sd = 0``): the interval is that one point,
    p = 1 when it is 0 and 0 otherwise, ``mdd = 0``.

    Hand computation checked by the tests: ``a = [0.50, 0.42, 0.61]``, ``b = [0.45, 0.40, 0.52]``: ``d = [0.05,
    0.02, 0.09]``, mean 0.053333, sd 0.035119, half width ``4.302653 * 0.035119 / sqrt(3) = 0.087241``,
    t = 0.053333 / (0.035119 / sqrt(3)) = 2.6304, and with df 2 the closed form ``p = 1 - |t| / sqrt(2 + t^2)``
    gives p = 0.11923.
    """
    if len(a) != len(b):
        raise TokenMDPError(f"paired difference needs as many values on each side, got {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    n = len(pairs)
    if n == 0:
        raise TokenMDPError("paired difference needs at least one pair of finite values, got none")
    xs = np.array([p[0] for p in pairs])
    ys = np.array([p[1] for p in pairs])
    d = xs - ys
    mean = float(d.mean())
    nan = math.nan
    if n == 1:
        return PairedDiff(1, mean, nan, nan, nan, nan, math.inf, confidence, power, alpha)
    sd = float(d.std(ddof=1))
    if sd <= 1e-14 * max(1.0, abs(mean)):  # equal differences (up to rounding): a degenerate, exact interval
        return PairedDiff(n, mean, mean, mean, 0.0, 1.0 if mean == 0.0 else 0.0, 0.0, confidence, power, alpha)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    p_value = float(_scipy_stats().ttest_rel(xs, ys).pvalue)
    mdd = min_detectable_difference(sd, n, power, alpha)
    return PairedDiff(n, mean, mean - half, mean + half, sd, p_value, mdd, confidence, power, alpha)


# --- bootstrap ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapCI:
    """A statistic of a sample with its bootstrap ``confidence`` interval (NaN bounds when n < 2)."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    method: str = "BCa"

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_ci(values: Sequence[float], statistic=np.mean, confidence: float = 0.95, seed: int = 0,
                 n_resamples: int = 9999, method: str = "BCa") -> BootstrapCI:
    """Bootstrap interval of ``statistic`` (default the mean) of ``values`` (``scipy.stats.bootstrap``), for
    samples too small or too skewed for the Student-t interval to be trusted (rates near 0 or 1, lengths).

    ``method="BCa"`` (default): the bias-corrected and accelerated percentile interval, which corrects the plain
    percentile interval for the bias and the skew of the statistic's distribution; where it is undefined (a
    sample whose jackknife values are all equal) the plain ``"percentile"`` interval is returned instead and
    ``method`` says so. Resampling is reproducible from ``seed``. None/NaN values are dropped; none left:
    :class:`TokenMDPError`; one value: NaN bounds; all values equal: the interval is that point. With very few
    values (3 seeds give 10 distinct resamples) the bootstrap is coarse; prefer :func:`mean_ci` /
    :func:`paired_difference` there, and read this one as a check on skew.
    """
    xs = np.array([float(v) for v in values if _finite(v)])
    n = len(xs)
    if n == 0:
        raise TokenMDPError("bootstrap interval needs at least one finite value, got none")
    estimate = float(statistic(xs))
    if n == 1:
        return BootstrapCI(estimate, math.nan, math.nan, 1, confidence, method)
    if np.all(xs == xs[0]):
        return BootstrapCI(estimate, estimate, estimate, n, confidence, method)
    st = _scipy_stats()
    import inspect

    rng = np.random.default_rng(seed)
    seed_arg = {"rng": rng} if "rng" in inspect.signature(st.bootstrap).parameters else {"random_state": rng}
    used = method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = st.bootstrap((xs,), statistic, confidence_level=confidence, n_resamples=n_resamples, method=method,
                           **seed_arg)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if method.lower() == "bca" and not (math.isfinite(low) and math.isfinite(high)):
            used = "percentile"
            res = st.bootstrap((xs,), statistic, confidence_level=confidence, n_resamples=n_resamples,
                               method="percentile", **seed_arg)
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return BootstrapCI(estimate, low, high, n, confidence, used)


# --- verdicts from intervals -------------------------------------------------------------------------------------

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this power"


def equivalence_verdict(diff: PairedDiff, margin: float) -> str:
    """Is the difference negligible? A TOST-like reading of the ``diff.confidence`` interval against the
    equivalence region ``(-margin, margin)``: :data:`SUPPORTED` when the interval lies inside it,
    :data:`CONTRADICTED` when it lies wholly outside (``high <= -margin`` or ``low >= margin``), else
    :data:`INCONCLUSIVE` (also with one pair: no interval). With the default 95% interval this is TOST at level
    2.5% a side, stricter than the usual 90% interval of a 5% TOST.
    """
    if margin <= 0:
        raise ValueError(f"equivalence margin must be positive, got {margin}")
    if not diff.has_interval:
        return INCONCLUSIVE
    if -margin < diff.low and diff.high < margin:
        return SUPPORTED
    if diff.high <= -margin or diff.low >= margin:
        return CONTRADICTED
    return INCONCLUSIVE


def direction_verdict(diff: PairedDiff, direction: int, margin: float = 0.0) -> str:
    """One-sided reading of "``a`` is below ``b``" (``direction=-1``) or "above" (``+1``) from the interval of
    ``a - b``: :data:`SUPPORTED` when the whole interval lies on the predicted side of 0 (significant at
    ``(1 - confidence) / 2`` one-sided); :data:`CONTRADICTED` when it rules out an effect of at least ``margin`` in
    the predicted direction (below: ``low > -margin``; above: ``high < margin``) and is not wholly on the predicted
    side; else :data:`INCONCLUSIVE` (also with one pair)."""
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 (below) or +1 (above), got {direction}")
    if margin < 0:
        raise ValueError(f"margin must not be negative, got {margin}")
    if not diff.has_interval:
        return INCONCLUSIVE
    low, high = (diff.low, diff.high) if direction == 1 else (-diff.high, -diff.low)
    if low > 0:
        return SUPPORTED
    if high < margin:
        return CONTRADICTED
    return INCONCLUSIVE


def ls_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` on ``x``: ``sum (x - mean x)(y - mean y) / sum (x - mean x)^2``; pairs with a
    NaN dropped; NaN when fewer than two distinct ``x`` remain. ``[1, 2, 3, 4]``, ``[10, 12, 13, 17]`` -> 2.2."""
    pts = [(float(a), float(b)) for a, b in zip(x, y) if _finite(a) and _finite(b)]
    if len({p[0] for p in pts}) < 2:
        return math.nan
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    dx = xs - xs.mean()
    return float((dx * (ys - ys.mean())).sum() / (dx * dx).sum())


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
