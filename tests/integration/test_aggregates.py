"""SQL aggregates over stored rows equal the batch statistics over the same raw arrays."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, event
from sqlalchemy.orm import sessionmaker

from service.monitoring.instruments import build_instruments
from service.monitoring.metrics import (
    CalibrationStats,
    DriftStats,
    EntropyReference,
    FlipStats,
    GapStats,
    TeacherGapStats,
)
from service.monitoring.records import PredictionBatch, TeacherOutcome
from service.persistence.aggregates import window_stats
from service.persistence.feedback import Label, record_labels
from service.persistence.writer import PredictionWriter
from service.settings import RecordingSettings

# Probability rows exactly representable in float16, so stored and raw values agree.
ROWS = np.array(
    [[0.75, 0.125, 0.125], [0.5, 0.25, 0.25], [0.125, 0.375, 0.5], [0.25, 0.625, 0.125],
     [0.875, 0.0625, 0.0625], [1.0, 0.0, 0.0], [0.375, 0.375, 0.25]],
    np.float32,
)  # fmt: skip


def test_window_statistics_from_sql_equal_the_batch_statistics(database: Engine) -> None:
    rng = np.random.default_rng(3)
    n = 400
    p = ROWS[rng.integers(0, len(ROWS), n)]
    q = ROWS[rng.integers(0, len(ROWS), n)]
    pi = rng.choice([1.0, 0.1, 0.25], n)
    observed = (pi == 1.0) | (rng.random(n) < 0.5)  # fallbacks always, some shadow rows
    outcome = np.where(pi == 1.0, "fallback", np.where(observed, "shadow", "not_asked"))
    entropy = rng.random(n).astype(np.float32)
    created = time.time() - 10
    writer = PredictionWriter(
        database, settings=RecordingSettings(flush_interval_s=0.02),
        instruments=build_instruments(CollectorRegistry()), model="m",
    )  # fmt: skip
    writer.start()
    for i in range(n):
        teacher = q[i : i + 1] if observed[i] else None
        writer.record(
            PredictionBatch(
                model="m",
                student_version="1",
                teacher_version="t",
                routing_key=None,
                created_at=created + i * 1e-3,
                request_ids=[f"id{i}"],
                student_probs=p[i : i + 1],
                teacher_probs=teacher,
                teacher_outcome=[TeacherOutcome(outcome[i])],
                teacher_error=None,
                served_by_teacher=np.array([pi[i] == 1.0]),
                degraded=np.zeros(1, np.bool_),
                confidence=p[i : i + 1].max(axis=1),
                entropy=entropy[i : i + 1],
                inclusion_probability=pi[i : i + 1],
                fallback_threshold=0.6,
                student_temperature=1.0,
                student_seconds=0.0,
                teacher_seconds=None,
                total_seconds=0.0,
            )
        )
    assert writer.flush(10.0)
    writer.close(5.0)
    labelled = rng.random(n) < 0.6
    labels = rng.integers(0, 3, n)
    with sessionmaker(database).begin() as session:
        given = [Label(f"id{i}", int(labels[i])) for i in np.flatnonzero(labelled)]
        record_labels(session, labels=given, num_classes=3, client="test")

    with database.connect() as connection:
        stats = window_stats(connection, model="m", start=created - 1, end=created + 10)

    assert stats.rows == n and stats.labelled == int(labelled.sum())
    o = observed
    expected_flip = FlipStats.from_arrays(p[o], q[o], pi[o], pi[o] < 1.0)
    assert_same(stats.flip, expected_flip)
    shadow = outcome == "shadow"
    assert_same(stats.teacher_gap, TeacherGapStats.from_arrays(p[shadow], q[shadow], pi[shadow]))
    paired = labelled & observed
    expected_gap = GapStats.from_arrays(
        p[paired].argmax(1), q[paired].argmax(1), labels[paired], pi[paired]
    )
    assert_same(stats.gap, expected_gap)
    assert_same(stats.calibration, CalibrationStats.from_arrays(p[labelled], labels[labelled]))
    reference = EntropyReference.fit(rng.random(1000))
    expected_drift = DriftStats.from_arrays(entropy, reference)
    drift = stats.drift(reference)
    assert drift.n == n
    np.testing.assert_array_equal(drift.fine_counts, expected_drift.fine_counts)
    # Reference bins are mapped from fine bins: exact except rows within 1e-3 of an edge.
    assert np.abs(drift.counts - expected_drift.counts).sum() <= 2 * int(
        (np.abs(entropy[:, None] - reference.edges[None, 1:-1]) < 1e-3).sum()
    )


def assert_same(actual: object, expected: object) -> None:
    for name in vars(expected) if hasattr(expected, "__dict__") else expected.__dataclass_fields__:  # type: ignore[attr-defined]
        a, e = getattr(actual, name), getattr(expected, name)
        np.testing.assert_allclose(
            np.asarray(a, float), np.asarray(e, float), rtol=1e-6, atol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("empty_model", ["nothing-here"])
def test_an_empty_window_is_all_zeros(database: Engine, empty_model: str) -> None:
    with database.connect() as connection:
        stats = window_stats(connection, model=empty_model, start=0.0, end=time.time())
    assert stats.rows == 0 and stats.labelled == 0 and stats.flip.n == 0 and stats.gap.n == 0
    assert stats.label_completeness == 0.0


def test_the_calibration_cells_and_fine_bins_come_from_one_statement(database: Engine) -> None:
    """Two statements would see two snapshots: a label committed between them made the
    cells and the fine bins count different rows, and the monitor pass failed."""
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(database, "before_cursor_execute", seen)
    try:
        with database.connect() as connection:
            window_stats(connection, model="tiny", start=0.0, end=time.time())
    finally:
        event.remove(database, "before_cursor_execute", seen)
    calibration = [s for s in statements if "feedback.nll" in s]  # NLL: calibration only
    assert len(calibration) == 1, calibration
    assert "GROUP BY predictions.conf_bin, predictions.conf_fine" in calibration[0]
