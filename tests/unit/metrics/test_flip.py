"""Weighted flip rate: by hand, batch equals merged chunks, and Horvitz-Thompson unbiasedness."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy.stats import entropy

from service.monitoring.metrics import (
    FlipStats,
    clopper_pearson,
    confidence_decile,
    flip_columns,
    proportion_interval,
)
from tests.unit.metrics.support import (
    assert_same_stats,
    assert_same_value,
    merge_all,
    random_chunks,
    random_probs,
)

P = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.95, 0.04, 0.01], [0.35, 0.33, 0.32]])
Q = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])
PI = np.array([1.0, 1.0, 0.5, 0.25])  # w = 1, 1, 2, 4
SERVED = np.array([False, False, True, True])


def test_flip_rate_by_hand() -> None:
    stats = FlipStats.from_arrays(P, Q, PI, SERVED)
    # Flips on rows 0 and 3 (w = 1 and 4) out of Σw = 8; served rows 2, 3: 4 of Σw = 6.
    assert (stats.n, stats.sum_w, stats.sum_w2, stats.sum_w_flip) == (4, 8.0, 22.0, 5.0)
    value = stats.result(threshold=0.5)
    assert value.value == pytest.approx(5 / 8)
    assert value.n_eff == pytest.approx(64 / 22)
    # k = 5/8 · 64/22 < 10 events: Clopper-Pearson.
    assert (value.ci_low, value.ci_high) == pytest.approx(clopper_pearson(5 / 8 * 64 / 22, 64 / 22))
    assert value.details["served_flip_rate"] == pytest.approx(4 / 6)
    # Confidences 0.6, 0.8, 0.95, 0.35 fall in deciles 6, 8, 9, 3.
    assert stats.decile_sum_w.tolist() == [0, 0, 0, 4, 0, 0, 1, 0, 1, 2]
    assert stats.decile_sum_w_flip.tolist() == [0, 0, 0, 4, 0, 0, 1, 0, 0, 0]
    curve = value.details["flip_rate_by_decile"]
    assert isinstance(curve, list)
    assert curve[3] == 1.0 and curve[9] == 0.0 and math.isnan(curve[0])


def test_total_variation_and_kl_against_scipy() -> None:
    cols = flip_columns(P, Q)
    np.testing.assert_allclose(cols.total_variation, [0.4, 0.0, 0.05, 0.08])
    np.testing.assert_allclose(cols.kl_teacher_student, entropy(Q, P, axis=1))  # KL(q‖p)
    stats = FlipStats.from_arrays(P, Q, PI, SERVED)
    w = 1 / PI
    details = stats.result(threshold=0.5).details
    assert details["mean_total_variation"] == pytest.approx((w * cols.total_variation).sum() / 8)
    expected_kl = (w * entropy(Q, P, axis=1)).sum() / 8
    assert details["mean_kl_teacher_student"] == pytest.approx(expected_kl)


def test_kl_stays_finite_where_the_student_underflows_to_zero() -> None:
    cols = flip_columns([[1.0, 0.0]], [[0.9, 0.1]])
    assert cols.kl_teacher_student[0] == pytest.approx(0.9 * math.log(0.9) + 0.1 * math.log(1e11))


def test_deciles_put_edges_up_and_one_in_the_top_decile() -> None:
    c = [0.0, 0.0999, 0.1, 0.5, 0.95, 0.99999, 1.0]
    assert confidence_decile(c).tolist() == [0, 0, 1, 5, 9, 9, 9]


def test_alert_only_when_the_lower_bound_clears_the_threshold() -> None:
    rng = np.random.default_rng(3)
    p = random_probs(rng, 4000, k=5)
    q = random_probs(rng, 4000, k=5)  # independent: ~80 % flips
    stats = FlipStats.from_arrays(p, q, np.ones(4000), np.ones(4000, dtype=bool))
    value = stats.result(threshold=0.5)
    assert value.state == "alert" and value.ci_low > 0.5
    assert (value.ci_low, value.ci_high) == proportion_interval(value.value, 4000.0)
    assert stats.result(threshold=value.ci_low).state == "ok"  # strictly above is required


def test_an_empty_window_is_insufficient() -> None:
    value = FlipStats().result(threshold=0.1)
    assert value.state == "insufficient" and math.isnan(value.value) and value.n == 0
    few = FlipStats.from_arrays(P, Q, PI, SERVED).result(threshold=0.1, min_n=10)
    assert few.state == "insufficient" and few.value == pytest.approx(5 / 8)


def test_merged_chunks_equal_the_batch() -> None:
    rng = np.random.default_rng(4)
    n = 3000
    p, q = random_probs(rng, n, k=4, scale=1.5), random_probs(rng, n, k=4, scale=1.5)
    pi = rng.choice([1.0, 0.3, 0.05], size=n)
    served = rng.random(n) < 0.5
    batch = FlipStats.from_arrays(p, q, pi, served)
    parts = [FlipStats.from_arrays(p[i], q[i], pi[i], served[i]) for i in random_chunks(n, rng)]
    merged = merge_all(parts, FlipStats(), FlipStats.merge)
    assert_same_stats(batch, merged)
    assert_same_value(batch.result(0.5), merged.result(0.5))


def _population(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.float64], ...]:
    """Confidences in [0.4, 1] and flips that are far likelier on the hard (low c) inputs."""
    c = 0.4 + 0.6 * rng.beta(5.0, 1.2, size=n)
    flips = rng.random(n) < 0.6 * (1.0 - c) ** 1.5
    p = np.stack([c, (1 - c) / 2, (1 - c) / 2], axis=1)  # argmax 0 since c > 1/3
    q = np.where(flips[:, None], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1])
    return c, flips.astype(np.float64), p, q


def test_weighting_recovers_the_population_flip_rate_under_cascade_sampling() -> None:
    rng = np.random.default_rng(5)
    tau, shadow_rate = 0.8, 0.05
    weighted, unweighted = [], []
    for _ in range(200):
        c, flips, p, q = _population(rng, 20_000)
        pi = np.where(c < tau, 1.0, shadow_rate)  # π = 1[c < τ] + 1[c ≥ τ]·π₀
        seen = rng.random(c.size) < pi
        truth = flips.mean()
        stats = FlipStats.from_arrays(p[seen], q[seen], pi[seen], c[seen] >= tau)
        weighted.append(stats.result(0.5).value - truth)
        unweighted.append(flips[seen].mean() - truth)
    # Hájek is unbiased to O(1/n): the mean error over 200 windows is within 4 standard errors
    # of 0, while the unweighted share overshoots by more than 20 of them.
    se = np.std(weighted) / math.sqrt(len(weighted))
    assert abs(np.mean(weighted)) < 4 * se
    assert np.mean(unweighted) > 20 * se + abs(np.mean(weighted))
    assert np.mean(unweighted) > 2 * np.std(weighted)  # biased by more than the noise itself
