"""Accuracy gap between teacher and student on paired, labelled rows, and its label-free twin.

Δ = P(ŷt = y) - P(ŷs = y). On the paired 2x2 table (a = both right, b = teacher right and
student wrong, c = student right and teacher wrong, d = both wrong) Δ = (b - c)/n: only the
discordant rows carry information. Every share is weighted by w = 1/π (METRICS.md).

Δ̃ = weighted mean of (max q - q[ŷs]) over shadow traffic: the accuracy the student loses
if the teacher's probabilities are calibrated, with no label needed. Δ̂ - Δ̃ on matured
windows (`gap_residual`) growing means the teacher itself drifted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from service.monitoring.metrics.flip import inverse_inclusion_weights
from service.monitoring.metrics.intervals import (
    effective_sample_size,
    mcnemar_exact,
    newcombe_paired_difference,
    wald_paired_difference,
    z_quantile,
)
from service.monitoring.metrics.values import FloatArray, MetricValue, finite_rows, ratio

DEFAULT_GAP = 0.02


@dataclass(frozen=True)
class GapStats:
    """Sufficient statistics of the paired accuracy gap; sums over paired labelled rows.

    SQL over rows with a teacher output and a label: COUNT(*), SUM(w), SUM(w*w), and
    SUM(w), COUNT(*) filtered on each of the cells a, b, c (from the feedback columns
    teacher_correct and student_correct).
    """

    n: int = 0  # paired labelled rows
    sum_w: float = 0.0  # Σ w
    sum_w2: float = 0.0  # Σ w²
    a_w: float = 0.0  # Σ w over both right (for the two accuracies)
    b_w: float = 0.0  # Σ w over teacher right, student wrong
    c_w: float = 0.0  # Σ w over student right, teacher wrong
    a_count: int = 0  # the same three cells, unweighted (Newcombe, McNemar)
    b_count: int = 0
    c_count: int = 0

    @classmethod
    def from_arrays(
        cls,
        student_pred: npt.ArrayLike,
        teacher_pred: npt.ArrayLike,
        labels: npt.ArrayLike,
        pi: npt.ArrayLike,
    ) -> GapStats:
        """Batch path over raw rows: predicted classes ŷs, ŷt, labels y and π, each [n]."""
        y = np.asarray(labels)
        return cls.from_correct(np.asarray(student_pred) == y, np.asarray(teacher_pred) == y, pi)

    @classmethod
    def from_correct(
        cls, student_correct: npt.ArrayLike, teacher_correct: npt.ArrayLike, pi: npt.ArrayLike
    ) -> GapStats:
        """From the per-row feedback columns 1[ŷs = y], 1[ŷt = y] and π."""
        s = np.asarray(student_correct, dtype=bool)
        t = np.asarray(teacher_correct, dtype=bool)
        w = inverse_inclusion_weights(pi)
        if not (s.shape == t.shape == w.shape):
            raise ValueError("student_correct, teacher_correct and pi need one value per row")
        a, b, c = s & t, t & ~s, s & ~t
        return cls(
            n=int(w.size),
            sum_w=float(w.sum()),
            sum_w2=float((w * w).sum()),
            a_w=float(w[a].sum()),
            b_w=float(w[b].sum()),
            c_w=float(w[c].sum()),
            a_count=int(a.sum()),
            b_count=int(b.sum()),
            c_count=int(c.sum()),
        )

    def merge(self, other: GapStats) -> GapStats:
        """Statistics of the union of both windows: every field is a sum."""
        return replace(
            self,
            **{name: getattr(self, name) + getattr(other, name) for name in _GAP_FIELDS},
        )

    @property
    def equal_weights(self) -> bool:
        """All weights equal, i.e. n_eff = n: the unweighted counts are then exact."""
        return self.n > 0 and math.isclose(self.sum_w * self.sum_w, self.n * self.sum_w2)

    def result(
        self, gap_threshold: float = DEFAULT_GAP, alpha: float = 0.05, min_n: int = 1
    ) -> MetricValue:
        """Δ with its interval; "alert" when the lower bound exceeds `gap_threshold`.

        Newcombe's paired interval on the counts when the weights are all equal, otherwise
        Wald on n_eff. The exact McNemar p-value uses the unweighted discordant counts.
        """
        n_eff = effective_sample_size(self.sum_w, self.sum_w2)
        delta = ratio(self.b_w - self.c_w, self.sum_w)
        details: dict[str, float | list[float]] = {
            "teacher_accuracy": ratio(self.a_w + self.b_w, self.sum_w),
            "student_accuracy": ratio(self.a_w + self.c_w, self.sum_w),
            "b_share": ratio(self.b_w, self.sum_w),
            "c_share": ratio(self.c_w, self.sum_w),
            "b_count": float(self.b_count),
            "c_count": float(self.c_count),
            "mcnemar_p": mcnemar_exact(self.b_count, self.c_count),
            "newcombe": float(self.equal_weights),
        }
        if self.n < max(min_n, 1):
            return MetricValue.insufficient(
                "accuracy_gap",
                n=self.n,
                n_eff=n_eff,
                threshold=gap_threshold,
                value=delta,
                details=details,
            )
        if self.equal_weights:
            neither = self.n - self.a_count - self.b_count - self.c_count
            cells = (self.a_count, self.b_count, self.c_count, neither)
            low, high = newcombe_paired_difference(*cells, alpha=alpha)
        else:
            b, c = self.b_w / self.sum_w, self.c_w / self.sum_w
            low, high = wald_paired_difference(b, c, n_eff, alpha)
        return MetricValue(
            name="accuracy_gap",
            value=delta,
            ci_low=low,
            ci_high=high,
            n=self.n,
            n_eff=n_eff,
            threshold=gap_threshold,
            state="alert" if low > gap_threshold else "ok",
            details=details,
        )


_GAP_FIELDS = ("n", "sum_w", "sum_w2", "a_w", "b_w", "c_w", "a_count", "b_count", "c_count")


def teacher_gap_delta(student_probs: npt.ArrayLike, teacher_probs: npt.ArrayLike) -> FloatArray:
    """Per row max q - q[ŷs]: the teacher's expected accuracy loss of answering ŷs."""
    p = finite_rows(student_probs, "student probabilities")
    q = finite_rows(teacher_probs, "teacher probabilities")
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"student {p.shape} and teacher {q.shape} must both be [n, K]")
    chosen = np.take_along_axis(q, p.argmax(axis=1)[:, None], axis=1)[:, 0]
    out: FloatArray = q.max(axis=1) - chosen
    return out


@dataclass(frozen=True)
class TeacherGapStats:
    """Sufficient statistics of Δ̃ over shadow rows.

    SQL over shadow rows, with delta = teacher_confidence - teacher_p_student:
    COUNT(*), SUM(w), SUM(w*w), SUM(w*delta), SUM(w*delta*delta).
    """

    n: int = 0
    sum_w: float = 0.0
    sum_w2: float = 0.0
    sum_w_delta: float = 0.0  # Σ w·(max q - q[ŷs])
    sum_w_delta2: float = 0.0  # Σ w·(max q - q[ŷs])², for the interval

    @classmethod
    def from_arrays(
        cls, student_probs: npt.ArrayLike, teacher_probs: npt.ArrayLike, pi: npt.ArrayLike
    ) -> TeacherGapStats:
        """Batch path over raw shadow rows: p, q [n, K] and π [n]."""
        delta = teacher_gap_delta(student_probs, teacher_probs)
        w = inverse_inclusion_weights(pi)
        if w.shape != delta.shape:
            raise ValueError("pi needs one value per row")
        return cls(
            n=int(w.size),
            sum_w=float(w.sum()),
            sum_w2=float((w * w).sum()),
            sum_w_delta=float((w * delta).sum()),
            sum_w_delta2=float((w * delta * delta).sum()),
        )

    def merge(self, other: TeacherGapStats) -> TeacherGapStats:
        """Statistics of the union of both windows: every field is a sum."""
        return TeacherGapStats(
            n=self.n + other.n,
            sum_w=self.sum_w + other.sum_w,
            sum_w2=self.sum_w2 + other.sum_w2,
            sum_w_delta=self.sum_w_delta + other.sum_w_delta,
            sum_w_delta2=self.sum_w_delta2 + other.sum_w_delta2,
        )

    def result(self, alpha: float = 0.05, min_n: int = 1) -> MetricValue:
        """Δ̃ with a Wald interval: weighted variance s² = Σwδ²/Σw - Δ̃², SE = √(s²/n_eff)."""
        n_eff = effective_sample_size(self.sum_w, self.sum_w2)
        mean = ratio(self.sum_w_delta, self.sum_w)
        if self.n < max(min_n, 1):
            return MetricValue.insufficient("teacher_gap", n=self.n, n_eff=n_eff, value=mean)
        variance = max(self.sum_w_delta2 / self.sum_w - mean * mean, 0.0)
        half = z_quantile(alpha) * math.sqrt(variance / n_eff)
        return MetricValue(
            name="teacher_gap",
            value=mean,
            ci_low=max(0.0, mean - half),
            ci_high=min(1.0, mean + half),
            n=self.n,
            n_eff=n_eff,
            threshold=None,
            state="ok",
        )


def gap_residual(gap: MetricValue, teacher_gap: MetricValue) -> float:
    """Δ̂ - Δ̃ on the same window; NaN unless both are judged (not "insufficient")."""
    if "insufficient" in (gap.state, teacher_gap.state):
        return math.nan
    return gap.value - teacher_gap.value
