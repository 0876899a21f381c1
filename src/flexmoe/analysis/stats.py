"""Paired statistics for comparing two models on the same examples.

Every comparison in flexmoe is paired: both models answer the same test examples (the same
per-client sample at a given seed), so the unit of analysis is the per-example difference.

- `paired_difference`: mean difference with a stratified bootstrap 95% CI. The strata are the
  (seed, client) cells; each resample draws every cell's examples with replacement and keeps
  the cells fixed, so the CI is over clients × examples pooled across seeds. The mean is
  weighted by examples (every example counts once, pooled) — the estimate the CI is for; the
  unweighted mean (cells averaged first) is reported beside it.
- `seed_signs` and `verdict`: a claim "A > B" is *supported* only when the CI excludes 0 on
  its side and every seed's mean difference has that sign; *contradicted* when the CI excludes
  0 on the other side and every seed agrees with the other sign; otherwise *inconclusive*.
- `mcnemar_exact`: the exact (binomial) McNemar test for paired right/wrong answers (probes).

Resampling is seeded (numpy's PCG64), so the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Cell = tuple[int, int]  # (seed, client)
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20261127


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (a - b) over paired examples, its bootstrap CI and its sign per seed."""

    diff: float  # pooled over every example (weighted by examples)
    ci_low: float
    ci_high: float
    examples: int
    diff_unweighted: float  # mean of the (seed, client) cells' means
    seed_diffs: dict[int, float]  # per seed: the pooled mean difference of that seed

    def as_dict(self) -> dict:
        out = asdict(self)
        out["seed_diffs"] = {str(seed): value for seed, value in self.seed_diffs.items()}
        return out


def paired_difference(cells: Mapping[Cell, tuple[Sequence[float], Sequence[float]]],
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = 0.95) -> PairedDifference:
    """`cells`: (seed, client) -> (scores of A, scores of B) on the same examples, in the same order."""
    diffs: dict[Cell, np.ndarray] = {}
    for cell, (a, b) in sorted(cells.items()):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape:
            raise ValueError(f"cell {cell}: {a.size} scores against {b.size}; a paired difference needs the same examples")
        if a.size:
            diffs[cell] = a - b
    if not diffs:
        raise ValueError("paired_difference needs at least one paired example")
    low, high = bootstrap_ci(list(diffs.values()), samples, seed, level)
    pooled = np.concatenate(list(diffs.values()))
    by_seed: dict[int, list[np.ndarray]] = {}
    for (run_seed, _), values in diffs.items():
        by_seed.setdefault(run_seed, []).append(values)
    return PairedDifference(
        diff=float(pooled.mean()), ci_low=low, ci_high=high, examples=int(pooled.size),
        diff_unweighted=float(np.mean([values.mean() for values in diffs.values()])),
        seed_diffs={s: float(np.concatenate(v).mean()) for s, v in sorted(by_seed.items())},
    )


def bootstrap_ci(strata: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the pooled mean when each stratum is resampled with replacement on its own."""
    rng = np.random.default_rng(seed)
    total = sum(len(values) for values in strata)
    sums = np.zeros(samples)
    for values in strata:
        picks = rng.integers(0, len(values), size=(samples, len(values)))
        sums += values[picks].sum(axis=1)
    means = sums / total
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def seed_signs(result: PairedDifference) -> dict[int, int]:
    """+1 / -1 / 0: the sign of each seed's mean difference."""
    return {seed: int(np.sign(value)) for seed, value in result.seed_diffs.items()}


VERDICTS = ("supported", "contradicted", "inconclusive")


def verdict(result: PairedDifference, direction: int = 1) -> str:
    """The claim "A - B has sign `direction`" (+1: A is higher) against the evidence."""
    signs = set(seed_signs(result).values())
    above, below = result.ci_low > 0, result.ci_high < 0
    if (above if direction > 0 else below) and signs == {direction}:
        return "supported"
    if (below if direction > 0 else above) and signs == {-direction}:
        return "contradicted"
    return "inconclusive"


@dataclass(frozen=True)
class McNemar:
    """Paired right/wrong answers of A and B on the same items."""

    items: int
    accuracy_a: float
    accuracy_b: float
    only_a: int  # A right, B wrong
    only_b: int  # B right, A wrong
    p_value: float  # exact two-sided binomial test on the discordant pairs


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """The exact McNemar test: under H0 each discordant pair is A's with probability 1/2, so the
    two-sided p is 2 · P(Binomial(n, 1/2) <= min(only_a, only_b)), capped at 1."""
    if len(correct_a) != len(correct_b):
        raise ValueError("mcnemar_exact needs the answers of both models on the same items")
    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    n = len(correct_a)
    return McNemar(
        items=n, accuracy_a=sum(map(bool, correct_a)) / n if n else float("nan"),
        accuracy_b=sum(map(bool, correct_b)) / n if n else float("nan"),
        only_a=only_a, only_b=only_b, p_value=binomial_two_sided(only_a, only_a + only_b),
    )


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials (doubled smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
