"""pass@k, Student-t confidence intervals, paired differences, bootstrap intervals, verdict helpers, majority vote
and best-of-n against hand computations."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    PairedDiff,
    best_of_n,
    bootstrap_ci,
    direction_verdict,
    equivalence_verdict,
    ls_slope,
    majority_vote,
    mean_ci,
    min_detectable_difference,
    paired_difference,
    pass_at_k,
    t_cdf,
    t_quantile,
)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (8, 3, 4, 1 - 5 / 70),  # 1 - C(5,4)/C(8,4) = 13/14
        (4, 1, 1, 0.25),  # pass@1 = c/n
        (8, 5, 1, 5 / 8),
        (10, 0, 5, 0.0),  # nothing correct
        (5, 3, 3, 1.0),  # only 2 wrong samples: every draw of 3 holds a correct one
        (8, 8, 8, 1.0),
        (8, 1, 8, 1.0),
        (3, 1, 2, 1 - 1 / 3),  # 1 - C(2,2)/C(3,2)
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumeration_of_draws():
    """pass@k is the fraction of k-subsets of the n samples that hold at least one correct sample."""
    samples = [1, 0, 0, 1, 0, 0, 0]
    n, c = len(samples), sum(samples)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        exact = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 100) overflows floats; the product form does not. Against exact integers:
    n, c, k = 1000, 3, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert 0.0 < pass_at_k(100000, 1, 10) == pytest.approx(10 / 100000, rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 5, 1), (0, 0, 1), (4, -1, 2), (4, 1, 0)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(TokenMDPError, match="pass@k"):
        pass_at_k(n, c, k)


def test_t_quantile_closed_forms_and_table():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452}
    for df, t in table.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)  # tends to the normal
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    # df = 2 closed form of the cdf: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert t_cdf(1.5, 2) == pytest.approx(0.5 + 1.5 / (2 * math.sqrt(2 + 1.5**2)), rel=1e-12)
    assert t_cdf(t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.5, 0)


def test_mean_ci_hand_computation():
    # [0.2, 0.4, 0.6]: mean 0.4, s = sqrt((0.04 + 0 + 0.04) / 2) = 0.2, half width t_{.975,2} * 0.2 / sqrt(3)
    ci = mean_ci([0.2, 0.4, 0.6])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # = 0.496827
    assert ci.n == 3
    assert ci.mean == pytest.approx(0.4)
    assert ci.std == pytest.approx(0.2)
    assert ci.half_width == pytest.approx(half, rel=1e-8)
    assert ci.half_width == pytest.approx(0.496827, abs=1e-6)
    assert (ci.low, ci.high) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert ci.format() == "0.400 ± 0.497"
    # two seeds [1, 3]: mean 2, s = sqrt(2), half = 12.7062 * sqrt(2) / sqrt(2) = 12.7062
    assert mean_ci([1.0, 3.0]).half_width == pytest.approx(12.706204736, rel=1e-8)


def test_mean_ci_one_seed_has_no_interval_and_nan_is_dropped():
    ci = mean_ci([0.3])
    assert ci.mean == 0.3 and ci.n == 1
    assert ci.low is None and ci.high is None and ci.half_width is None
    assert not ci.has_interval
    assert "no CI" in ci.format()
    assert mean_ci([0.3, float("nan")]).n == 1
    empty = mean_ci([])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.format() == "n/a"


def test_mean_ci_coverage_on_normal_samples():
    """About 95% of intervals from 5 normal draws cover the true mean (binomial tolerance over 2000 trials)."""
    rng = random.Random(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        ci = mean_ci([rng.gauss(1.0, 2.0) for _ in range(5)])
        covered += ci.low <= 1.0 <= ci.high
    assert abs(covered / trials - 0.95) < 0.015  # 3 binomial standard deviations ~ 0.0146


def test_majority_vote_and_best_of_n():
    assert majority_vote(["7", None, "5", "7", "5"]) == 0  # tie 2-2: first seen wins
    assert majority_vote([None, "5", "7", "5"]) == 1
    assert majority_vote([None, None]) is None
    assert majority_vote([(1, 2), (1, 2), (3,)]) == 0
    assert best_of_n([0.1, 1.0, 0.0, 1.0]) == 1
    assert best_of_n([0.0, 0.0]) == 0
    with pytest.raises(ValueError):
        best_of_n([])


# --- paired differences ------------------------------------------------------------------------------------------


def test_paired_difference_hand_computation():
    a, b = [0.50, 0.42, 0.61], [0.45, 0.40, 0.52]
    # d = [0.05, 0.02, 0.09]: mean 0.16 / 3, sd = sqrt(((0.05-m)^2 + (0.02-m)^2 + (0.09-m)^2) / 2)
    m = 0.16 / 3
    sd = math.sqrt(((0.05 - m) ** 2 + (0.02 - m) ** 2 + (0.09 - m) ** 2) / 2)
    assert sd == pytest.approx(0.035119, abs=1e-6)
    half = 4.302652729911275 * sd / math.sqrt(3)
    t = m / (sd / math.sqrt(3))
    d = paired_difference(a, b)
    assert d.n == 3
    assert d.mean == pytest.approx(m)
    assert d.sd == pytest.approx(sd)
    assert (d.low, d.high) == (pytest.approx(m - half), pytest.approx(m + half))
    assert half == pytest.approx(0.087241, abs=1e-6)
    assert t == pytest.approx(2.6304, abs=1e-4)
    assert d.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # df 2 closed form
    assert d.p_value == pytest.approx(0.11923, abs=1e-5)
    assert d.mdd == pytest.approx(min_detectable_difference(sd, 3))
    assert d.has_interval
    assert d.to_dict()["mean"] == pytest.approx(m) and set(d.to_dict()) >= {"n", "low", "high", "p_value", "mdd"}
    # swapping the sides negates the difference, keeps the p-value
    r = paired_difference(b, a)
    assert (r.mean, r.low, r.high) == (pytest.approx(-m), pytest.approx(-d.high), pytest.approx(-d.low))
    assert r.p_value == pytest.approx(d.p_value)


def test_paired_difference_small_samples_and_nan():
    one = paired_difference([0.3], [0.1])
    assert one.n == 1 and one.mean == pytest.approx(0.2)
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.p_value) and math.isnan(one.sd)
    assert one.mdd == math.inf and not one.has_interval
    with pytest.raises(TokenMDPError, match="at least one pair"):
        paired_difference([], [])
    with pytest.raises(TokenMDPError, match="at least one pair"):
        paired_difference([float("nan")], [0.1])
    with pytest.raises(TokenMDPError, match="as many"):
        paired_difference([0.1, 0.2], [0.1])
    # a NaN on either side drops the pair: [1, 3] - [0, 0]
    two = paired_difference([1.0, float("nan"), 3.0], [0.0, 0.0, None])
    assert two.n == 1 and two.mean == 1.0
    two = paired_difference([1.0, 2.0, 3.0, float("nan")], [0.0, 0.0, 0.0, 1.0])
    assert two.n == 3 and two.mean == pytest.approx(2.0)
    # equal differences: a point interval, no crash
    same = paired_difference([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    assert (same.low, same.high, same.sd, same.mdd) == (pytest.approx(0.1), pytest.approx(0.1), 0.0, 0.0)
    assert same.p_value == 0.0
    zero = paired_difference([0.3, 0.4], [0.3, 0.4])
    assert (zero.mean, zero.low, zero.high, zero.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_min_detectable_difference_noncentral_t():
    import scipy.stats as st

    # Cohen's table: a d = 1 effect with 10 pairs has power 0.803, so the 80% detectable difference is just below 1
    assert min_detectable_difference(1.0, 10) == pytest.approx(0.9960, abs=1e-4)
    for n in (2, 3, 5, 10):
        delta = min_detectable_difference(2.0, n)
        crit = st.t.ppf(0.975, n - 1)
        nc = delta * math.sqrt(n) / 2.0
        assert st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8, abs=1e-9)
    # the approximation (t_{.975,n-1} + t_{.8,n-1}) sd / sqrt(n) is close for large n, optimistic for small n
    approx3 = (4.302653 + 1.060660) / math.sqrt(3)
    assert approx3 == pytest.approx(3.0965, abs=1e-4)
    assert min_detectable_difference(1.0, 3) == pytest.approx(3.2640, abs=1e-4) and 3.264 > approx3
    approx100 = (st.t.ppf(0.975, 99) + st.t.ppf(0.8, 99)) / 10
    assert min_detectable_difference(1.0, 100) == pytest.approx(approx100, rel=1e-3)
    # scale: proportional to sd; higher power or lower alpha needs a larger difference
    assert min_detectable_difference(3.0, 5) == pytest.approx(3 * min_detectable_difference(1.0, 5))
    assert min_detectable_difference(1.0, 5, power=0.9) > min_detectable_difference(1.0, 5)
    assert min_detectable_difference(1.0, 5, alpha=0.01) > min_detectable_difference(1.0, 5)
    assert min_detectable_difference(1.0, 1) == math.inf
    assert min_detectable_difference(0.0, 4) == 0.0


def test_paired_difference_p_value_agrees_with_scipy_and_covers():
    import scipy.stats as st

    rng = random.Random(1)
    a = [rng.gauss(0, 1) for _ in range(6)]
    b = [x + rng.gauss(0.5, 0.3) for x in a]
    d = paired_difference(a, b)
    assert d.p_value == pytest.approx(st.ttest_rel(a, b).pvalue)
    ci = mean_ci([x - y for x, y in zip(a, b)])
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))


# --- bootstrap ---------------------------------------------------------------------------------------------------


def test_bootstrap_ci():
    ci = bootstrap_ci([1.0, 2.0, 3.0, 10.0, 4.0])
    assert ci.estimate == pytest.approx(4.0) and ci.n == 5 and ci.method == "BCa"
    assert 1.0 <= ci.low < 4.0 < ci.high <= 10.0
    assert bootstrap_ci([1.0, 2.0, 3.0, 10.0, 4.0]) == ci  # reproducible from the seed
    # skew: BCa moves the interval toward the long tail more than the percentile interval of the mean does
    pct = bootstrap_ci([1.0, 2.0, 3.0, 10.0, 4.0], method="percentile")
    assert pct.method == "percentile" and ci.high >= pct.high
    # a statistic other than the mean
    med = bootstrap_ci([1.0, 2.0, 3.0, 10.0, 4.0], statistic=np.median)
    assert med.estimate == 3.0 and med.low <= 3.0 <= med.high
    # small samples: one value has no interval, equal values a point interval
    one = bootstrap_ci([0.3])
    assert one.estimate == 0.3 and math.isnan(one.low) and math.isnan(one.high)
    assert bootstrap_ci([0.2, 0.2, 0.2]).to_dict() == {"estimate": pytest.approx(0.2), "low": pytest.approx(0.2),
                                                        "high": pytest.approx(0.2), "n": 3, "confidence": 0.95,
                                                        "method": "BCa"}
    assert bootstrap_ci([0.1, float("nan"), 0.3]).n == 2
    with pytest.raises(TokenMDPError, match="at least one"):
        bootstrap_ci([])
    # the bounds of the mean's bootstrap stay within the data
    b = bootstrap_ci([0.0, 0.0, 0.0, 1.0])
    assert 0.0 <= b.low <= 0.25 <= b.high <= 1.0


# --- verdicts ----------------------------------------------------------------------------------------------------


def _diff(low: float, high: float, n: int = 3) -> PairedDiff:
    return PairedDiff(n, (low + high) / 2, low, high, 0.1, 0.5, 0.1)


def test_equivalence_verdict():
    assert equivalence_verdict(_diff(-0.01, 0.015), 0.02) == SUPPORTED
    assert equivalence_verdict(_diff(-0.03, 0.01), 0.02) == INCONCLUSIVE  # crosses -margin
    assert equivalence_verdict(_diff(0.02, 0.05), 0.02) == CONTRADICTED  # wholly at or above margin
    assert equivalence_verdict(_diff(-0.09, -0.03), 0.02) == CONTRADICTED
    assert equivalence_verdict(_diff(-0.05, 0.05), 0.02) == INCONCLUSIVE  # wide: no power
    assert equivalence_verdict(paired_difference([0.3], [0.3]), 0.02) == INCONCLUSIVE  # one seed, no interval
    assert INCONCLUSIVE == "inconclusive at this power"
    with pytest.raises(ValueError):
        equivalence_verdict(_diff(0, 0), 0.0)


def test_direction_verdict():
    # "a below b": supported when the interval of a - b is wholly below 0
    assert direction_verdict(_diff(-0.05, -0.01), -1, 0.02) == SUPPORTED
    assert direction_verdict(_diff(-0.015, -0.001), -1, 0.02) == SUPPORTED  # small but significant
    assert direction_verdict(_diff(-0.01, 0.03), -1, 0.02) == CONTRADICTED  # rules out a drop of 2 points
    assert direction_verdict(_diff(0.01, 0.03), -1, 0.0) == CONTRADICTED  # significantly above
    assert direction_verdict(_diff(-0.05, 0.03), -1, 0.02) == INCONCLUSIVE
    # "a above b"
    assert direction_verdict(_diff(0.1, 0.4), 1, 0.05) == SUPPORTED
    assert direction_verdict(_diff(-0.2, 0.04), 1, 0.05) == CONTRADICTED
    assert direction_verdict(_diff(-0.2, 0.3), 1, 0.05) == INCONCLUSIVE
    assert direction_verdict(paired_difference([1.0], [0.0]), 1) == INCONCLUSIVE
    with pytest.raises(ValueError):
        direction_verdict(_diff(0, 1), 0)


def test_ls_slope():
    # x mean 2.5, y mean 13: sum dx dy = (-1.5)(-3) + (-0.5)(-1) + 0.5 * 0 + 1.5 * 4 = 11, sum dx^2 = 5 -> 2.2
    assert ls_slope([1, 2, 3, 4], [10, 12, 13, 17]) == pytest.approx(2.2)
    assert ls_slope([1, 2, 3], [5, 5, 5]) == 0.0
    with_nan = ls_slope([1, 2, 3, 4], [10, float("nan"), 13, 17])
    assert with_nan == pytest.approx(np.polyfit([1, 3, 4], [10, 13, 17], 1)[0])
    assert math.isnan(ls_slope([1], [2])) and math.isnan(ls_slope([2, 2], [1, 3]))
