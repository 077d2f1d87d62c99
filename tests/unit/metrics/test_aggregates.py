"""The database contract: per-row columns in, SQL GROUP BY aggregates out, same statistics.

SQLite stands in for the real database: rows are inserted with the per-row columns this
package defines, the stats are rebuilt from aggregate queries only, and must equal the
batch path over the raw arrays.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import numpy as np
import pytest

from service.monitoring.metrics import (
    CELLS,
    DECILES,
    FINE_BINS,
    CalibrationStats,
    DriftStats,
    EntropyReference,
    FlipStats,
    GapStats,
    TeacherGapStats,
    confidence_bin,
    confidence_decile,
    confidence_fine_bin,
    fine_index,
    flip_columns,
    label_columns,
    teacher_gap_delta,
)
from service.monitoring.probabilities import normalized_entropy
from tests.unit.metrics.support import assert_same_stats, random_probs, sample_labels

N = 3000


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(":memory:")
    yield connection
    connection.close()


def grouped(db: sqlite3.Connection, sql: str, length: int) -> list[np.ndarray]:
    """Run `SELECT bin, agg1, agg2, ... GROUP BY bin` into dense arrays of `length`."""
    rows = db.execute(sql).fetchall()
    out = [np.zeros(length) for _ in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        for column, value in zip(out, row[1:], strict=True):
            column[row[0]] = value
    return out


def test_every_stats_class_rebuilds_from_sql_aggregates(db: sqlite3.Connection) -> None:
    rng = np.random.default_rng(40)
    p, q = random_probs(rng, N, k=5, scale=2.0), random_probs(rng, N, k=5, scale=2.0)
    labels = sample_labels(rng, q)
    pi = rng.choice([1.0, 0.25], size=N)
    served = pi < 1
    h = normalized_entropy(p)
    reference = EntropyReference.fit(normalized_entropy(random_probs(rng, 5000, k=5, scale=2.0)))

    # Insert time: everything about the prediction. Feedback time: everything about y.
    flip, labelled = flip_columns(p, q), label_columns(p, labels)
    columns = {
        "w": 1 / pi, "served": served, "decile": confidence_decile(p.max(axis=1)),
        "flip": flip.flip, "tv": flip.total_variation, "kl": flip.kl_teacher_student,
        "delta": teacher_gap_delta(p, q), "conf": p.max(axis=1).astype(np.float64),
        "conf_bin": confidence_bin(p.max(axis=1)), "conf_fine": confidence_fine_bin(p.max(axis=1)),
        "entropy_bin": reference.bin_index(h), "entropy_fine": fine_index(h),
        "correct": labelled.correct, "teacher_correct": q.argmax(axis=1) == labels,
        "nll": labelled.nll, "brier": labelled.brier,
    }  # fmt: skip
    db.execute(f"CREATE TABLE r ({', '.join(columns)})")
    db.executemany(
        f"INSERT INTO r VALUES ({', '.join('?' * len(columns))})",
        zip(*(np.asarray(v).tolist() for v in columns.values()), strict=True),
    )
    one = db.execute  # a single-row aggregate

    n, sw, sw2, swf, stv, skl = one(
        "SELECT COUNT(*), SUM(w), SUM(w*w), SUM(w*flip), SUM(w*tv), SUM(w*kl) FROM r"
    ).fetchone()
    sn, ssw, ssw2, sswf = one(
        "SELECT COUNT(*), SUM(w), SUM(w*w), SUM(w*flip) FROM r WHERE served"
    ).fetchone()
    dw, dwf = grouped(db, "SELECT decile, SUM(w), SUM(w*flip) FROM r GROUP BY decile", DECILES)
    from_sql = FlipStats(n, sw, sw2, swf, sn, ssw, ssw2, sswf, dw, dwf, stv, skl)
    assert_same_stats(from_sql, FlipStats.from_arrays(p, q, pi, served))

    cells = one(
        "SELECT COUNT(*), SUM(w), SUM(w*w),"
        " SUM(w*(correct AND teacher_correct)), SUM(w*(teacher_correct AND NOT correct)),"
        " SUM(w*(correct AND NOT teacher_correct)), SUM(correct AND teacher_correct),"
        " SUM(teacher_correct AND NOT correct), SUM(correct AND NOT teacher_correct) FROM r"
    ).fetchone()
    gap = GapStats.from_arrays(p.argmax(axis=1), q.argmax(axis=1), labels, pi)
    assert_same_stats(GapStats(*cells), gap)

    shadow = one(
        "SELECT COUNT(*), SUM(w), SUM(w*w), SUM(w*delta), SUM(w*delta*delta) FROM r WHERE served"
    ).fetchone()
    expected = TeacherGapStats.from_arrays(p[served], q[served], pi[served])
    assert_same_stats(TeacherGapStats(*shadow), expected)

    (counts,) = grouped(db, "SELECT entropy_bin, COUNT(*) FROM r GROUP BY entropy_bin", 20)
    (fine,) = grouped(db, "SELECT entropy_fine, COUNT(*) FROM r GROUP BY entropy_fine", FINE_BINS)
    drift = DriftStats(counts=counts.astype(np.int64), fine_counts=fine.astype(np.int64), n=N)
    assert_same_stats(drift, DriftStats.from_arrays(h, reference))

    by = "SELECT {0}, COUNT(*), SUM(correct), SUM(conf) FROM r GROUP BY {0}"
    cell_n, cell_a, cell_c = grouped(db, by.format("conf_bin"), CELLS)
    fine_n, fine_a, fine_c = grouped(db, by.format("conf_fine"), FINE_BINS)
    nll, brier = one("SELECT SUM(nll), SUM(brier) FROM r").fetchone()
    calibration = CalibrationStats(
        cell_n.astype(np.int64), cell_a, cell_c, fine_n.astype(np.int64), fine_a, fine_c, nll, brier
    )
    assert_same_stats(calibration, CalibrationStats.from_arrays(p, labels))


def test_rows_without_an_observed_output_are_refused() -> None:
    p = np.array([[0.7, 0.3]])
    with pytest.raises(ValueError, match="observed"):
        FlipStats.from_arrays(p, np.full((1, 2), np.nan), [1.0], [True])
    with pytest.raises(ValueError, match="observed"):
        DriftStats.from_arrays([np.nan], EntropyReference.fit([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GapStats.from_correct([True], [True], [0.0])
