"""Statistics of comparisons: mean ± std and the one-sided paired t-test ([DF21] §4.3)."""

import math

import pytest
from scipy import stats as sps

from normlab.lab.stats import paired_ttest, summarize

A = [90.1, 90.5, 89.8, 90.9, 90.3]
B = [89.5, 90.0, 89.9, 90.1, 89.6]


def test_summary_is_mean_and_sample_std():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.mean == pytest.approx(2.5)
    assert s.std == pytest.approx(math.sqrt(5.0 / 3.0))  # ddof = 1
    assert s.n == 4
    assert summarize([7.0]).std == 0.0
    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)


def test_paired_ttest_known_numbers_closed_form():
    """d = [0.6, 0.5, -0.1, 0.8, 0.7]: mean 0.5, sd sqrt(0.125) → t = sqrt(10). For 4 degrees of
    freedom the t CDF has the closed form F = ½ + ½ sinθ (1 + cos²θ / 2), θ = atan(t / 2)."""
    method = dict(enumerate(A, start=1))
    base = dict(enumerate(B, start=1))
    result = paired_ttest(method, base)
    assert result.n == 5
    assert result.t == pytest.approx(math.sqrt(10.0), rel=1e-9)
    theta = math.atan(math.sqrt(10.0) / 2.0)
    p_closed = 0.5 - 0.5 * math.sin(theta) * (1.0 + math.cos(theta) ** 2 / 2.0)
    assert result.p == pytest.approx(p_closed, rel=1e-9)
    assert result.p == pytest.approx(0.0170547, rel=1e-5)
    assert result.significant  # p < 0.05


def test_paired_ttest_matches_scipy_and_is_one_sided():
    method = dict(enumerate(A, start=1))
    base = dict(enumerate(B, start=1))
    ref = sps.ttest_rel(A, B, alternative="greater")
    got = paired_ttest(method, base)
    assert got.t == pytest.approx(float(ref.statistic), rel=1e-12)
    assert got.p == pytest.approx(float(ref.pvalue), rel=1e-12)
    reverse = paired_ttest(base, method)  # worse than baseline: p close to 1, not significant
    assert reverse.p == pytest.approx(1.0 - got.p, rel=1e-9)
    assert not reverse.significant


def test_pairs_by_seed_not_by_position():
    method = {3: A[2], 1: A[0], 5: A[4], 2: A[1], 4: A[3], 9: 0.0}   # seed 9 has no partner
    base = {1: B[0], 2: B[1], 3: B[2], 4: B[3], 5: B[4], 7: 100.0}
    got = paired_ttest(method, base)
    assert got.n == 5
    assert got.p == pytest.approx(float(sps.ttest_rel(A, B, alternative="greater").pvalue))


def test_significance_threshold_and_degenerate_cases():
    method = dict(enumerate(A, start=1))
    base = dict(enumerate(B, start=1))
    assert not paired_ttest(method, base, alpha=0.01).significant  # p = 0.017
    constant_shift = paired_ttest({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0})  # zero variance of d
    assert math.isnan(constant_shift.p) and not constant_shift.significant
    single = paired_ttest({1: 2.0}, {1: 1.0})
    assert single.n == 1 and math.isnan(single.p) and not single.significant
    with pytest.raises(ValueError, match="alpha must be in"):
        paired_ttest(method, base, alpha=1.5)
