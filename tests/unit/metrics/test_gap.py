"""Paired accuracy gap and its label-free companion: by hand, published numbers, merging."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from statsmodels.stats.contingency_tables import mcnemar  # type: ignore[import-untyped]

from service.monitoring.metrics import (
    GapStats,
    MetricValue,
    TeacherGapStats,
    gap_residual,
    teacher_gap_delta,
    wald_paired_difference,
)
from tests.unit.metrics.support import (
    assert_same_stats,
    assert_same_value,
    merge_all,
    random_chunks,
    random_probs,
)

Correct = npt.NDArray[np.bool_]


def _table(
    both: int, teacher_only: int, student_only: int, neither: int
) -> tuple[Correct, Correct]:
    """(student_correct, teacher_correct) rows realising a paired 2x2 table."""
    teacher = np.repeat([True, True, False, False], [both, teacher_only, student_only, neither])
    student = np.repeat([True, False, True, False], [both, teacher_only, student_only, neither])
    return student, teacher


def test_gap_on_a_published_table_uses_newcombe_when_weights_are_equal() -> None:
    # Fagerland et al. (2017), ch. 8 (Cavo et al. 2012): (59, 6; 16, 80) with the first
    # margin as the teacher: Δ = (6 - 16)/161 = -0.0621 (-0.1186 to -0.0046).
    student, teacher = _table(59, 6, 16, 80)
    stats = GapStats.from_correct(student, teacher, np.full(161, 0.1))  # all w = 10
    value = stats.result()
    assert stats.equal_weights and value.details["newcombe"] == 1.0
    assert value.value == pytest.approx(-10 / 161)
    assert (round(value.ci_low, 4), round(value.ci_high, 4)) == (-0.1186, -0.0046)
    expected_p = mcnemar([[59, 6], [16, 80]], exact=True).pvalue
    assert value.details["mcnemar_p"] == pytest.approx(expected_p)
    assert value.details["teacher_accuracy"] == pytest.approx(65 / 161)
    assert value.details["student_accuracy"] == pytest.approx(75 / 161)
    assert value.state == "ok"


def test_weighted_gap_uses_wald_on_n_eff() -> None:
    # Four rows: b (w=1), c (w=2), both right (w=4), b (w=1): Σw = 8, Σw² = 22.
    student = np.array([False, True, True, False])
    teacher = np.array([True, False, True, True])
    pi = np.array([1.0, 0.5, 0.25, 1.0])
    value = GapStats.from_correct(student, teacher, pi).result()
    assert value.details["newcombe"] == 0.0
    assert value.value == pytest.approx((2 - 2) / 8)
    assert value.n_eff == pytest.approx(64 / 22)
    expected = wald_paired_difference(2 / 8, 2 / 8, 64 / 22)
    assert (value.ci_low, value.ci_high) == pytest.approx(expected)
    assert value.details["b_count"] == 2.0 and value.details["c_count"] == 1.0


def test_from_arrays_compares_predictions_with_labels() -> None:
    labels = np.array([0, 1, 2, 0, 1])
    student = np.array([0, 2, 2, 1, 0])  # right, wrong, right, wrong, wrong
    teacher = np.array([0, 1, 0, 0, 0])  # right, right, wrong, right, wrong
    stats = GapStats.from_arrays(student, teacher, labels, np.ones(5))
    assert (stats.a_count, stats.b_count, stats.c_count, stats.n) == (1, 2, 1, 5)
    assert stats.result().value == pytest.approx((2 - 1) / 5)


def test_alert_when_the_lower_bound_exceeds_the_gap() -> None:
    student, teacher = _table(800, 120, 20, 60)  # Δ = 0.10 on 1000 rows
    value = GapStats.from_correct(student, teacher, np.ones(1000)).result(gap_threshold=0.02)
    assert value.state == "alert" and value.ci_low > 0.02
    assert GapStats.from_correct(student, teacher, np.ones(1000)).result(0.2).state == "ok"
    assert GapStats().result().state == "insufficient"


def test_merged_chunks_equal_the_batch() -> None:
    rng = np.random.default_rng(6)
    n = 4000
    labels = rng.integers(0, 3, n)
    student, teacher = rng.integers(0, 3, n), rng.integers(0, 3, n)
    pi = rng.choice([1.0, 0.2], size=n)
    batch = GapStats.from_arrays(student, teacher, labels, pi)
    parts = [
        GapStats.from_arrays(student[i], teacher[i], labels[i], pi[i])
        for i in random_chunks(n, rng)
    ]
    merged = merge_all(parts, GapStats(), GapStats.merge)
    assert_same_stats(batch, merged)
    assert_same_value(batch.result(), merged.result())


def test_teacher_gap_by_hand() -> None:
    p = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    q = np.array([[0.2, 0.8], [0.1, 0.9], [0.7, 0.3]])
    # max q - q[ŷs]: ŷs = 0, 1, 0, so 0.8 - 0.2, 0.9 - 0.9, 0.7 - 0.7.
    np.testing.assert_allclose(teacher_gap_delta(p, q), [0.6, 0.0, 0.0])
    stats = TeacherGapStats.from_arrays(p, q, [0.5, 1.0, 1.0])  # w = 2, 1, 1
    value = stats.result()
    assert value.value == pytest.approx(1.2 / 4)
    variance = 0.72 / 4 - 0.3**2  # Σwδ²/Σw - mean²
    half = 1.959963984540054 * math.sqrt(variance / (16 / 6))
    assert (value.ci_low, value.ci_high) == pytest.approx((max(0.0, 0.3 - half), 0.3 + half))


def test_teacher_gap_merges_and_the_residual_needs_both_values() -> None:
    rng = np.random.default_rng(7)
    n = 2000
    p, q = random_probs(rng, n, k=5), random_probs(rng, n, k=5)
    pi = rng.choice([1.0, 0.1], size=n)
    batch = TeacherGapStats.from_arrays(p, q, pi)
    parts = [TeacherGapStats.from_arrays(p[i], q[i], pi[i]) for i in random_chunks(n, rng)]
    assert_same_stats(batch, merge_all(parts, TeacherGapStats(), TeacherGapStats.merge))
    gap = MetricValue("accuracy_gap", 0.05, 0.0, 0.1, 100, 100.0, 0.02, "ok", {})
    assert gap_residual(gap, batch.result()) == pytest.approx(0.05 - batch.result().value)
    assert math.isnan(gap_residual(gap, TeacherGapStats().result()))
