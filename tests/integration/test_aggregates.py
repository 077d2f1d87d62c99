"""Window statistics from the stored per-bucket sums equal the batch statistics over the
same raw arrays; the migration that fills the sums from stored rows agrees with both."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

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
from service.persistence import migrate
from service.persistence.aggregates import WindowStats, window_stats
from service.persistence.feedback import Label, record_labels
from service.persistence.writer import PredictionWriter
from service.settings import RecordingSettings

BUCKET_S = 60
# Probability rows exactly representable in float16, so stored and raw values agree.
ROWS = np.array(
    [[0.75, 0.125, 0.125], [0.5, 0.25, 0.25], [0.125, 0.375, 0.5], [0.25, 0.625, 0.125],
     [0.875, 0.0625, 0.0625], [1.0, 0.0, 0.0], [0.375, 0.375, 0.25]],
    np.float32,
)  # fmt: skip


@dataclass
class Traffic:
    """What was written, as raw arrays, and the window that holds it."""

    p: np.ndarray
    q: np.ndarray
    pi: np.ndarray
    observed: np.ndarray
    outcome: np.ndarray
    entropy: np.ndarray
    labelled: np.ndarray
    labels: np.ndarray
    start: float
    end: float


def write_traffic(database: Engine, n: int = 400) -> Traffic:
    """`n` predictions through the real writer, 0.3 s apart over two buckets, a client's
    request id sent twice, and 60% of them labelled through the feedback path."""
    rng = np.random.default_rng(3)
    p = ROWS[rng.integers(0, len(ROWS), n)]
    q = ROWS[rng.integers(0, len(ROWS), n)]
    pi = rng.choice([1.0, 0.1, 0.25], n)
    observed = (pi == 1.0) | (rng.random(n) < 0.5)  # fallbacks always, some shadow rows
    outcome = np.where(pi == 1.0, "fallback", np.where(observed, "shadow", "not_asked"))
    entropy = rng.random(n).astype(np.float32)
    start = math.floor(time.time() / BUCKET_S) * BUCKET_S - 3 * BUCKET_S
    writer = PredictionWriter(
        database, settings=RecordingSettings(flush_interval_s=0.02, bucket_s=BUCKET_S),
        instruments=build_instruments(CollectorRegistry()), model="m",
    )  # fmt: skip
    writer.start()
    batches = [
        PredictionBatch(
            model="m",
            student_version="1",
            teacher_version="t",
            routing_key=None,
            created_at=start + 0.3 * i,
            request_ids=[f"id{i}"],
            student_probs=p[i : i + 1],
            teacher_probs=q[i : i + 1] if observed[i] else None,
            teacher_outcome=[TeacherOutcome(outcome[i])],
            teacher_error=None,
            entropy=entropy[i : i + 1],
            shadow_rate=float(pi[i]) if pi[i] < 1.0 else 0.1,  # π is 1 for a fallback row
            fallback_threshold=0.6,
            student_temperature=1.0,
            student_seconds=0.0,
            teacher_seconds=None,
            total_seconds=0.0,
        )
        for i in range(n)
    ]
    for batch in batches:
        writer.record(batch)
    # The same id again, after its row is stored: the flush fails whole on it, is written
    # again skipping it, and the sums count the first row only.
    assert writer.flush(10.0)
    writer.record(replace(batches[0], created_at=start + 100.0, entropy=np.ones(1, np.float32)))
    assert writer.flush(10.0)
    writer.close(5.0)
    labelled = rng.random(n) < 0.6
    labels = rng.integers(0, 3, n)
    with sessionmaker(database).begin() as session:
        given = [Label(f"id{i}", int(labels[i])) for i in np.flatnonzero(labelled)]
        record_labels(session, labels=given, num_classes=3, client="test", bucket_s=BUCKET_S)
    return Traffic(
        p, q, pi, observed, outcome, entropy, labelled, labels, start, start + 3 * BUCKET_S
    )


def stats_of(database: Engine, traffic: Traffic) -> WindowStats:
    with database.connect() as connection:
        return window_stats(connection, model="m", start=traffic.start, end=traffic.end)


def test_window_statistics_from_the_sums_equal_the_batch_statistics(database: Engine) -> None:
    t = write_traffic(database)
    p, q, pi, labels, labelled, o = t.p, t.q, t.pi, t.labels, t.labelled, t.observed
    stats = stats_of(database, t)

    assert stats.rows == len(p) and stats.labelled == int(labelled.sum())
    expected_flip = FlipStats.from_arrays(p[o], q[o], pi[o], pi[o] < 1.0)
    assert_same(stats.flip, expected_flip)
    shadow = t.outcome == "shadow"
    assert_same(stats.teacher_gap, TeacherGapStats.from_arrays(p[shadow], q[shadow], pi[shadow]))
    paired = labelled & o
    expected_gap = GapStats.from_arrays(
        p[paired].argmax(1), q[paired].argmax(1), labels[paired], pi[paired]
    )
    assert_same(stats.gap, expected_gap)
    assert_same(stats.calibration, CalibrationStats.from_arrays(p[labelled], labels[labelled]))
    reference = EntropyReference.fit(np.random.default_rng(4).random(1000))
    expected_drift = DriftStats.from_arrays(t.entropy, reference)
    drift = stats.drift(reference)
    assert drift.n == len(p)
    np.testing.assert_array_equal(drift.fine_counts, expected_drift.fine_counts)
    # Reference bins are mapped from fine bins: exact except rows within 1e-3 of an edge.
    assert np.abs(drift.counts - expected_drift.counts).sum() <= 2 * int(
        (np.abs(t.entropy[:, None] - reference.edges[None, 1:-1]) < 1e-3).sum()
    )
    # Each bucket is its own window: the two halves add up to the whole.
    with database.connect() as connection:
        halves = [
            window_stats(connection, model="m", start=a, end=a + BUCKET_S)
            for a in (t.start, t.start + BUCKET_S, t.start + 2 * BUCKET_S)
        ]
    assert [h.rows for h in halves] == [200, 200, 0]
    assert sum(h.labelled for h in halves) == stats.labelled


def test_the_migration_fills_the_sums_the_writer_and_feedback_keep(database: Engine) -> None:
    """Upgrading a database that holds rows but no sums (here: down to 0002 and up again)
    sums the stored rows in SQL to the same numbers the writer and feedback added."""
    t = write_traffic(database)
    kept = stats_of(database, t)
    migrate.downgrade(database, "0002")
    migrate.upgrade(database)
    filled = stats_of(database, t)
    for name in ("flip", "teacher_gap", "gap", "calibration"):
        assert_same(getattr(filled, name), getattr(kept, name))
    assert (filled.rows, filled.labelled) == (kept.rows, kept.labelled)
    np.testing.assert_array_equal(filled.entropy_fine_counts, kept.entropy_fine_counts)


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
    calibration = [s for s in statements if "label_sums.sum_nll" in s]  # NLL: labels only
    assert len(calibration) == 1, calibration
    assert "GROUP BY label_sums.conf_bin, label_sums.conf_fine" in calibration[0]


def test_two_writers_adding_to_the_same_buckets_lose_nothing(database: Engine) -> None:
    """Two replicas' writers flushing into the same buckets at once: each flush adds to the
    same sum rows (locked in key order, so they queue rather than deadlock) and the
    totals are exact."""
    start = math.floor(time.time() / BUCKET_S) * BUCKET_S - BUCKET_S
    writers = [
        PredictionWriter(
            database,
            settings=RecordingSettings(flush_interval_s=0.005, bucket_s=BUCKET_S),
            instruments=build_instruments(CollectorRegistry()),
            model="m",
        )
        for _ in range(2)
    ]
    for writer in writers:
        writer.start(wait_s=10.0)
    p = ROWS[:4]
    per_writer = 3000
    for i in range(per_writer):
        for w, writer in enumerate(writers):
            writer.record(
                PredictionBatch(
                    model="m",
                    student_version="1",
                    teacher_version="t",
                    routing_key=None,
                    created_at=start + (i % 100) * 0.5,
                    request_ids=[f"w{w}-{i}-{j}" for j in range(4)],
                    student_probs=p,
                    teacher_probs=p[::-1].copy(),
                    teacher_outcome=[TeacherOutcome.SHADOW] * 4,
                    teacher_error=None,
                    entropy=np.linspace(0, 1, 4, dtype=np.float32),
                    shadow_rate=0.5,
                    fallback_threshold=0.6,
                    student_temperature=1.0,
                    student_seconds=0.0,
                    teacher_seconds=1e-3,
                    total_seconds=0.0,
                )
            )
    for writer in writers:
        assert writer.flush(60.0)
        writer.close(5.0)
    with database.connect() as connection:
        stats = window_stats(connection, model="m", start=start, end=start + BUCKET_S)
    n = 2 * per_writer * 4
    assert stats.rows == n and stats.flip.n == n and stats.teacher_gap.n == n
    assert stats.flip.sum_w == pytest.approx(2.0 * n)
    np.testing.assert_array_equal(np.flatnonzero(stats.entropy_fine_counts), [0, 333, 666, 999])
