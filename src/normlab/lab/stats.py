"""Statistics for comparisons, as [DF21] (§4.3) prescribes.

For each configuration: the mean and sample standard deviation (``ddof=1``) of the test
accuracy over seeds. Each method is compared with the baseline by a **one-sided paired
t-test** over the seeds both have run (pairs by seed): with ``d_i = a_i - b_i``,

    t = mean(d) / (std(d, ddof=1) / sqrt(n)),   p = P(T_{n-1} >= t),

computed by ``scipy.stats.ttest_rel(a, b, alternative="greater")``. A method is
*significantly better* when ``p < alpha`` (0.05). The best mean is marked too.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Summary:
    """Mean ± sample std of a list of scores."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class PairedTest:
    """One-sided paired t-test of ``method > baseline``."""

    t: float
    p: float
    n: int
    significant: bool


def summarize(scores: Sequence[float]) -> Summary:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single score)."""
    values = [float(v) for v in scores]
    if not values:
        return Summary(math.nan, math.nan, 0)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return Summary(mean, 0.0, 1)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return Summary(mean, math.sqrt(var), len(values))


def paired_ttest(method: Mapping[int, float], baseline: Mapping[int, float], *,
                 alpha: float = 0.05) -> PairedTest:
    """One-sided paired t-test that ``method`` scores are greater than ``baseline`` scores.

    Args:
        method, baseline: ``{seed: score}``; only seeds present in both are paired.
        alpha: significance level ([DF21] uses 0.05).

    Returns ``PairedTest(t, p, n, significant)``; with fewer than 2 pairs, or when all
    differences are equal (zero variance, where the test is undefined), ``p`` is NaN and the
    result is not significant.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    seeds = sorted(set(method) & set(baseline))
    n = len(seeds)
    if n < 2:
        return PairedTest(math.nan, math.nan, n, False)
    a = [float(method[s]) for s in seeds]
    b = [float(baseline[s]) for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    mean_d = sum(diffs) / n
    spread = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1))
    if spread <= 1e-9 * max(1.0, abs(mean_d)):  # all differences equal: t is undefined
        return PairedTest(math.nan, math.nan, n, False)

    from scipy import stats  # lazy: optional dependency (scipy)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(a, b, alternative="greater")
    t, p = float(result.statistic), float(result.pvalue)
    return PairedTest(t, p, n, bool(p < alpha))
