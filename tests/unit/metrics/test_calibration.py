"""Calibration: ECE against torchmetrics bit for bit, equal-mass bins, debiasing, the null."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torchmetrics.functional import calibration_error
from torchmetrics.functional.classification.calibration_error import _ce_compute

from service.monitoring.metrics import (
    CELLS,
    CalibrationStats,
    MetricValue,
    confidence_bin,
    confidence_fine_bin,
    ece_null_quantile,
    label_columns,
    miscalibrated,
)
from tests.unit.metrics.support import (
    assert_same_stats,
    assert_same_value,
    merge_all,
    random_chunks,
    random_probs,
    sample_labels,
)

Probs = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


def torchmetrics_ece(probs: Probs, labels: Labels) -> float:
    preds, target = torch.from_numpy(probs), torch.from_numpy(labels)
    k = probs.shape[1]
    return float(
        calibration_error(preds, target, task="multiclass", num_classes=k, n_bins=15, norm="l1")
    )


@pytest.mark.parametrize(("scale", "seed"), [(0.5, 0), (2.0, 1), (4.0, 2), (12.0, 3)])
def test_ece_matches_torchmetrics_on_random_data(scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, 5000, k=10, scale=scale)
    labels = np.where(rng.random(5000) < 0.7, probs.argmax(axis=1), rng.integers(0, 10, 5000))
    ece = CalibrationStats.from_arrays(probs, labels).ece()
    assert ece == pytest.approx(torchmetrics_ece(probs, labels), abs=1e-6)


def test_ece_matches_torchmetrics_on_perfectly_confident_data() -> None:
    rng = np.random.default_rng(20)
    labels = rng.integers(0, 4, 1000)
    probs = np.eye(4, dtype=np.float32)[np.where(rng.random(1000) < 0.8, labels, 0)]
    stats = CalibrationStats.from_arrays(probs, labels)
    assert stats.counts[CELLS - 1] == 1000  # all in the c = 1.0 cell
    assert stats.ece() == pytest.approx(torchmetrics_ece(probs, labels), abs=1e-6)
    assert stats.ece() == pytest.approx(1.0 - stats.sum_correct.sum() / 1000)


def test_confidence_one_has_a_cell_of_its_own_as_in_torchmetrics() -> None:
    # c = 0.95 right and c = 1.0 wrong: in one bin the residuals +0.05 and -1 would partly
    # cancel (ECE 0.475); torchmetrics keeps c = 1.0 apart: (0.05 + 1)/2 = 0.525.
    probs = np.array([[0.95, 0.05], [1.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1])
    assert torchmetrics_ece(probs, labels) == pytest.approx(0.525)
    assert CalibrationStats.from_arrays(probs, labels).ece() == pytest.approx(0.525, abs=1e-7)


def test_rows_exactly_on_bin_edges_land_where_torchmetrics_puts_them() -> None:
    edges = torch.linspace(0, 1, 16, dtype=torch.float32)
    inside = edges[2:15].numpy()  # ≥ 2/15 so the edge is the max of 10 classes
    c = np.concatenate([inside, np.nextafter(inside, np.float32(0)), [1.0]]).astype(np.float32)
    expected = torch.bucketize(torch.from_numpy(c), edges, right=True) - 1
    assert confidence_bin(c).tolist() == expected.tolist()
    probs = np.empty((c.size, 10), dtype=np.float32)
    probs[:, 1:] = ((1 - c) / 9)[:, None]
    probs[:, 0] = c  # the max is exactly the edge value
    labels = np.arange(c.size) % 2
    ece = CalibrationStats.from_arrays(probs, labels).ece()
    assert ece == pytest.approx(torchmetrics_ece(probs, labels), abs=1e-6)


def test_ece_and_friends_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])  # right, wrong, right, wrong
    stats = CalibrationStats.from_arrays(probs, labels)
    # Bins of 1/15: c = 0.9 → 13, 0.8 → 12, 0.7 → 10, 0.6 → 9; ECE = (0.1+0.8+0.3+0.6)/4.
    assert np.flatnonzero(stats.counts).tolist() == [9, 10, 12, 13]
    value = stats.result()
    assert value.value == pytest.approx(1.8 / 4)
    assert value.details["nll"] == pytest.approx(-np.log([0.9, 0.2, 0.7, 0.4]).mean(), rel=1e-6)
    brier = [0.1**2 * 2, 0.8**2 * 2, 0.3**2 * 2, 0.6**2 * 2]
    assert value.details["brier"] == pytest.approx(np.mean(brier), rel=1e-6)
    assert confidence_fine_bin([0.0, 0.0009, 0.001, 0.5, 1.0]).tolist() == [0, 0, 1, 500, 999]


def test_nll_and_brier_columns_against_torch() -> None:
    rng = np.random.default_rng(21)
    probs = random_probs(rng, 500, k=6).astype(np.float64)
    labels = rng.integers(0, 6, 500)
    cols = label_columns(probs, labels)
    log_p = torch.log(torch.from_numpy(probs))
    nll = torch.nn.functional.nll_loss(log_p, torch.from_numpy(labels), reduction="none")
    np.testing.assert_allclose(cols.nll, nll.numpy(), rtol=1e-12)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), 6).double()
    brier = ((torch.from_numpy(probs) - onehot) ** 2).sum(dim=1)
    np.testing.assert_allclose(cols.brier, brier.numpy(), atol=1e-12)


def test_debiased_rms_matches_torchmetrics_debias_path() -> None:
    rng = np.random.default_rng(22)
    probs = random_probs(rng, 3000, k=10, scale=2.5)
    labels = sample_labels(rng, probs)
    stats = CalibrationStats.from_arrays(probs, labels)
    conf, pred = torch.from_numpy(probs).max(dim=1)
    acc = pred.eq(torch.from_numpy(labels)).float()
    expected = float(_ce_compute(conf, acc, 15, norm="l2", debias=True))
    rms = stats.result().details["rms_debiased"]
    assert rms == pytest.approx(expected, abs=1e-6)


def test_equal_mass_bins_are_exact_when_cuts_fall_between_fine_bins() -> None:
    # 15 groups of 40 rows, each group on its own two fine bins: every equal-mass cut lies
    # between fine bins, so the fine histogram gives the exact equal-mass ECE.
    rng = np.random.default_rng(23)
    c = np.repeat(np.linspace(0.2, 0.95, 30), 20) + 0.0001
    a = rng.random(c.size) < c**2
    stats = CalibrationStats.from_columns(c, a, np.zeros(c.size), np.zeros(c.size))
    groups = np.arange(c.size) // 40  # rows are sorted by c already
    exact = np.abs(np.bincount(groups, a - c.astype(np.float32))).sum() / c.size
    assert stats.ece_equal_mass() == pytest.approx(exact, abs=1e-6)


def test_equal_mass_ece_is_within_the_straddling_fine_bins_of_the_exact_value() -> None:
    # Miscalibration that changes sign with c, so that where the cuts fall matters.
    rng = np.random.default_rng(24)
    n = 20_000
    c = rng.uniform(0.2, 1.0, n).astype(np.float32).astype(np.float64)
    a = (rng.random(n) < np.clip(c + 0.2 * np.sin(4 * np.pi * c), 0, 1)).astype(np.float64)
    stats = CalibrationStats.from_columns(c, a, np.zeros(n), np.zeros(n))
    order = np.argsort(c, kind="stable")
    exact_bin = np.empty(n, dtype=np.int64)
    exact_bin[order] = np.minimum(15 * np.arange(n) // n, 14)
    exact = np.abs(np.bincount(exact_bin, a - c, minlength=15)).sum() / n
    # Any method that keeps fine bins whole can only move rows of fine bins spanning two
    # exact bins, and moving a row changes Σ_b|Σ(a - c)| by at most 2|a - c|: that is the
    # tolerance, computed from the data.
    fine = confidence_fine_bin(c)
    lowest = np.full(1000, 99)
    np.minimum.at(lowest, fine, exact_bin)
    highest = np.full(1000, -1)
    np.maximum.at(highest, fine, exact_bin)
    straddling = np.isin(fine, np.flatnonzero(highest > lowest))
    bound = 2 * np.abs(a - c)[straddling].sum() / n
    assert 0 < bound < 0.2 * exact  # a tolerance well below the value it checks
    assert abs(stats.ece_equal_mass() - exact) <= bound


def test_null_quantile_is_at_least_the_exact_bernoulli_null() -> None:
    # Exact null: labels a_i ~ Bernoulli(c_i) row by row; ours draws per bin at the mean c
    # (a larger variance), so its 95th percentile is no lower, up to Monte Carlo error.
    rng = np.random.default_rng(25)
    c = 0.3 + 0.7 * rng.beta(4.0, 1.0, 400)
    stats = CalibrationStats.from_columns(c, c > 0.5, np.zeros(400), np.zeros(400))
    c32 = c.astype(np.float32).astype(np.float64)
    draws = rng.random((4000, c.size)) < c32
    cells = confidence_bin(c)
    exact = [np.abs(np.bincount(cells, d - c32, minlength=CELLS)).sum() / c.size for d in draws]
    ours = ece_null_quantile(stats.counts, stats.sum_conf, n_sim=4000)
    assert ours >= np.quantile(exact, 0.95) * 0.97
    assert ours <= np.quantile(exact, 0.95) * 1.15  # and not wildly conservative


def test_bootstrap_interval_narrows_with_n() -> None:
    rng = np.random.default_rng(26)
    widths = []
    for n in (2000, 32_000):
        probs = random_probs(rng, n, k=10, scale=3.0)
        # Overconfident: right only 60 % of the time (+ lucky guesses) at a higher mean c.
        labels = np.where(rng.random(n) < 0.6, probs.argmax(axis=1), rng.integers(0, 10, n))
        value = CalibrationStats.from_arrays(probs, labels).result()
        assert value.ci_low <= value.value <= value.ci_high
        widths.append(value.ci_high - value.ci_low)
    assert widths[1] < widths[0] / 2  # ~1/√n: a 16x larger window, 4x narrower


def test_merged_chunks_equal_the_batch() -> None:
    rng = np.random.default_rng(27)
    probs = random_probs(rng, 6000, k=10, scale=2.0)
    probs[:300] = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 300)]  # some c = 1.0
    labels = sample_labels(rng, probs)
    batch = CalibrationStats.from_arrays(probs, labels)
    parts = [CalibrationStats.from_arrays(probs[i], labels[i]) for i in random_chunks(6000, rng)]
    merged = merge_all(parts, CalibrationStats(), CalibrationStats.merge)
    assert_same_stats(batch, merged)
    assert_same_value(batch.result(), merged.result())


def test_miscalibrated_needs_two_consecutive_alerts() -> None:
    def v(state: str) -> MetricValue:
        return MetricValue("ece", 0.1, 0.0, 0.2, 10, 10.0, 0.05, state, {})  # type: ignore[arg-type]

    assert not miscalibrated([])
    assert not miscalibrated([v("alert")])
    assert not miscalibrated([v("alert"), v("ok")])
    assert not miscalibrated([v("alert"), v("insufficient"), v("alert")])
    assert miscalibrated([v("ok"), v("alert"), v("alert")])
    assert math.isnan(CalibrationStats().result().value)
