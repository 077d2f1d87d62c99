"""Entropy drift: reference binning, JS and W1 against scipy, the bootstrap threshold, merging."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2, wasserstein_distance

from service.monitoring.metrics import (
    FINE_BINS,
    DriftStats,
    EntropyReference,
    fine_index,
    js_divergence,
    smoothed_shares,
    wasserstein_fine,
)
from tests.unit.metrics.support import (
    assert_same_stats,
    assert_same_value,
    merge_all,
    random_chunks,
)

CENTRES = (np.arange(FINE_BINS) + 0.5) / FINE_BINS


@pytest.fixture(scope="module")
def reference() -> EntropyReference:
    return EntropyReference.fit(np.random.default_rng(10).beta(2.0, 5.0, 50_000))


def test_fit_puts_edges_at_quantiles_pinned_to_zero_and_one(reference: EntropyReference) -> None:
    assert reference.edges.size == 21 and reference.shares.size == 20
    assert reference.edges[0] == 0.0 and reference.edges[-1] == 1.0
    np.testing.assert_allclose(reference.shares, 0.05, atol=1e-4)  # quantile bins: equal mass
    assert reference.shares.sum() == pytest.approx(1.0)
    assert reference.fine_counts.sum() == reference.n == 50_000


def test_bins_follow_the_prometheus_le_convention(reference: EntropyReference) -> None:
    edge = reference.edges[5]
    index = reference.bin_index([0.0, np.nextafter(edge, 0.0), edge, np.nextafter(edge, 1), 1.0])
    assert index.tolist() == [0, 4, 4, 5, 19]  # an H equal to an edge closes its bin
    assert fine_index([0.0, 0.0005, 0.001, 0.9995, 1.0, 1.5]).tolist() == [0, 0, 1, 999, 999, 999]


def test_ties_repeat_edges_and_still_bin_every_row() -> None:
    h = np.concatenate([np.zeros(600), np.linspace(0.1, 0.9, 400)])  # 60 % exactly 0
    ref = EntropyReference.fit(h)
    assert np.all(np.diff(ref.edges) >= 0) and ref.edges[1] == ref.edges[11] == 0.0
    assert ref.shares[0] == pytest.approx(0.6) and ref.shares.sum() == pytest.approx(1.0)


def test_js_matches_scipy_on_the_smoothed_shares(reference: EntropyReference) -> None:
    h = np.random.default_rng(11).beta(2.5, 5.0, 700)
    stats = DriftStats.from_arrays(h, reference)
    p, q = smoothed_shares(reference.counts), smoothed_shares(stats.counts)
    expected = jensenshannon(p, q, base=2) ** 2  # scipy returns the square root
    assert stats.result(reference).value == pytest.approx(expected, rel=1e-10)
    assert js_divergence(p, p) == 0.0
    # Add-1/2: an empty bin of 700 rows has share 0.5/710.
    assert smoothed_shares([0, 700]).tolist() == pytest.approx([0.5 / 701, 700.5 / 701])


def test_w1_is_exact_on_bin_centres_and_within_a_fine_bin_of_the_raw_values(
    reference: EntropyReference,
) -> None:
    rng = np.random.default_rng(12)
    raw_ref, raw_cur = rng.beta(2.0, 5.0, 20_000), rng.beta(3.0, 5.0, 3000)
    a = np.bincount(fine_index(raw_ref), minlength=FINE_BINS)
    b = np.bincount(fine_index(raw_cur), minlength=FINE_BINS)
    on_centres = wasserstein_distance(CENTRES, CENTRES, u_weights=a, v_weights=b)
    assert wasserstein_fine(a, b) == pytest.approx(on_centres, abs=1e-12)
    # Each value moves at most half a bin to its centre, on each side: |error| ≤ 1/1000.
    assert abs(wasserstein_fine(a, b) - wasserstein_distance(raw_ref, raw_cur)) <= 1 / FINE_BINS


def test_the_threshold_shrinks_with_n_like_the_chi_square_limit(
    reference: EntropyReference,
) -> None:
    # For nearby shares JS (bits) ≈ χ²/(8 ln 2) and n·χ² → χ²(B - 1) under no drift, so the
    # 99th percentile at n is ≈ χ²_{0.99}(19) / (8 n ln 2). n = 2048 sits on the n-grid.
    limit = chi2.ppf(0.99, 19) / (8 * 2048 * math.log(2))
    assert reference.null_js_quantile(2048) == pytest.approx(limit, rel=0.1)
    thresholds = [reference.null_js_quantile(n) for n in (100, 500, 2048, 10_000)]
    assert thresholds == sorted(thresholds, reverse=True)


def test_the_threshold_is_seeded_and_cached_on_a_grid_of_n(reference: EntropyReference) -> None:
    first = reference.null_js_quantile(777, seed=3)
    start = time.perf_counter()
    assert reference.null_js_quantile(778, seed=3) == first  # same grid point, from the cache
    assert time.perf_counter() - start < 0.01
    assert reference.null_js_quantile(777, seed=4) != first


def test_small_windows_are_insufficient_and_empty_ones_nan(reference: EntropyReference) -> None:
    few = DriftStats.from_arrays(np.full(50, 0.9), reference).result(reference, min_n=100)
    assert few.state == "insufficient" and few.value > 0.1
    assert math.isnan(DriftStats().result(reference).value)


def test_alert_needs_both_the_js_threshold_and_the_w1_floor(reference: EntropyReference) -> None:
    rng = np.random.default_rng(13)
    shifted = DriftStats.from_arrays(rng.beta(3.0, 5.0, 5000), reference)
    value = shifted.result(reference)
    w1 = value.details["wasserstein1"]
    assert isinstance(w1, float) and w1 > 0.02
    assert value.threshold is not None and value.value > value.threshold
    assert value.state == "alert"
    assert shifted.result(reference, w1_floor=w1 + 1e-9).state == "ok"


def test_merged_chunks_equal_the_batch(reference: EntropyReference) -> None:
    rng = np.random.default_rng(14)
    h = rng.beta(2.0, 4.0, 5000)
    batch = DriftStats.from_arrays(h, reference)
    parts = [DriftStats.from_arrays(h[i], reference) for i in random_chunks(h.size, rng)]
    merged = merge_all(parts, DriftStats(), DriftStats.merge)
    assert_same_stats(batch, merged)
    assert_same_value(batch.result(reference), merged.result(reference))
    with pytest.raises(ValueError, match="different references"):
        batch.merge(DriftStats(counts=np.zeros(10, dtype=np.int64)))
