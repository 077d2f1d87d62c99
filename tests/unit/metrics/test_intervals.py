"""Intervals and tests against statsmodels and a published example, plus MetricValue rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar  # type: ignore[import-untyped]
from statsmodels.stats.proportion import proportion_confint  # type: ignore[import-untyped]

from service.monitoring.metrics import (
    MetricValue,
    clopper_pearson,
    effective_sample_size,
    mcnemar_exact,
    newcombe_paired_difference,
    proportion_interval,
    wald_paired_difference,
    wilson,
)

CASES = [(0, 10), (1, 10), (3, 10), (10, 10), (0, 1), (7, 250), (50, 1000), (999, 1000)]


@pytest.mark.parametrize(("k", "n"), CASES)
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.2])
def test_wilson_and_clopper_pearson_match_statsmodels(k: int, n: int, alpha: float) -> None:
    np.testing.assert_allclose(
        wilson(k, n, alpha), proportion_confint(k, n, alpha, method="wilson"), atol=1e-12
    )
    np.testing.assert_allclose(
        clopper_pearson(k, n, alpha), proportion_confint(k, n, alpha, method="beta"), atol=1e-12
    )


def test_empty_samples_get_the_uninformative_interval() -> None:
    assert wilson(0, 0) == clopper_pearson(0, 0) == proportion_interval(0.0, 0.0) == (0.0, 1.0)
    assert newcombe_paired_difference(0, 0, 0, 0) == wald_paired_difference(0, 0, 0) == (-1, 1)


def test_proportion_interval_switches_to_clopper_pearson_below_ten_events() -> None:
    # k = p·n_eff = 9.9 < 10: Clopper-Pearson; 10.0: Wilson (METRICS.md).
    assert proportion_interval(0.099, 100.0) == clopper_pearson(9.9, 100.0)
    assert proportion_interval(0.1, 100.0) == wilson(10.0, 100.0)
    # Weighted: a share on a fractional n_eff uses k = p·n_eff.
    assert proportion_interval(0.05, 150.5) == clopper_pearson(0.05 * 150.5, 150.5)


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 5), (6, 16), (16, 6), (40, 41), (3, 30)])
def test_mcnemar_exact_matches_statsmodels(b: int, c: int) -> None:
    expected = mcnemar([[10, b], [c, 10]], exact=True).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-12)


def test_newcombe_matches_the_published_worked_example() -> None:
    # Cavo et al. (2012) in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency
    # Tables" (2017), ch. 8: table (59, 6; 16, 80), Newcombe square-and-add interval
    # -0.0621 (-0.1186 to -0.0046).
    low, high = newcombe_paired_difference(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)


def test_newcombe_correlation_correction_by_hand() -> None:
    # (5, 10; 10, 5): AD - BC = -75 < 0, φ = -75/√(15·15·15·15) = -1/3. Spelled out by hand
    # from statsmodels' Wilson bounds: both margins are 15/30 = 0.5.
    l1, u1 = proportion_confint(15, 30, method="wilson")
    phi = -75 / 225
    radius = math.sqrt((0.5 - l1) ** 2 - 2 * phi * (0.5 - l1) * (u1 - 0.5) + (u1 - 0.5) ** 2)
    np.testing.assert_allclose(newcombe_paired_difference(5, 10, 10, 5), (-radius, radius))
    # (10, 2; 2, 10): AD - BC = 96 > N/2 = 12, φ = (96 - 12)/144.
    l1, u1 = proportion_confint(12, 24, method="wilson")
    phi = 84 / 144
    radius = math.sqrt((0.5 - l1) ** 2 - 2 * phi * (0.5 - l1) * (u1 - 0.5) + (u1 - 0.5) ** 2)
    np.testing.assert_allclose(newcombe_paired_difference(10, 2, 2, 10), (-radius, radius))


def test_wald_paired_difference_by_hand() -> None:
    # b = 0.10, c = 0.05, n_eff = 400: Var(d) = 0.15 - 0.05² = 0.1475.
    half = 1.959963984540054 * math.sqrt(0.1475 / 400)
    np.testing.assert_allclose(wald_paired_difference(0.10, 0.05, 400), (0.05 - half, 0.05 + half))


def test_effective_sample_size_by_hand() -> None:
    w = np.array([1.0, 1.0, 2.0, 4.0])
    assert effective_sample_size(w.sum(), (w * w).sum()) == pytest.approx(64 / 22)
    assert effective_sample_size(30.0, 30.0 * 30.0 / 3) == pytest.approx(3.0)  # 3 rows of 10
    assert effective_sample_size(0.0, 0.0) == 0.0


def test_an_empty_window_is_nan_and_insufficient() -> None:
    empty = MetricValue.insufficient("x", value=0.3)
    assert math.isnan(empty.value) and empty.state == "insufficient"
    assert MetricValue.insufficient("x", n=5, value=0.3).value == 0.3
    with pytest.raises(ValueError, match="empty window"):
        MetricValue("x", 0.0, 0.0, 1.0, n=0, n_eff=0.0, threshold=None, state="ok", details={})
