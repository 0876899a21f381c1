"""Paired statistics: bootstrap CIs against exact enumeration, McNemar against a direct binomial sum."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from flexmoe.analysis.stats import (
    binomial_two_sided, bootstrap_ci, mcnemar_exact, paired_difference, seed_signs, verdict,
)


def test_paired_difference_means_and_seed_signs():
    cells = {
        (0, 0): ([1.0, 0.5, 0.0], [0.0, 0.5, 0.0]),  # diffs 1, 0, 0
        (0, 1): ([0.2], [0.0]),  # 0.2
        (1, 0): ([0.0, 0.0], [0.3, 0.1]),  # -0.3, -0.1
    }
    result = paired_difference(cells)
    assert result.examples == 6
    assert result.diff == pytest.approx((1 + 0.2 - 0.3 - 0.1) / 6)  # every example once
    assert result.diff_unweighted == pytest.approx((1 / 3 + 0.2 - 0.2) / 3)  # cells first
    assert result.seed_diffs == pytest.approx({0: 1.2 / 4, 1: -0.2})
    assert seed_signs(result) == {0: 1, 1: -1}
    assert result.ci_low <= result.diff <= result.ci_high


def test_paired_difference_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="same examples"):
        paired_difference({(0, 0): ([1.0, 2.0], [1.0])})
    with pytest.raises(ValueError):
        paired_difference({(0, 0): ([], [])})


def _exact_bootstrap_means(strata: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Every stratified resample, enumerated: (pooled mean, probability)."""
    total = sum(len(s) for s in strata)
    per_stratum = [list(itertools.product(s, repeat=len(s))) for s in strata]
    means, weights = [], []
    for combo in itertools.product(*per_stratum):
        means.append(sum(sum(draw) for draw in combo) / total)
        weights.append(1.0)
    weights = np.array(weights) / len(weights)
    return np.array(means), weights


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, q)])


def test_bootstrap_ci_matches_exact_enumeration():
    strata = [[0.0, 1.0, 3.0], [2.0, -1.0], [0.5, 0.25, 4.0]]
    means, weights = _exact_bootstrap_means(strata)
    exact_low, exact_high = _weighted_quantile(means, weights, 0.025), _weighted_quantile(means, weights, 0.975)
    low, high = bootstrap_ci([np.array(s) for s in strata], samples=20000, seed=1)
    spread = exact_high - exact_low
    assert low == pytest.approx(exact_low, abs=0.05 * spread)
    assert high == pytest.approx(exact_high, abs=0.05 * spread)


def test_bootstrap_is_deterministic_and_keeps_strata_fixed():
    strata = [np.array([0.0, 1.0, 2.0]), np.array([5.0])]
    assert bootstrap_ci(strata, seed=3) == bootstrap_ci(strata, seed=3)
    # a one-example stratum never varies: only the first stratum's resampling moves the mean
    low, high = bootstrap_ci(strata, samples=5000, seed=3)
    assert (0 + 5) / 4 <= low < high <= (6 + 5) / 4


def test_constant_difference_has_a_zero_width_interval():
    result = paired_difference({(0, c): ([0.3] * 5, [0.1] * 5) for c in range(3)})
    assert result.ci_low == pytest.approx(0.2) and result.ci_high == pytest.approx(0.2)


def _direct_binomial_p(k: int, n: int) -> float:
    """Two-sided exact p as the sum of every outcome no more likely than the observed one."""
    probability = [Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1)]
    observed = probability[k]
    return float(min(Fraction(1), sum(p for p in probability if p <= observed)))


@pytest.mark.parametrize(("k", "n"), [(0, 5), (1, 9), (3, 7), (4, 8), (10, 30), (0, 0), (12, 12)])
def test_binomial_two_sided_matches_direct_sum(k, n):
    assert binomial_two_sided(k, n) == pytest.approx(_direct_binomial_p(k, n))


def test_mcnemar_counts_discordant_pairs():
    a = [1, 1, 1, 1, 1, 0, 0, 1, 0, 1]
    b = [0, 0, 0, 0, 1, 0, 1, 1, 0, 0]
    result = mcnemar_exact(a, b)
    assert (result.only_a, result.only_b, result.items) == (5, 1, 10)
    assert result.accuracy_a == 0.7 and result.accuracy_b == 0.3
    assert result.p_value == pytest.approx(2 * (1 + 6) / 64)  # 2 P(X <= 1), X ~ Bin(6, 1/2)
    assert mcnemar_exact([1, 0], [1, 0]).p_value == 1.0  # no discordant pair
    with pytest.raises(ValueError):
        mcnemar_exact([1], [1, 0])


def test_verdicts():
    up = paired_difference({(s, 0): ([1.0, 0.9, 1.0], [0.0, 0.1, 0.2]) for s in (0, 1, 2)})
    assert verdict(up) == "supported"
    assert verdict(up, direction=-1) == "contradicted"
    # one seed disagrees in sign: inconclusive even when the pooled CI excludes 0
    mixed = paired_difference({(0, 0): ([1.0] * 20, [0.0] * 20), (1, 0): ([0.0], [0.1])})
    assert mixed.ci_low > 0
    assert verdict(mixed) == "inconclusive"
    noise = paired_difference({(0, 0): ([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])})
    assert noise.ci_low < 0 < noise.ci_high
    assert verdict(noise) == "inconclusive"
