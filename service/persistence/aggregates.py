"""One monitoring window's sufficient statistics, from the per-bucket sums only.

Every statistic in `monitoring.metrics` is built from sums and per-bin counts, and the
writer and feedback keep those sums per time bucket as rows arrive (`persistence.sums`).
So a window is four GROUP BY queries over its buckets' sums, whatever the traffic it
covers: no prediction row is read, and none reaches Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, func, select
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
from service.persistence.tables import EntropySums, LabelSums, PredictionSums

E, L, S = EntropySums, LabelSums, PredictionSums


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


def window_stats(connection: Connection, *, model: str, start: float, end: float) -> WindowStats:
    """The sums of the buckets that start in [start, end): exactly the window's rows when
    both ends are multiples of the bucket length (`recording.bucket_s`)."""
    labels = _labels(connection, model, start, end)
    entropy = _entropy_counts(connection, model, start, end)
    return WindowStats(
        rows=int(entropy.sum()),
        labelled=int(labels.calibration.counts.sum()),
        flip=_flip(connection, model, start, end),
        teacher_gap=_teacher_gap(connection, model, start, end),
        gap=labels.gap,
        calibration=labels.calibration,
        entropy_fine_counts=entropy,
    )


def _in_window(table: Any, model: str, start: float, end: float) -> list[ColumnElement[bool]]:
    return [table.model == model, table.bucket_start >= start, table.bucket_start < end]


def _entropy_counts(connection: Connection, model: str, start: float, end: float) -> np.ndarray:
    counts = np.zeros(FINE_BINS, dtype=np.int64)
    query = (
        select(E.entropy_fine, func.sum(E.n))
        .where(*_in_window(E, model, start, end))
        .group_by(E.entropy_fine)
    )
    for fine, count in connection.execute(query):
        counts[int(fine)] = int(count)
    return counts


def _flip(connection: Connection, model: str, start: float, end: float) -> FlipStats:
    columns = (
        S.teacher_n, S.sum_w, S.sum_w2, S.sum_w_flip, S.served_n, S.served_sum_w,
        S.served_sum_w2, S.served_sum_w_flip, S.sum_w_tv, S.sum_w_kl,
    )  # fmt: skip
    query = (
        select(S.decile, *(func.sum(c) for c in columns))
        .where(*_in_window(S, model, start, end))
        .group_by(S.decile)
    )
    rows = [tuple(float(v or 0.0) for v in row) for row in connection.execute(query)]
    totals = np.array([row[1:] for row in rows]).sum(axis=0) if rows else np.zeros(len(columns))
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
    row = connection.execute(
        select(
            func.sum(S.shadow_n),
            func.sum(S.shadow_sum_w),
            func.sum(S.shadow_sum_w2),
            func.sum(S.shadow_sum_w_delta),
            func.sum(S.shadow_sum_w_delta2),
        ).where(*_in_window(S, model, start, end))
    ).one()
    n, sum_w, sum_w2, sum_wd, sum_wd2 = (float(v or 0.0) for v in row)
    return TeacherGapStats(
        n=int(n), sum_w=sum_w, sum_w2=sum_w2, sum_w_delta=sum_wd, sum_w_delta2=sum_wd2
    )


@dataclass(frozen=True)
class _Labels:
    gap: GapStats
    calibration: CalibrationStats


_LABEL_SUMS = (
    L.n, L.sum_correct, L.sum_conf, L.sum_nll, L.sum_brier, L.paired_n, L.paired_sum_w,
    L.paired_sum_w2, L.both_w, L.teacher_only_w, L.student_only_w, L.both_n,
    L.teacher_only_n, L.student_only_n,
)  # fmt: skip


def _labels(connection: Connection, model: str, start: float, end: float) -> _Labels:
    """Calibration cells, fine bins and the paired gap from one statement (one snapshot:
    the cells, the fine bins and the label count must count the same labels)."""
    query = (
        select(L.conf_bin, L.conf_fine, *(func.sum(c) for c in _LABEL_SUMS))
        .where(*_in_window(L, model, start, end))
        .group_by(L.conf_bin, L.conf_fine)
    )
    rows = connection.execute(query).all()
    sums = np.array([r[2:] for r in rows], np.float64).reshape(-1, len(_LABEL_SUMS))
    cells = np.array([r[0] for r in rows], np.intp)
    fine = np.array([r[1] for r in rows], np.intp)

    def per(index: npt.NDArray[np.intp], size: int, column: int) -> npt.NDArray[np.float64]:
        return np.bincount(index, sums[:, column], minlength=size).astype(np.float64)

    g = sums[:, 5:].sum(axis=0)
    gap = GapStats(
        n=round(g[0]), sum_w=g[1], sum_w2=g[2], a_w=g[3], b_w=g[4], c_w=g[5],
        a_count=round(g[6]), b_count=round(g[7]), c_count=round(g[8]),
    )  # fmt: skip
    calibration = CalibrationStats(
        counts=per(cells, CELLS, 0).round().astype(np.int64), sum_correct=per(cells, CELLS, 1),
        sum_conf=per(cells, CELLS, 2), fine_counts=per(fine, FINE_BINS, 0).round().astype(np.int64),
        fine_sum_correct=per(fine, FINE_BINS, 1), fine_sum_conf=per(fine, FINE_BINS, 2),
        sum_nll=float(sums[:, 3].sum()), sum_brier=float(sums[:, 4].sum()),
    )  # fmt: skip
    return _Labels(gap=gap, calibration=calibration)
