"""One monitoring window's sufficient statistics, from SQL aggregates only.

Every statistic in `monitoring.metrics` is built from sums and per-bin counts, and every
per-row input to those sums is a column written at insert (bins, teacher scalars) or at
feedback time (correctness, NLL, Brier). So a window over a million predictions is four
GROUP BY queries that return a few thousand numbers; no prediction row reaches Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, case, func, select
from sqlalchemy.sql.elements import ColumnElement

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
)
from service.persistence.tables import Feedback, Prediction

P = Prediction


@dataclass(frozen=True)
class WindowStats:
    """Everything the four metrics need for one model and time range."""

    rows: int
    labelled: int
    flip: FlipStats
    teacher_gap: TeacherGapStats
    gap: GapStats
    calibration: CalibrationStats
    entropy_fine_counts: np.ndarray  # [FINE_BINS] counts of H over equal-width bins

    @property
    def label_completeness(self) -> float:
        return self.labelled / self.rows if self.rows else 0.0

    def drift(self, reference: EntropyReference) -> DriftStats:
        """Entropy counts in the reference's quantile bins, mapped from the fine bins.

        Exact up to the fine-bin resolution (1e-3 in H): a fine bin is assigned to the
        reference bin that holds its centre.
        """
        centres = (np.arange(FINE_BINS) + 0.5) / FINE_BINS
        target = reference.bin_index(centres)
        counts = np.bincount(target, weights=self.entropy_fine_counts, minlength=reference.bins)
        return DriftStats(
            counts=counts.astype(np.int64),
            fine_counts=self.entropy_fine_counts.astype(np.int64),
            n=int(self.entropy_fine_counts.sum()),
        )


def _in_window(model: str, start: float, end: float) -> list[ColumnElement[bool]]:
    return [P.model == model, P.created_at >= start, P.created_at < end]


def _flag(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return case((condition, 1), else_=0)


def window_stats(connection: Connection, *, model: str, start: float, end: float) -> WindowStats:
    entropy = _entropy_counts(connection, model, start, end)
    labelled = connection.execute(
        select(func.count()).select_from(P).join(Feedback, Feedback.request_id == P.request_id)
        .where(*_in_window(model, start, end))
    ).scalar_one()  # fmt: skip
    return WindowStats(
        rows=int(entropy.sum()),
        labelled=int(labelled),
        flip=_flip(connection, model, start, end),
        teacher_gap=_teacher_gap(connection, model, start, end),
        gap=_gap(connection, model, start, end),
        calibration=_calibration(connection, model, start, end),
        entropy_fine_counts=entropy,
    )


def _entropy_counts(connection: Connection, model: str, start: float, end: float) -> np.ndarray:
    counts = np.zeros(FINE_BINS, dtype=np.int64)
    query = (
        select(P.entropy_fine, func.count())
        .where(*_in_window(model, start, end))
        .group_by(P.entropy_fine)
    )
    for fine, count in connection.execute(query):
        counts[int(fine)] = int(count)
    return counts


def _flip(connection: Connection, model: str, start: float, end: float) -> FlipStats:
    w = 1.0 / P.inclusion_probability
    flip = _flag(P.student_label != P.teacher_label)
    served = P.served_by_teacher.is_(False)
    decile = P.conf_fine / (FINE_BINS // DECILES)  # integer division on both databases
    query = (
        select(
            decile,
            func.count(),
            func.sum(w),
            func.sum(w * w),
            func.sum(w * flip),
            func.sum(_flag(served)),
            func.sum(case((served, w), else_=0.0)),
            func.sum(case((served, w * w), else_=0.0)),
            func.sum(case((served, w * flip), else_=0.0)),
            func.sum(w * P.total_variation),
            func.sum(w * P.kl_teacher_student),
        )
        .where(*_in_window(model, start, end), P.teacher_label.is_not(None))
        .group_by(decile)
    )
    rows = [tuple(float(v or 0.0) for v in row) for row in connection.execute(query)]
    totals = np.array([row[1:] for row in rows]).sum(axis=0) if rows else np.zeros(10)
    decile_w, decile_flip = np.zeros(DECILES), np.zeros(DECILES)
    for row in rows:
        decile_w[int(row[0])] += row[2]
        decile_flip[int(row[0])] += row[4]
    return FlipStats(
        n=int(totals[0]), sum_w=totals[1], sum_w2=totals[2], sum_w_flip=totals[3],
        served_n=int(totals[4]), served_sum_w=totals[5], served_sum_w2=totals[6],
        served_sum_w_flip=totals[7], decile_sum_w=decile_w, decile_sum_w_flip=decile_flip,
        sum_w_tv=totals[8], sum_w_kl=totals[9],
    )  # fmt: skip


def _teacher_gap(connection: Connection, model: str, start: float, end: float) -> TeacherGapStats:
    w = 1.0 / P.inclusion_probability
    delta = P.teacher_confidence - P.teacher_p_student
    row = connection.execute(
        select(
            func.count(),
            func.sum(w),
            func.sum(w * w),
            func.sum(w * delta),
            func.sum(w * delta * delta),
        ).where(*_in_window(model, start, end), P.teacher_outcome == "shadow")
    ).one()
    n, sum_w, sum_w2, sum_wd, sum_wd2 = (float(v or 0.0) for v in row)
    return TeacherGapStats(
        n=int(n), sum_w=sum_w, sum_w2=sum_w2, sum_w_delta=sum_wd, sum_w_delta2=sum_wd2
    )


def _gap(connection: Connection, model: str, start: float, end: float) -> GapStats:
    w = 1.0 / P.inclusion_probability
    s, t = Feedback.student_correct, Feedback.teacher_correct
    both, teacher_only, student_only = s.is_(True) & t.is_(True), t.is_(True) & s.is_(False), (
        s.is_(True) & t.is_(False)
    )  # fmt: skip
    row = connection.execute(
        select(
            func.count(),
            func.sum(w),
            func.sum(w * w),
            func.sum(case((both, w), else_=0.0)),
            func.sum(case((teacher_only, w), else_=0.0)),
            func.sum(case((student_only, w), else_=0.0)),
            func.sum(_flag(both)),
            func.sum(_flag(teacher_only)),
            func.sum(_flag(student_only)),
        )
        .join(Feedback, Feedback.request_id == P.request_id)
        .where(*_in_window(model, start, end), t.is_not(None))
    ).one()
    v = [float(x or 0.0) for x in row]
    return GapStats(
        n=int(v[0]), sum_w=v[1], sum_w2=v[2], a_w=v[3], b_w=v[4], c_w=v[5],
        a_count=int(v[6]), b_count=int(v[7]), c_count=int(v[8]),
    )  # fmt: skip


def _calibration(connection: Connection, model: str, start: float, end: float) -> CalibrationStats:
    """Per-cell and per-fine-bin sums from one query (one snapshot: the two must count the
    same rows, and a label committed between two queries would break that)."""
    correct = _flag(Feedback.student_correct.is_(True))
    query = (
        select(
            P.conf_bin,
            P.conf_fine,
            func.count(),
            func.sum(correct),
            func.sum(P.confidence),
            func.sum(Feedback.nll),
            func.sum(Feedback.brier),
        )
        .join(Feedback, Feedback.request_id == P.request_id)
        .where(*_in_window(model, start, end))
        .group_by(P.conf_bin, P.conf_fine)
    )
    rows = connection.execute(query).all()
    sums = np.array([r[2:] for r in rows], np.float64).reshape(-1, 5)
    cells = np.array([r[0] for r in rows], np.intp)
    fine = np.array([r[1] for r in rows], np.intp)

    def per(index: npt.NDArray[np.intp], size: int, column: int) -> npt.NDArray[np.float64]:
        return np.bincount(index, sums[:, column], minlength=size).astype(np.float64)

    return CalibrationStats(
        counts=per(cells, CELLS, 0).round().astype(np.int64), sum_correct=per(cells, CELLS, 1),
        sum_conf=per(cells, CELLS, 2), fine_counts=per(fine, FINE_BINS, 0).round().astype(np.int64),
        fine_sum_correct=per(fine, FINE_BINS, 1), fine_sum_conf=per(fine, FINE_BINS, 2),
        sum_nll=float(sums[:, 3].sum()), sum_brier=float(sums[:, 4].sum()),
    )  # fmt: skip
