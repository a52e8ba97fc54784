"""pass@k, Student-t confidence intervals, majority vote and best-of-n against hand computations."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.stats import best_of_n, majority_vote, mean_ci, pass_at_k, t_cdf, t_quantile


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
