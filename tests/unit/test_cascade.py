"""Routing decisions and the inclusion probability π."""

from __future__ import annotations

import numpy as np

from service.monitoring.records import inclusion_probability
from service.routing.cascade import needs_teacher, sample_shadow


def test_below_threshold_goes_to_teacher_and_nan_too() -> None:
    confidence = np.array([0.2, 0.6, 0.59, 0.99, np.nan], np.float32)
    assert needs_teacher(confidence, 0.6).tolist() == [True, False, True, False, True]


def test_pi_is_one_for_fallbacks_and_shadow_rate_otherwise() -> None:
    low = np.array([True, False, False])
    assert inclusion_probability(low, 0.1).tolist() == [1.0, 0.1, 0.1]
    assert inclusion_probability(low, 0.0).tolist() == [1.0, 0.0, 0.0]


def test_shadow_never_samples_fallbacks_and_hits_its_rate() -> None:
    rng = np.random.default_rng(0)
    low = np.zeros(200_000, np.bool_)
    low[:1000] = True
    shadow = sample_shadow(low, 0.1, rng)
    assert not shadow[:1000].any()
    rate = shadow[1000:].mean()
    # Binomial(199000, 0.1): sd ≈ 0.00067, so 5 sd is 0.0034.
    assert abs(rate - 0.1) < 0.0034


def test_shadow_rate_edges() -> None:
    rng = np.random.default_rng(0)
    low = np.array([True, False, False])
    assert sample_shadow(low, 0.0, rng).tolist() == [False, False, False]
    assert sample_shadow(low, 1.0, rng).tolist() == [False, True, True]


def test_horvitz_thompson_weights_recover_the_population_share() -> None:
    """Weighting observed pairs by 1/π recovers a population mean from biased sampling."""
    rng = np.random.default_rng(1)
    n = 100_000
    confidence = rng.uniform(0.3, 1.0, n).astype(np.float32)
    flips = rng.random(n) < (1.0 - confidence)  # hard inputs flip more often
    low = needs_teacher(confidence, 0.6)
    observed = low | sample_shadow(low, 0.1, rng)
    weights = 1.0 / inclusion_probability(low, 0.1)[observed]
    estimate = float((weights * flips[observed]).sum() / weights.sum())
    naive = float(flips[observed].mean())
    assert abs(estimate - flips.mean()) < 0.01
    assert naive - flips.mean() > 0.1  # the unweighted share is badly biased
