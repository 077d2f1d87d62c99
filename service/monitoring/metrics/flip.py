"""Flip rate: how often the student's top class differs from the teacher's (label-free).

Only teacher-observed rows enter (fallback and shadow); each is weighted by w = 1/π, π the
probability that its teacher output was requested (METRICS.md), so that the weighted share
estimates the flip rate over *all* traffic (Hájek estimator). The unweighted share over
observed rows is biased towards hard, low-confidence inputs, which are always observed.
Rows whose teacher call failed are left out: that assumes failures do not depend on
whether the models would have disagreed.

Per teacher-observed row the database stores w, flip, served_by_student, the confidence
decile, total variation and KL (`flip_columns`); `FlipStats` is then sums of those.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from service.monitoring.metrics.intervals import effective_sample_size, proportion_interval
from service.monitoring.metrics.values import (
    Details,
    FloatArray,
    IntArray,
    MetricValue,
    binned_sum,
    finite_rows,
    ratio,
    readonly_floats,
)

DECILES = 10
# Floor on p inside KL(q‖p): a float32 student underflows to exactly 0 on classes the
# teacher still gives mass to, and an infinite mean would hide every other row.
PROB_FLOOR = 1e-12


def confidence_decile(confidence: npt.ArrayLike) -> IntArray:
    """Decile of the student confidence c = max p ∈ [0, 1]: min(⌊10c⌋, 9), so 1.0 is in 9."""
    c = np.clip(finite_rows(confidence, "confidences"), 0.0, 1.0)
    out: IntArray = np.minimum(np.floor(c * DECILES), DECILES - 1).astype(np.int64)
    return out


@dataclass(frozen=True, eq=False)
class FlipColumns:
    """Per-row values for teacher-observed rows (what the writer stores at insert time)."""

    flip: npt.NDArray[np.bool_]  # argmax p ≠ argmax q
    total_variation: FloatArray  # ½ Σ_k |p_k - q_k|
    kl_teacher_student: FloatArray  # KL(q‖p) = Σ_k q_k ln(q_k / p_k), in nats
    decile: IntArray  # confidence_decile(max p)


def flip_columns(student_probs: npt.ArrayLike, teacher_probs: npt.ArrayLike) -> FlipColumns:
    """Flip, total variation, KL(q‖p) and confidence decile for each row of p and q [n, K]."""
    p = finite_rows(student_probs, "student probabilities")
    q = finite_rows(teacher_probs, "teacher probabilities")
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"student {p.shape} and teacher {q.shape} must both be [n, K]")
    log_ratio = np.log(np.maximum(q, PROB_FLOOR)) - np.log(np.maximum(p, PROB_FLOOR))
    # 0·ln 0 = 0: classes without teacher mass add nothing.
    kl = np.where(q > 0, q * log_ratio, 0.0).sum(axis=1)
    return FlipColumns(
        flip=p.argmax(axis=1) != q.argmax(axis=1),
        total_variation=0.5 * np.abs(p - q).sum(axis=1),
        kl_teacher_student=kl,
        decile=confidence_decile(p.max(axis=1)),
    )


def inverse_inclusion_weights(pi: npt.ArrayLike) -> FloatArray:
    """w = 1/π, checking that every π is a probability in (0, 1]."""
    p = np.asarray(pi, dtype=np.float64)
    if not bool(np.all((p > 0) & (p <= 1))):
        raise ValueError("inclusion probabilities must lie in (0, 1]")
    out: FloatArray = 1.0 / p
    return out


@dataclass(frozen=True, eq=False)
class FlipStats:
    """Sufficient statistics of the weighted flip rate; sums over teacher-observed rows.

    SQL: over rows with a teacher output, COUNT(*), SUM(w), SUM(w*w), SUM(w*flip),
    SUM(w*tv), SUM(w*kl); the same four with WHERE served_by_student for `served_*`;
    and SUM(w), SUM(w*flip) GROUP BY decile for the two decile arrays.
    """

    n: int = 0  # teacher-observed rows
    sum_w: float = 0.0  # Σ w, w = 1/π
    sum_w2: float = 0.0  # Σ w²  (for n_eff)
    sum_w_flip: float = 0.0  # Σ w·1[ŷs ≠ ŷt]
    served_n: int = 0  # the same four over rows answered by the student (shadowed rows)
    served_sum_w: float = 0.0
    served_sum_w2: float = 0.0
    served_sum_w_flip: float = 0.0
    decile_sum_w: FloatArray = field(default_factory=lambda: np.zeros(DECILES))  # Σw by decile
    decile_sum_w_flip: FloatArray = field(default_factory=lambda: np.zeros(DECILES))
    sum_w_tv: float = 0.0  # Σ w·½Σ|p-q|
    sum_w_kl: float = 0.0  # Σ w·KL(q‖p)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decile_sum_w", readonly_floats(self.decile_sum_w, DECILES))
        flips = readonly_floats(self.decile_sum_w_flip, DECILES)
        object.__setattr__(self, "decile_sum_w_flip", flips)

    @classmethod
    def from_arrays(
        cls,
        student_probs: npt.ArrayLike,
        teacher_probs: npt.ArrayLike,
        pi: npt.ArrayLike,
        served_by_student: npt.ArrayLike,
    ) -> FlipStats:
        """Batch path over raw teacher-observed rows: p, q [n, K], π [n], served [n]."""
        cols = flip_columns(student_probs, teacher_probs)
        w = inverse_inclusion_weights(pi)
        served = np.asarray(served_by_student, dtype=bool)
        if not (w.shape == served.shape == cols.flip.shape):
            raise ValueError("pi and served_by_student need one value per row")
        wf = w * cols.flip
        return cls(
            n=int(w.size),
            sum_w=float(w.sum()),
            sum_w2=float((w * w).sum()),
            sum_w_flip=float(wf.sum()),
            served_n=int(served.sum()),
            served_sum_w=float(w[served].sum()),
            served_sum_w2=float((w[served] ** 2).sum()),
            served_sum_w_flip=float(wf[served].sum()),
            decile_sum_w=binned_sum(cols.decile, w, DECILES),
            decile_sum_w_flip=binned_sum(cols.decile, wf, DECILES),
            sum_w_tv=float((w * cols.total_variation).sum()),
            sum_w_kl=float((w * cols.kl_teacher_student).sum()),
        )

    def merge(self, other: FlipStats) -> FlipStats:
        """Statistics of the union of both windows: every field is a sum."""
        return replace(
            self,
            n=self.n + other.n,
            sum_w=self.sum_w + other.sum_w,
            sum_w2=self.sum_w2 + other.sum_w2,
            sum_w_flip=self.sum_w_flip + other.sum_w_flip,
            served_n=self.served_n + other.served_n,
            served_sum_w=self.served_sum_w + other.served_sum_w,
            served_sum_w2=self.served_sum_w2 + other.served_sum_w2,
            served_sum_w_flip=self.served_sum_w_flip + other.served_sum_w_flip,
            decile_sum_w=self.decile_sum_w + other.decile_sum_w,
            decile_sum_w_flip=self.decile_sum_w_flip + other.decile_sum_w_flip,
            sum_w_tv=self.sum_w_tv + other.sum_w_tv,
            sum_w_kl=self.sum_w_kl + other.sum_w_kl,
        )

    def result(self, threshold: float, alpha: float = 0.05, min_n: int = 1) -> MetricValue:
        """F = Σw·flip / Σw with its interval on n_eff; "alert" when the lower bound > threshold."""
        details: Details = {
            "flip_rate_by_decile": [
                ratio(float(f), float(w))
                for f, w in zip(self.decile_sum_w_flip, self.decile_sum_w, strict=True)
            ],
            "weight_by_decile": [float(w) for w in self.decile_sum_w],
            "mean_total_variation": ratio(self.sum_w_tv, self.sum_w),
            "mean_kl_teacher_student": ratio(self.sum_w_kl, self.sum_w),
        }
        served = self.served_result(threshold, alpha, min_n)
        details |= {
            "served_flip_rate": served.value,
            "served_ci_low": served.ci_low,
            "served_ci_high": served.ci_high,
            "served_n_eff": served.n_eff,
        }
        counts = (self.n, self.sum_w, self.sum_w2, self.sum_w_flip)
        return _weighted_rate("flip_rate", counts, threshold, alpha, min_n, details)

    def served_result(self, threshold: float, alpha: float = 0.05, min_n: int = 1) -> MetricValue:
        """The flip rate over requests the student answered (what users actually got)."""
        counts = (self.served_n, self.served_sum_w, self.served_sum_w2, self.served_sum_w_flip)
        return _weighted_rate("served_flip_rate", counts, threshold, alpha, min_n, {})


def _weighted_rate(
    name: str,
    counts: tuple[int, float, float, float],
    threshold: float,
    alpha: float,
    min_n: int,
    details: Details,
) -> MetricValue:
    """A weighted share from (n, Σw, Σw², Σw·hit) with its interval and alert state."""
    n, sum_w, sum_w2, sum_w_hit = counts
    n_eff = effective_sample_size(sum_w, sum_w2)
    rate = ratio(sum_w_hit, sum_w)
    if n < max(min_n, 1):
        return MetricValue.insufficient(
            name, n=n, n_eff=n_eff, threshold=threshold, value=rate, details=details
        )
    low, high = proportion_interval(rate, n_eff, alpha)
    return MetricValue(
        name=name,
        value=rate,
        ci_low=low,
        ci_high=high,
        n=n,
        n_eff=n_eff,
        threshold=threshold,
        state="alert" if low > threshold else "ok",
        details=details,
    )
